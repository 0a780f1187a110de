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
import structlog

from boomscooter.node.core import MAX_PRODUCER_ID_BYTES
from boomscooter.node.replication import ReplicaState
from boomscooter.storage.segment import parse_file_name
from boomscooter.v1 import boomscooter_pb2 as pb

if TYPE_CHECKING:
    from boomscooter.node.leader import LeaderNode

log = structlog.get_logger("boomscooter.rpc")

UPDATE_S = 1.0
RESPONSE_EVERY_S = 0.01
# Starting, stepping down, stopped: neither (ROLE_UNSPECIFIED), so no peer counts it.
_ROLES = {"leader": pb.ROLE_LEADER, "replica": pb.ROLE_REPLICA}


FEED_PER_MESSAGE = 10_000
RECENT_PER_PRODUCER = 64  # beyond an SDK producer's in-flight window (16)


def _producer_batches(node: LeaderNode, after: int) -> tuple[list[pb.ProducerBatch], int]:
    """Dedupe entries numbered above ``after`` (at most FEED_PER_MESSAGE) and the number of
    the last one; when the feed no longer reaches back to ``after`` (a session's first
    message, or a replica too slow), each producer's recent entries instead."""
    feed = node.dedupe_feed
    newest = feed[-1][0] if feed else 0
    if after >= newest:
        return [], after
    if after < 0 or feed[0][0] > after + 1:
        entries = list(node.dedupe.recent(RECENT_PER_PRODUCER))
        return [_producer_batch(*e) for e in entries], newest
    start = after + 1 - feed[0][0]
    chosen = [feed[i] for i in range(start, min(len(feed), start + FEED_PER_MESSAGE))]
    return [_producer_batch(p, s, a) for _, p, s, a in chosen], chosen[-1][0]


def _producer_batch(producer_id: str, sequence: int, appended: Any) -> pb.ProducerBatch:
    return pb.ProducerBatch(
        producer_id=producer_id,
        batch_sequence=sequence,
        base_seqno=appended.base_seqno,
        record_count=appended.record_count,
        epoch=appended.epoch,
    )


def keepalive_ms(insync_timeout_s: float) -> int:
    """The replicas' keepalive: four of them fit in the in-sync timeout, so one late or lost
    keepalive on a busy host does not count a replica out of sync."""
    return max(1, int(insync_timeout_s * 1000 / 4))


def _response(node: LeaderNode, *, first: bool, replica_next: int) -> pb.ReplicateResponse:
    from boomscooter.node.servicer import session_message

    response = pb.ReplicateResponse(
        session=session_message(node),
        commit_seqno=node.commit_seqno,
        last_seqno=node.log.last_seqno,
        min_insync=node.tracker.min_insync,
        replica_addresses=node.replicas.addresses(),
        cast_address=node.cast_address,
        first_seqno=node.log.first_seqno,
        keepalive_ms=keepalive_ms(node.config.insync_timeout_s),
    )
    if first and node.cast_address:
        files = node.log.segment_files()
        active = parse_file_name(files[-1][0])
        if active is not None and replica_next < active.base_seqno:
            response.sealed_segments.extend(name for name, _ in files[:-1])
    return response


