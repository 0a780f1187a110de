"""The rpc edge of a node: protobuf ↔ domain values, errors → gRPC status codes.

Nothing here decides anything about the log; it validates requests (clear INVALID_ARGUMENT
/ OUT_OF_RANGE messages, nothing stored changes), calls the node and converts. Produce
reports per-batch failures in-band (``Error``) so one bad batch does not end a pipelined
stream; the other calls end with a status.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from boomscooter import rpc
from boomscooter.errors import (
    BoomscooterError,
    NotLeaderError,
    RequestError,
)
from boomscooter.node import convert, replicate
from boomscooter.node.config import GRPC_MESSAGE_BYTES, ProduceBatch, ProduceOutcome
from boomscooter.storage import Batch, Entry, FsyncMode
from boomscooter.v1 import boomscooter_pb2 as pb
from boomscooter.v1 import boomscooter_pb2_grpc as pb_grpc
from boomscooter.v1.serving import start_server
from bootcast.logs import get_logger

if TYPE_CHECKING:
    from boomscooter.node.runtime import Node

log = get_logger("boomscooter.rpc")

DEFAULT_FETCH_BYTES = 1 << 20
MAX_FETCH_BYTES = 8 << 20
SUBSCRIBE_CHUNK_BYTES = 1 << 20
IDLE_HEARTBEAT_S = 1.0
QUORUM_TIMEOUT_S = 30.0
# A Produce stream silent this long gets a keepalive (an empty response): a producer whose
# batches wait for acks knows the leader is alive (it gives a silent one up after its
# leader_timeout_s, 2 s by default).
PRODUCE_KEEPALIVE_S = 0.5
_ACK_LEVELS = {
    pb.ACK_LEVEL_UNSPECIFIED,
    pb.ACK_LEVEL_NONE,
    pb.ACK_LEVEL_LEADER,
    pb.ACK_LEVEL_QUORUM,
}


def error_message(exc: BaseException) -> pb.Error:
    """A failure answered in-band on a Produce stream (an unexpected one logged here)."""
    if not isinstance(exc, BoomscooterError):
        log.error("rpc.produce.internal_error", error=repr(exc))
    return rpc.error_to_pb(exc)


def _entries(request: pb.ProduceRequest) -> list[Entry]:
    return [
        Entry(
            r.timestamp_ms,
            r.payload,
            r.channel if r.HasField("channel") else None,
            r.key if r.HasField("key") else None,
        )
        for r in request.record_list.records
    ]


def _joined(batches: list[Batch]) -> bytes:
    return b"".join([b.data for b in batches])


class NodeServicer(pb_grpc.BoomscooterServicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    # -- Produce ----------------------------------------------------------------------------

    async def Produce(
        self, request_iterator: AsyncIterator[pb.ProduceRequest], context: Any
    ) -> AsyncIterator[pb.ProduceResponse]:
        node = self.node
        out: asyncio.Queue[pb.ProduceResponse | None] = asyncio.Queue()
        # Acks that wait: for the commit (quorum), and — under fsync=always, whose appends
        # share fdatasyncs (group commit) — for the leader's durable copy (leader).
        commit = lambda: node.commit_seqno  # noqa: E731
        quorum = _AckQueue(out, node.wait_commit, commit, commit, "committed")
        durable = _AckQueue(out, node.wait_durable, lambda: node.durable_seen, commit, "durable")
        group_commit = node.config.fsync.mode is FsyncMode.ALWAYS

        async def read() -> None:
            try:
                async for request in request_iterator:
                    response = await self._produce_one(request)
                    if response is None:
                        continue
                    if not response.HasField("ack"):
                        out.put_nowait(response)
                    elif request.ack_level in (pb.ACK_LEVEL_QUORUM, pb.ACK_LEVEL_UNSPECIFIED):
                        quorum.add(response)
                    elif group_commit:
                        durable.add(response)
                    else:
                        out.put_nowait(response)
            finally:
                quorum.close()
                durable.close()

        tasks = [asyncio.create_task(read()), asyncio.create_task(quorum.run()),
                 asyncio.create_task(durable.run())]  # fmt: skip
        try:
            ended = 0
            while ended < 2:
                try:
                    async with asyncio.timeout(PRODUCE_KEEPALIVE_S):
                        item = await out.get()
                except TimeoutError:
                    yield pb.ProduceResponse()  # a keepalive: this leader is alive
                    continue
                if item is None:
                    ended += 1
                    continue
                yield item
            await tasks[0]  # re-raise a failure of the request stream
        finally:
            for task in tasks:
                task.cancel()

    async def _produce_one(self, request: pb.ProduceRequest) -> pb.ProduceResponse | None:
        node = self.node
        sequence = request.batch_sequence
        try:
            if request.ack_level not in _ACK_LEVELS:
                raise RequestError(f"unknown ack level {request.ack_level}")
            which = request.WhichOneof("records")
            if which is None:
                raise RequestError("a batch needs records (encoded_batch or record_list)")
            node.machine.check_produce(
                quorum=request.ack_level in (pb.ACK_LEVEL_QUORUM, pb.ACK_LEVEL_UNSPECIFIED)
            )
            batch = ProduceBatch(
                producer_id=request.producer_id,
                batch_sequence=sequence,
                expected_first_seqno=request.expected_first_seqno
                if request.HasField("expected_first_seqno")
                else None,
                encoded=request.encoded_batch if which == "encoded_batch" else None,
                entries=_entries(request) if which == "record_list" else None,
            )
            outcome: ProduceOutcome = await node.append(batch)
        except Exception as exc:  # every failure is answered in-band, the stream goes on
            node.counters["rejected"] += 1
            log.info("rpc.produce.rejected", producer=request.producer_id, sequence=sequence,
                     error=str(exc))  # fmt: skip
            return pb.ProduceResponse(batch_sequence=sequence, error=error_message(exc))
        if request.ack_level == pb.ACK_LEVEL_NONE:
            return None
        appended = outcome.appended
        return pb.ProduceResponse(
            batch_sequence=sequence,
            ack=pb.ProduceAck(
                base_seqno=appended.base_seqno,
                record_count=appended.record_count,
                epoch=appended.epoch,
                commit_seqno=node.commit_seqno,
                duplicate=outcome.duplicate,
            ),
        )

    # -- reads ------------------------------------------------------------------------------

    async def Handshake(self, request: pb.HandshakeRequest, context: Any) -> pb.HandshakeResponse:
        node = self.node
        log.info("rpc.handshake", subscriber=request.subscriber_id[:200], peer=context.peer())
        return pb.HandshakeResponse(
            session=convert.session_message(node.session),
            first_seqno=node.log.first_seqno,
            last_seqno=node.log.last_seqno,
            commit_seqno=node.commit_seqno,
        )

    async def _abort(self, context: Any, exc: BoomscooterError) -> None:
        await context.abort(rpc.grpc_status(exc), str(exc))

    def _check_start(self, seqno: int) -> None:
        first = self.node.log.first_seqno
        if seqno < first:
            raise RequestError(
                f"seqno {seqno} is below the first available seqno {first} (deleted by retention)",
                code="OUT_OF_RANGE",
            )

    async def Fetch(self, request: pb.FetchRequest, context: Any) -> pb.FetchResponse:
        node = self.node
        start = request.from_seqno
        try:
            if start < 1:
                raise RequestError("from_seqno must be at least 1")
            if request.HasField("to_seqno") and request.to_seqno < start:
                raise RequestError(f"to_seqno {request.to_seqno} is below from_seqno {start}")
            self._check_start(start)
        except RequestError as exc:
            await self._abort(context, exc)
        limit = node.log.last_seqno if request.include_uncommitted else node.commit_seqno
        if request.HasField("to_seqno"):
            limit = min(limit, request.to_seqno)
        response = pb.FetchResponse(
            commit_seqno=node.commit_seqno, log_last_seqno=node.log.last_seqno
        )
        if start > limit:
            return response
        budget = min(request.max_bytes or DEFAULT_FETCH_BYTES, MAX_FETCH_BYTES)
        batches = await asyncio.to_thread(
            node.log.read_batches, start, to_seqno=limit, max_bytes=budget
        )
        if batches:
            response.batches = _joined(batches)
            response.first_seqno = start
            response.last_seqno = min(batches[-1].last_seqno, limit)
        return response

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: Any
    ) -> AsyncIterator[pb.SubscribeResponse]:
        node = self.node
        try:
            position, until, count = self._subscribe_range(request)
        except RequestError as exc:
            await self._abort(context, exc)
            return
        prefix = request.channel_prefix if request.HasField("channel_prefix") else None
        log.info("rpc.subscribe", start=position, until=until, count=count, peer=context.peer())
        last_sent = time.monotonic()
        while until is None or position <= until:
            if count is not None and count <= 0:
                return
            limit = node.commit_seqno if until is None else min(node.commit_seqno, until)
            if position > limit:
                if time.monotonic() - last_sent >= IDLE_HEARTBEAT_S:
                    yield pb.SubscribeResponse(commit_seqno=node.commit_seqno)
                    last_sent = time.monotonic()
                await node.wait_change(IDLE_HEARTBEAT_S)
                continue
            try:
                self._check_start(position)
            except RequestError as exc:
                await self._abort(context, exc)
                return
            batches = await asyncio.to_thread(
                node.log.read_batches, position, to_seqno=limit, max_bytes=SUBSCRIBE_CHUNK_BYTES
            )
            if not batches:
                await node.wait_change(IDLE_HEARTBEAT_S)
                continue
            last = min(batches[-1].last_seqno, limit)
            if prefix is not None or count is not None:
                batches, last, count = _filter(batches, position, last, prefix, count)
            if batches:
                yield pb.SubscribeResponse(
                    batches=_joined(batches),
                    first_seqno=position,
                    last_seqno=last,
                    commit_seqno=node.commit_seqno,
                )
                last_sent = time.monotonic()
            position = last + 1

    def _subscribe_range(self, request: pb.SubscribeRequest) -> tuple[int, int | None, int | None]:
        node = self.node
        start = request.WhichOneof("start")
        if start == "seqno":
            if request.seqno < 1:
                raise RequestError("start seqno must be at least 1")
            position = request.seqno
            self._check_start(position)
        elif start == "earliest":
            position = node.log.first_seqno
        elif start == "time_ms":
            found = node.log.seqno_for_time(request.time_ms)
            position = node.log.next_seqno if found is None else max(found, node.log.first_seqno)
        else:
            position = node.commit_seqno + 1
        end = request.WhichOneof("end")
        until = count = None
        if end == "until_seqno":
            until = request.until_seqno
            if until < position - 1:
                raise RequestError(f"until_seqno {until} is before the start {position}")
        elif end == "count":
            if request.count < 1:
                raise RequestError("count must be at least 1")
            count = request.count
        return position, until, count

    async def Notifications(
        self, request: pb.NotificationsRequest, context: Any
    ) -> AsyncIterator[pb.NotificationsResponse]:
        node = self.node
        interval_s = request.min_interval_ms / 1000
        sent: tuple[Any, ...] | None = None
        while True:
            name, size = node.committed_end()
            state = (name, size, node.log.last_seqno, node.commit_seqno, node.log.first_seqno)
            if state != sent:
                yield pb.NotificationsResponse(
                    log_dir=node.log_dir,
                    segment_file=name,
                    file_size_bytes=size,
                    last_seqno=state[2],
                    commit_seqno=state[3],
                    first_seqno=state[4],
                )
                sent = state
                if interval_s:
                    await asyncio.sleep(interval_s)
                    continue
            await node.wait_change(IDLE_HEARTBEAT_S)

    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.StatusResponse:
        return replicate.status(self.node)

    async def Replicate(
        self, request_iterator: AsyncIterator[pb.ReplicateRequest], context: Any
    ) -> AsyncIterator[pb.ReplicateResponse]:
        async for response in replicate.replicate(self.node, request_iterator, context):
            yield response

    async def Promote(self, request: pb.PromoteRequest, context: Any) -> pb.PromoteResponse:
        log.warning("rpc.promote", peer=context.peer(), min_insync=request.min_insync)
        try:
            done = await self.node.promote(request.min_insync, force=request.force)
        except BoomscooterError as exc:
            await self._abort(context, exc)
        return pb.PromoteResponse(**done)

    async def Fence(self, request: pb.FenceRequest, context: Any) -> pb.FenceResponse:
        if not request.epoch or not request.leader:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "Fence needs an epoch and a leader"
            )
        log.warning("rpc.fence", peer=context.peer(), epoch=request.epoch, leader=request.leader)
        await self.node.fence(request.epoch, request.leader)
        return pb.FenceResponse(status=replicate.status(self.node))


class _AckQueue:
    """Acks of one Produce stream waiting, in seqno order, for a position (the commit, or
    the leader's durable seqno) to reach their batch; answered in order when it does, or
    with a retriable UNAVAILABLE after ``QUORUM_TIMEOUT_S``, or NOT_LEADER when the node
    stops leading meanwhile. ``None`` on ``out`` marks its end."""

    def __init__(
        self,
        out: asyncio.Queue[pb.ProduceResponse | None],
        wait: Callable[[int, float], Awaitable[bool]],
        position: Callable[[], int],
        commit: Callable[[], int],
        what: str,
    ) -> None:
        self.out = out
        self.wait = wait
        self.position = position
        self.commit = commit
        self.what = what
        self.pending: deque[tuple[int, pb.ProduceResponse]] = deque()
        self.wake = asyncio.Event()
        self.open = True

    def add(self, response: pb.ProduceResponse) -> None:
        self.pending.append((response.ack.base_seqno + response.ack.record_count - 1, response))
        self.wake.set()

    def close(self) -> None:
        self.open = False
        self.wake.set()

    def _fail(self, error: pb.Error) -> None:
        _, response = self.pending.popleft()
        response.ClearField("ack")
        response.error.CopyFrom(error)
        self.out.put_nowait(response)

    async def run(self) -> None:
        pending = self.pending
        while True:
            if not pending:
                if not self.open:
                    self.out.put_nowait(None)
                    return
                self.wake.clear()
                await self.wake.wait()
                continue
            try:
                reached = await self.wait(pending[0][0], QUORUM_TIMEOUT_S)
            except NotLeaderError as exc:  # stepped down: the new leader decides
                self._fail(error_message(exc))
                continue
            if not reached:
                self._fail(pb.Error(
                    code=grpc.StatusCode.UNAVAILABLE.value[0],
                    message=f"not {self.what} within {QUORUM_TIMEOUT_S:.0f} s "
                    "(stored on the leader; retry with the same batch_sequence)",
                    retriable=True,
                ))  # fmt: skip
                continue
            position = self.position()
            while pending and pending[0][0] <= position:
                _, done = pending.popleft()
                done.ack.commit_seqno = max(done.ack.commit_seqno, self.commit())
                self.out.put_nowait(done)


def _filter(
    batches: list[Batch], first: int, last: int, prefix: str | None, count: int | None
) -> tuple[list[Batch], int, int | None]:
    """Keep the batches with a record in ``first..last`` whose channel matches, and stop
    after ``count`` matching records (``last`` becomes that record's seqno)."""
    kept = []
    for batch in batches:
        matched = False
        for record in batch.records(first, last):
            if prefix is not None and (
                record.channel is None or not record.channel.startswith(prefix)
            ):
                continue
            matched = True
            if count is not None:
                count -= 1
                if count == 0:
                    kept.append(batch)
                    return kept, record.seqno, 0
        if matched:
            kept.append(batch)
    return kept, last, count


async def serve_node(node: Node, listen: str) -> tuple[Any, int]:
    options = [
        ("grpc.max_receive_message_length", GRPC_MESSAGE_BYTES),
        ("grpc.max_send_message_length", GRPC_MESSAGE_BYTES),
        # The SDK pings every rpc.DEFAULT_KEEPALIVE_TIME_S while a call is open (a frozen
        # leader is noticed within seconds): allow it, never answer with too_many_pings.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
        ("grpc.http2.max_ping_strikes", 0),
    ]
    return await start_server(NodeServicer(node), listen=listen, options=options)
