"""The rpc edge of replication: the leader's side of ``Replicate``, and ``Status``.

A Replicate session: the replica's first message opens it (its id, address and where its
log ends); the leader answers with its stream, commit and last seqno, its other replicas'
addresses, its segment cast endpoint and — when the replica is behind the start of the
active segment — the sealed segment files to catch up with. Then the replica streams its
state (durable seqno: its ack) and the leader streams its commit seqno whenever it moves
and at least every ``UPDATE_S``. A node that is not the leader refuses the session with
FAILED_PRECONDITION naming the leader; a leader that stops leading ends it the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from boomscooter import rpc
from boomscooter.errors import BoomscooterError
from boomscooter.node import convert, rules
from boomscooter.node.core import MAX_PRODUCER_ID_BYTES
from boomscooter.storage.segment import parse_file_name
from boomscooter.v1 import boomscooter_pb2 as pb
from bootcast.logs import get_logger

if TYPE_CHECKING:
    from boomscooter.node.runtime import Node

log = get_logger("boomscooter.rpc")

UPDATE_S = 0.5
RESPONSE_EVERY_S = 0.01


def _response(node: Node, *, first: bool, replica_next: int) -> pb.ReplicateResponse:
    response = pb.ReplicateResponse(
        session=convert.session_message(node.session),
        commit_seqno=node.commit_seqno,
        last_seqno=node.log.last_seqno,
        min_insync=node.tracker.min_insync,
        replica_addresses=node.replicas.addresses(),
        cast_address=node.cast_address,
        first_seqno=node.log.first_seqno,
        keepalive_ms=rules.keepalive_ms(node.config.insync_timeout_s),
    )
    if first and node.cast_address:
        files = node.log.segment_files()
        active = parse_file_name(files[-1][0])
        if active is not None and replica_next < active.base_seqno:
            response.sealed_segments.extend(name for name, _ in files[:-1])
    return response


async def replicate(
    node: Node, requests: AsyncIterator[pb.ReplicateRequest], context: Any
) -> AsyncIterator[pb.ReplicateResponse]:
    try:
        hello = await anext(aiter(requests))
    except StopAsyncIteration:
        return
    replica_id = hello.replica_id
    if not replica_id or len(replica_id.encode()) > MAX_PRODUCER_ID_BYTES:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"replica_id must be 1 to {MAX_PRODUCER_ID_BYTES} bytes")  # fmt: skip
    loop = asyncio.get_running_loop()
    if hello.last_epoch > node.epoch and node.is_leader:
        log.warning("replica.newer_epoch", replica=replica_id, replica_epoch=hello.last_epoch,
                    epoch=node.epoch)  # fmt: skip
    try:
        state, commands = node.machine.replica_opened(
            replica_id, hello.address, hello.last_epoch, loop.time()
        )
    except BoomscooterError as exc:
        await context.abort(rpc.grpc_status(exc), str(exc))
    node.apply(commands)
    session = state.sessions
    epoch = node.epoch

    async def read() -> None:
        async for request in requests:
            if request.replica_id == replica_id:
                node.apply(node.machine.replica_acked(
                    replica_id, request.durable_seqno, request.last_seqno, request.last_epoch,
                    loop.time(),
                ))  # fmt: skip

    reader = asyncio.get_running_loop().create_task(read(), name=f"replicate-{replica_id}")
    try:
        response = _response(node, first=True, replica_next=hello.last_seqno + 1)
        entries, fed = node.machine.feed_since(-1)
        response.producer_batches.extend(convert.producer_batch(*e) for e in entries)
        yield response
        sent = (node.commit_seqno, node.log.last_seqno)
        last_sent_at = loop.time()
        while not reader.done():
            await node.wait_change(UPDATE_S)
            if not node.is_leader or node.epoch != epoch:
                error = node.not_leader()
                await context.abort(rpc.grpc_status(error), str(error))
            now_state = (node.commit_seqno, node.log.last_seqno)
            entries, fed = node.machine.feed_since(fed)
            if entries or now_state[0] != sent[0] or loop.time() - last_sent_at >= UPDATE_S:
                response = _response(node, first=False, replica_next=0)
                response.producer_batches.extend(convert.producer_batch(*e) for e in entries)
                yield response
                sent, last_sent_at = now_state, loop.time()
                # Coalesce: the commit reaches replicas in the stream's pages anyway; these
                # messages carry dedupe entries and keep the session alive.
                await asyncio.sleep(RESPONSE_EVERY_S)
        with contextlib.suppress(asyncio.CancelledError):
            reader.result()
    finally:
        reader.cancel()
        node.apply(node.machine.replica_closed(replica_id, session))


def status(node: Node) -> pb.StatusResponse:
    response = pb.StatusResponse(
        role=convert.ROLES[node.machine.peer_role],
        node_id=node.node_id,
        epoch=node.machine.known_epoch(),  # the newest it knows (a fenced leader's too)
        first_seqno=node.log.first_seqno,
        last_seqno=node.log.last_seqno,
        commit_seqno=node.commit_seqno,
        durable_seqno=node.log.durable_seqno,
        leader_address=node.leader_address,
        min_insync=node.tracker.min_insync,
        log_bytes=node.log.total_bytes,
        segment_count=node.log.segment_count,
        last_epoch=node.log.last_epoch,
    )
    follower = node.follower
    if not node.is_leader and node.machine.leader_min_insync:
        response.min_insync = node.machine.leader_min_insync  # the leader's setting
    counters = dict(node.counters)
    counters["loop_stalls"] = node.watchdog.stalls
    if follower is not None:
        counters.update(follower.stats)
    if node.sender is not None:
        counters.update(pages_sent=node.sender.pages_sent, bytes_sent=node.sender.bytes_sent)
    for name, value in counters.items():
        response.counters[name] = value
    if node.is_leader:
        now = asyncio.get_running_loop().time()
        last = node.log.last_seqno
        for state in sorted(node.replicas.replicas.values(), key=lambda s: s.replica_id):
            response.replicas.append(
                pb.ReplicaStatus(
                    replica_id=state.replica_id,
                    address=state.address,
                    connected=state.connected,
                    durable_seqno=state.durable_seqno,
                    lag_records=max(0, last - state.durable_seqno),
                    last_ack_age_ms=int(max(0.0, now - state.last_ack_at) * 1000),
                    in_sync=state.in_sync,
                    last_seqno=state.last_seqno,
                )
            )
    return response