async def replicate(
    node: LeaderNode, requests: AsyncIterator[pb.ReplicateRequest], context: Any
) -> AsyncIterator[pb.ReplicateResponse]:
    try:
        hello = await anext(aiter(requests))
    except StopAsyncIteration:
        return
    replica_id = hello.replica_id
    if not replica_id or len(replica_id.encode()) > MAX_PRODUCER_ID_BYTES:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"replica_id must be 1 to {MAX_PRODUCER_ID_BYTES} bytes")  # fmt: skip
    if not node.is_leader:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(node.not_leader()))
    if hello.last_epoch > node.epoch:
        log.warning("replica.newer_epoch", replica=replica_id, replica_epoch=hello.last_epoch,
                    epoch=node.epoch)  # fmt: skip
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"the replica holds epoch {hello.last_epoch}, above this leader's {node.epoch}: "
            "this leader is stale",
        )
    session = replica_opened(node, replica_id, hello.address, hello.last_epoch).sessions
    epoch = node.epoch

    async def read() -> None:
        async for request in requests:
            if request.replica_id == replica_id:
                replica_acked(node, replica_id, request.durable_seqno, request.last_seqno,
                                   request.last_epoch)  # fmt: skip

    reader = asyncio.get_running_loop().create_task(read(), name=f"replicate-{replica_id}")
    try:
        response = _response(node, first=True, replica_next=hello.last_seqno + 1)
        entries, fed = _producer_batches(node, -1)
        response.producer_batches.extend(entries)
        yield response
        sent = (node.commit_seqno, node.log.last_seqno)
        loop = asyncio.get_running_loop()
        last_sent_at = loop.time()
        while not reader.done():
            await node.wait_change(UPDATE_S)
            if not node.is_leader or node.epoch != epoch:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(node.not_leader()))
            now_state = (node.commit_seqno, node.log.last_seqno)
            entries, fed = _producer_batches(node, fed)
            if entries or now_state[0] != sent[0] or loop.time() - last_sent_at >= UPDATE_S:
                response = _response(node, first=False, replica_next=0)
                response.producer_batches.extend(entries)
                yield response
                sent, last_sent_at = now_state, loop.time()
                # Coalesce: the commit reaches replicas in the stream's pages anyway; these
                # messages carry dedupe entries and keep the session alive.
                await asyncio.sleep(RESPONSE_EVERY_S)
        with contextlib.suppress(asyncio.CancelledError):
            reader.result()
    finally:
        reader.cancel()
        replica_closed(node, replica_id, session)


def replica_opened(
    node: LeaderNode, replica_id: str, address: str, last_epoch: int
) -> ReplicaState:
    """A replica opened its Replicate session. Its first message is not counted: its
    tail may have diverged; its acks count once it has reconciled with this log."""
    if last_epoch > node.epoch:
        raise node.not_leader()
    state = node.replicas.connected(replica_id, address, asyncio.get_running_loop().time())
    if address and address not in node.state.peers:
        node.state.peers.append(address)
        node._save_state_soon()
    log.info("replica.connected", replica=replica_id, address=address)
    return state


def replica_acked(
    node: LeaderNode, replica_id: str, durable: int, last: int, last_epoch: int
) -> None:
    if node.replicas.ack(
        replica_id,
        durable_seqno=min(durable, node.log.last_seqno),
        last_seqno=last,
        last_epoch=last_epoch,
        now=asyncio.get_running_loop().time(),
    ):
        node._commit_moved()
    node._notify()


def replica_closed(node: LeaderNode, replica_id: str, session: int) -> None:
    node.replicas.disconnected(replica_id, session)
    log.info("replica.disconnected", replica=replica_id)
    node._notify()


async def expire_replicas(node: LeaderNode) -> None:
    while True:
        await asyncio.sleep(min(0.5, node.config.insync_timeout_s / 4))
        for replica_id in node.replicas.expire(asyncio.get_running_loop().time()):
            log.warning(
                "replica.out_of_sync",
                replica=replica_id,
                timeout_s=node.config.insync_timeout_s,
                in_sync_copies=node.replicas.in_sync_copies(),
                min_insync=node.tracker.min_insync,
            )
            node._notify()


def status(node: LeaderNode) -> pb.StatusResponse:
    response = pb.StatusResponse(
        role=_ROLES.get(node.role, pb.ROLE_UNSPECIFIED),
        node_id=node.node_id,
        epoch=max(node.epoch, node.state.epoch),  # the newest it knows (a fenced leader's too)
        first_seqno=node.log.first_seqno,
        last_seqno=node.log.last_seqno,
        commit_seqno=node.commit_seqno,
        durable_seqno=node.log.durable_seqno,
        leader_address=node.leader_address,
        min_insync=node.tracker.min_insync,
        log_bytes=node.log.total_bytes,
        segment_count=node.log.segment_count,
    )
    follower = node.follower
    if follower is not None and follower.min_insync:
        response.min_insync = follower.min_insync  # the leader's setting
    counters = dict(node.counters)
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
