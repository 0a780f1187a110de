"""The producer SDK over real gRPC, against a fake leader with injectable faults.

:class:`FakeLeader` implements ``Produce`` as the wire contract says (dedupe by producer id
and batch sequence, expected seqno checks, in-band errors, responses only where the ack
level asks) and can kill streams, redirect, hold acks and refuse batches, so every retry
path runs on real sockets. The integration tests against the real leader are at the end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from boomscooter import rpc
from boomscooter.client import AckLevel, Producer, ProduceResult, SyncProducer
from boomscooter.errors import (
    ExpectedSeqnoError,
    NotLeaderError,
    RequestError,
    ServerUnavailableError,
    TrimmedError,
)
from boomscooter.storage.batch import Batch, Entry, Record
from boomscooter.v1 import boomscooter_pb2 as pb
from boomscooter.v1 import boomscooter_pb2_grpc
from boomscooter.v1.serving import start_server

from support.waiting import eventually, still_pending, within

FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


@dataclass
class FakeLeader(boomscooter_pb2_grpc.BoomscooterServicer):
    """An in-memory leader of the Produce contract with knobs for faults."""

    records: list[Record] = field(default_factory=list)
    epoch: int = 1
    dedupe: dict[tuple[str, int], pb.ProduceAck] = field(default_factory=dict)
    requests: list[tuple[str, int]] = field(default_factory=list)
    # Abort the stream (UNAVAILABLE) after this many more requests were appended.
    kill_after: int | None = None
    # batch_sequence -> an in-band error for its next arrival (then forgotten).
    errors: dict[int, pb.Error] = field(default_factory=dict)
    # Answer every batch with FAILED_PRECONDITION naming this leader.
    redirect_to: str | None = None
    # Fail the whole call (a replica's answer).
    refuse_call: grpc.StatusCode | None = None
    leader_address: str = ""
    # Acks wait for this event (backpressure tests); set = no waiting.
    release: asyncio.Event = field(default_factory=asyncio.Event)
    streams: int = 0

    def __post_init__(self) -> None:
        self.release.set()

    @property
    def next_seqno(self) -> int:
        return len(self.records) + 1

    def _append(self, request: pb.ProduceRequest) -> pb.ProduceResponse:
        seq = request.batch_sequence
        reply = pb.ProduceResponse(batch_sequence=seq)
        if self.redirect_to is not None:
            reply.error.CopyFrom(
                pb.Error(
                    code=FAILED_PRECONDITION,
                    message="not the leader",
                    retriable=True,
                    leader_address=self.redirect_to,
                )
            )
            return reply
        if seq in self.errors:
            reply.error.CopyFrom(self.errors.pop(seq))
            return reply
        key = (request.producer_id, seq)
        if request.producer_id and key in self.dedupe:
            ack = pb.ProduceAck()
            ack.CopyFrom(self.dedupe[key])
            ack.duplicate = True
            reply.ack.CopyFrom(ack)
            return reply
        if (
            request.HasField("expected_first_seqno")
            and request.expected_first_seqno != self.next_seqno
        ):
            reply.error.CopyFrom(
                pb.Error(
                    code=FAILED_PRECONDITION,
                    message=f"expected {request.expected_first_seqno}, next is {self.next_seqno}",
                    next_seqno=self.next_seqno,
                )
            )
            return reply
        batch = Batch.from_bytes(request.encoded_batch)
        base = self.next_seqno
        for i, r in enumerate(batch.records()):
            self.records.append(r._replace(seqno=base + i))
        ack = pb.ProduceAck(
            base_seqno=base,
            record_count=batch.record_count,
            epoch=self.epoch,
            commit_seqno=self.next_seqno - 1,
        )
        if request.producer_id:
            self.dedupe[key] = ack
        reply.ack.CopyFrom(ack)
        return reply

    async def Produce(
        self, request_iterator: AsyncIterator[pb.ProduceRequest], context: Any
    ) -> AsyncIterator[pb.ProduceResponse]:
        self.streams += 1
        if self.refuse_call is not None:
            await context.abort(self.refuse_call, "refused")
        async for request in request_iterator:
            self.requests.append((request.producer_id, request.batch_sequence))
            reply = self._append(request)
            if self.kill_after is not None:
                self.kill_after -= 1
                if self.kill_after < 0:
                    self.kill_after = None
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "killed by the test")
            await self.release.wait()
            if reply.HasField("error") or request.ack_level != pb.ACK_LEVEL_NONE:
                yield reply

    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.StatusResponse:
        return pb.StatusResponse(leader_address=self.leader_address)


Serve = Callable[..., Awaitable[tuple[FakeLeader, str]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Factory: ``leader, address = await serve()``; every server stops after the test."""
    servers: list[grpc.aio.Server] = []

    async def start(fake: FakeLeader | None = None) -> tuple[FakeLeader, str]:
        fake = fake or FakeLeader()
        server, port = await start_server(fake)
        servers.append(server)
        return fake, f"127.0.0.1:{port}"

    yield start
    for server in servers:
        await server.stop(None)


def payloads(n: int, size: int = 100) -> list[bytes]:
    return [i.to_bytes(4, "big") * (size // 4) for i in range(n)]


# -- the happy path ----------------------------------------------------------------------


async def test_records_get_contiguous_seqnos_in_send_order(serve: Serve) -> None:
    fake, address = await serve()
    async with Producer(address, max_batch_records=7, linger_ms=1) as producer:
        futures = [await producer.send(p) for p in payloads(100)]
        await producer.flush()
        assert [f.result() for f in futures] == list(range(1, 101))
    assert [r.payload for r in fake.records] == payloads(100)
    assert len(fake.requests) == 15  # ceil(100 / 7) batches, none sent twice


async def test_linger_sends_a_partial_batch_without_flush(serve: Serve) -> None:
    fake, address = await serve()
    async with Producer(address, linger_ms=5) as producer:
        future = await producer.send(b"alone", channel="c", key=b"k", timestamp_ms=42)
        assert await within(future, "the lingering record's ack") == 1
    assert fake.records == [Record(1, 42, "c", b"k", b"alone")]


async def test_default_channel_and_producer_timestamps(serve: Serve) -> None:
    fake, address = await serve()
    async with Producer(address, channel="orders") as producer:
        await producer.send(b"a")
        await producer.send(b"b", channel=None)
    assert [r.channel for r in fake.records] == ["orders", None]
    assert all(r.timestamp_ms > 1_600_000_000_000 for r in fake.records)


async def test_batches_respect_max_batch_bytes(serve: Serve) -> None:
    fake, address = await serve()
    async with Producer(address, max_batch_bytes=1000, linger_ms=50) as producer:
        for p in payloads(50, 100):
            await producer.send(p)
    sizes = [len(r.payload) for r in fake.records]
    assert sizes == [100] * 50
    # 48 header + 8 * (12 + 100) = 944 fits, a ninth record would not.
    assert len(fake.requests) == 7


async def test_send_batch_resolves_to_its_placement(serve: Serve) -> None:
    fake, address = await serve()
    async with Producer(address) as producer:
        await producer.send(b"first")
        future = await producer.send_batch([Entry(1, b"x"), Entry(2, b"y")])
        result = await future
    assert result == ProduceResult(2, 2, 1, False, 3)
    assert [r.payload for r in fake.records] == [b"first", b"x", b"y"]


async def test_acks_none_resolves_to_none_once_written(serve: Serve) -> None:
    fake, address = await serve()
    async with Producer(address, acks="none", max_batch_records=10) as producer:
        futures = [await producer.send(p) for p in payloads(25)]
        await producer.flush()
        assert [f.result() for f in futures] == [None] * 25
    await eventually(lambda: len(fake.records) == 25, "the 25 records stored")


async def test_acks_quorum_sends_that_level(serve: Serve) -> None:
    fake, address = await serve()
    levels: list[int] = []
    original = fake._append

    def spy(request: pb.ProduceRequest) -> pb.ProduceResponse:
        levels.append(request.ack_level)
        return original(request)

    fake._append = spy  # type: ignore[method-assign]
    async with Producer(address, acks=AckLevel.QUORUM) as producer:
        assert await (await producer.send(b"q")) == 1
    assert levels == [pb.ACK_LEVEL_QUORUM]


# -- errors ------------------------------------------------------------------------------


async def test_a_record_larger_than_a_batch_is_refused_before_sending(serve: Serve) -> None:
    fake, address = await serve()
    async with Producer(address, max_batch_bytes=1000) as producer:
        with pytest.raises(RequestError, match="max_batch_bytes"):
            await producer.send(b"x" * 1000)
        with pytest.raises(RequestError, match="payload must be bytes"):
            await producer.send("text")  # type: ignore[arg-type]
        with pytest.raises(RequestError, match="max_batch_records"):
            await producer.send_batch([Entry(1, b"")] * 10_001)
        assert await (await producer.send(b"x" * 900)) == 1
    assert fake.requests == [(producer.producer_id, 1)]


async def test_expected_seqno_mismatch_fails_that_batch_only(serve: Serve) -> None:
    fake, address = await serve()
    producer = Producer(address)
    good = await producer.send_batch([Entry(1, b"a")], expected_first_seqno=1)
    bad = await producer.send_batch([Entry(1, b"b")], expected_first_seqno=5)
    after = await producer.send(b"c")
    with pytest.raises(ExpectedSeqnoError) as raised:
        await producer.flush()
    assert raised.value.next_seqno == 2
    assert (await good).base_seqno == 1  # type: ignore[union-attr]
    with pytest.raises(ExpectedSeqnoError):
        await bad
    assert await after == 2
    await producer.close()
    assert [r.payload for r in fake.records] == [b"a", b"c"]


async def test_a_non_retriable_error_fails_one_batch_and_flush_raises_it(serve: Serve) -> None:
    fake, address = await serve()
    fake.errors[2] = pb.Error(code=INVALID_ARGUMENT, message="bad batch")
    producer = Producer(address, max_batch_records=2)
    futures = [await producer.send(p) for p in payloads(6)]
    with pytest.raises(RequestError, match="bad batch") as raised:
        await producer.flush()
    assert raised.value.code == "INVALID_ARGUMENT"
    assert [f.exception() is None for f in futures] == [True, True, False, False, True, True]
    assert [f.result() for f in futures[4:]] == [3, 4]
    await producer.flush()  # the error was reported once
    await producer.close()


async def test_a_stream_killed_mid_window_stores_each_batch_once(serve: Serve) -> None:
    fake, address = await serve()
    fake.kill_after = 5
    async with Producer(address, max_batch_records=10, linger_ms=1) as producer:
        futures = [await producer.send(p) for p in payloads(200)]
        await producer.flush()
        assert [f.result() for f in futures] == list(range(1, 201))
    assert fake.streams == 2 and producer.reconnects == 1 and producer.resent_batches > 0
    assert [r.payload for r in fake.records] == payloads(200)
    # The killed stream's appended-but-unanswered batches came again and were deduplicated.
    assert len(fake.requests) > 20
    assert len(set(fake.requests)) == 20


async def test_a_retriable_in_band_error_resends_the_window(serve: Serve) -> None:
    fake, address = await serve()
    fake.errors[1] = pb.Error(code=UNAVAILABLE, message="try again", retriable=True)
    async with Producer(address, max_batch_records=1) as producer:
        futures = [await producer.send(p) for p in payloads(3)]
        await producer.flush()
    # Batch 1 was not appended; 2 and 3 may have been before its resend (the documented
    # reordering of a retriable rejection mid-window). Each is stored once, where its
    # future says.
    seqnos = [f.result() for f in futures]
    assert sorted(seqnos) == [1, 2, 3]  # type: ignore[type-var]
    assert [fake.records[s - 1].payload for s in seqnos if s] == payloads(3)
    assert fake.streams == 2


async def test_max_in_flight_one_keeps_order_across_a_retriable_rejection(serve: Serve) -> None:
    fake, address = await serve()
    fake.errors[1] = pb.Error(code=UNAVAILABLE, message="try again", retriable=True)
    async with Producer(address, max_batch_records=1, max_in_flight=1) as producer:
        futures = [await producer.send(p) for p in payloads(3)]
        await producer.flush()
    assert [f.result() for f in futures] == [1, 2, 3]
    assert [r.payload for r in fake.records] == payloads(3)


async def test_not_leader_is_followed_to_the_named_leader(serve: Serve) -> None:
    leader, leader_address = await serve()
    replica, replica_address = await serve(FakeLeader(redirect_to=leader_address))
    async with Producer(replica_address, max_batch_records=5) as producer:
        futures = [await producer.send(p) for p in payloads(12)]
        await producer.flush()
        assert producer.address == leader_address
    assert [f.result() for f in futures] == list(range(1, 13))
    assert replica.records == []
    assert [r.payload for r in leader.records] == payloads(12)


async def test_a_call_refused_by_a_replica_asks_status_for_the_leader(serve: Serve) -> None:
    leader, leader_address = await serve()
    replica, replica_address = await serve(
        FakeLeader(refuse_call=grpc.StatusCode.FAILED_PRECONDITION, leader_address=leader_address)
    )
    async with Producer(replica_address) as producer:
        assert await (await producer.send(b"r")) == 1
    assert [r.payload for r in leader.records] == [b"r"]
    assert replica.streams >= 1 and replica.records == []


async def test_a_call_refused_for_good_fails_the_pending_records(serve: Serve) -> None:
    _, address = await serve(FakeLeader(refuse_call=grpc.StatusCode.PERMISSION_DENIED))
    producer = Producer(address)
    future = await producer.send(b"x")
    with pytest.raises(RequestError) as raised:
        await producer.flush()
    assert raised.value.code == "PERMISSION_DENIED"
    with pytest.raises(RequestError):
        await future
    await producer.close()


async def test_retries_run_out_with_server_unavailable(unused_tcp_port: int) -> None:
    producer = Producer(f"127.0.0.1:{unused_tcp_port}", retry_timeout_s=0.5)
    future = await producer.send(b"lost")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ServerUnavailableError, match="no working Produce stream"):
        await producer.flush()
    assert 0.4 < loop.time() - started < 15  # far below the 30 s default: the setting counts
    with pytest.raises(ServerUnavailableError):
        await future
    await producer.close()


async def test_records_sent_before_the_leader_starts_arrive(
    serve: Serve, unused_tcp_port: int
) -> None:
    address = f"127.0.0.1:{unused_tcp_port}"
    producer = Producer(address)
    future = await producer.send(b"early")
    await eventually(lambda: producer.reconnects >= 2, "a few failed connection attempts")
    fake = FakeLeader()
    server = grpc.aio.server()
    boomscooter_pb2_grpc.add_BoomscooterServicer_to_server(fake, server)
    server.add_insecure_port(address)
    await server.start()
    try:
        assert await within(future, "the early record's ack") == 1
        await producer.close()
    finally:
        await server.stop(None)


# -- backpressure, flush, close ----------------------------------------------------------


async def test_send_waits_while_the_window_is_full(serve: Serve) -> None:
    fake, address = await serve()
    fake.release.clear()
    producer = Producer(address, max_batch_records=1, max_in_flight=2)
    futures = [await producer.send(p) for p in payloads(3)]  # two in flight, one queued
    blocked = asyncio.ensure_future(producer.send(b"blocked"))
    await still_pending(blocked, "send() with the window full")
    fake.release.set()
    futures.append(await within(blocked, "send() once the window has room"))
    await producer.flush()
    assert [f.result() for f in futures] == [1, 2, 3, 4]
    await producer.close()


async def test_flush_waits_for_acks(serve: Serve) -> None:
    fake, address = await serve()
    fake.release.clear()
    producer = Producer(address, linger_ms=1000)
    future = await producer.send(b"x")
    flush = asyncio.ensure_future(producer.flush())
    await still_pending(flush, "flush() before the ack")
    assert not future.done()
    fake.release.set()
    await within(flush, "flush() after the ack")
    assert future.result() == 1
    await producer.close()


async def test_closed_producer_refuses_records(serve: Serve) -> None:
    _, address = await serve()
    producer = Producer(address)
    await producer.close()
    await producer.close()
    with pytest.raises(RequestError, match="closed"):
        await producer.send(b"late")


async def test_bad_settings_are_config_errors() -> None:
    from boomscooter.errors import ConfigError

    with pytest.raises(ConfigError, match="acks"):
        Producer("127.0.0.1:1", acks="all")
    with pytest.raises(ConfigError, match="max_in_flight"):
        Producer("127.0.0.1:1", max_in_flight=0)


# -- the sync producer -------------------------------------------------------------------


async def test_sync_producer_from_a_thread(serve: Serve) -> None:
    fake, address = await serve()

    def produce() -> list[int | None]:
        with SyncProducer(address, max_batch_records=50) as producer:
            futures = [producer.send(p) for p in payloads(500)]
            batch = producer.send_batch([Entry(1, b"tail")])
            producer.flush()
            assert isinstance(futures[0], concurrent.futures.Future)
            result = batch.result()
            assert result is not None and result.base_seqno == 501
            return [f.result() for f in futures]

    seqnos = await asyncio.to_thread(produce)
    assert seqnos == list(range(1, 501))
    assert [r.payload for r in fake.records] == [*payloads(500), b"tail"]


async def test_sync_producer_raises_the_failure_from_flush(serve: Serve) -> None:
    fake, address = await serve()

    def produce() -> None:
        producer = SyncProducer(address)
        try:
            producer.send_batch([Entry(1, b"x")], expected_first_seqno=9)
            with pytest.raises(ExpectedSeqnoError):
                producer.flush()
        finally:
            producer.close()

    await asyncio.to_thread(produce)
    assert fake.records == []


# -- the rpc edge ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "kwargs", "expected"),
    [
        (FAILED_PRECONDITION, {"leader_address": "h:1"}, NotLeaderError),
        (FAILED_PRECONDITION, {"next_seqno": 3}, ExpectedSeqnoError),
        ("FAILED_PRECONDITION", {}, RequestError),
        (grpc.StatusCode.OUT_OF_RANGE, {"first_seqno": 10}, TrimmedError),
        (UNAVAILABLE, {}, ServerUnavailableError),
        (grpc.StatusCode.CANCELLED, {}, ServerUnavailableError),
        (INVALID_ARGUMENT, {}, RequestError),
        (999, {}, ServerUnavailableError),  # unknown numbers are UNKNOWN
    ],
)
def test_status_codes_become_client_errors(
    code: Any, kwargs: dict[str, Any], expected: type[Exception]
) -> None:
    error = rpc.error_from_status(code, "why", **kwargs)
    assert type(error) is expected


def test_in_band_retriable_overrides_the_class_default() -> None:
    error = rpc.error_from_pb(pb.Error(code=INVALID_ARGUMENT, message="m", retriable=True))
    assert isinstance(error, RequestError) and error.retriable
    assert not RequestError("x").retriable
    redirect = rpc.error_from_pb(
        pb.Error(code=FAILED_PRECONDITION, message="m", leader_address="a:1")
    )
    assert isinstance(redirect, NotLeaderError) and redirect.leader_address == "a:1"


def test_channel_options_allow_large_messages() -> None:
    options = dict(rpc.channel_options(max_message_bytes=5 << 20))
    assert options["grpc.max_send_message_length"] == 5 << 20
    assert options["grpc.max_receive_message_length"] == 5 << 20
    assert options["grpc.keepalive_time_ms"] > 0


# -- against the real leader -------------------------------------------------------------


async def test_real_leader_contiguous_seqnos(tmp_path: Path) -> None:
    from boomscooter.node.config import NodeConfig
    from boomscooter.node.runtime import start_leader

    node = await start_leader(NodeConfig(data_dir=str(tmp_path / "d")))
    try:
        async with Producer(node.address, max_batch_records=100) as producer:
            futures = [await producer.send(p) for p in payloads(1000)]
            await producer.flush()
            batch = await (await producer.send_batch([Entry(5, b"z")], expected_first_seqno=1001))
        assert [f.result() for f in futures] == list(range(1, 1001))
        assert batch is not None and batch.base_seqno == 1001 and not batch.duplicate
    finally:
        await node.stop()


def _stored(node: Any) -> list[Record]:
    records: list[Record] = []
    while len(records) < node.log.last_seqno:
        for batch in node.log.read_batches(len(records) + 1, max_bytes=1 << 24):
            records += batch.records(len(records) + 1)
    return records


async def test_real_leader_restart_mid_stream_stores_every_record_once(
    tmp_path: Path, unused_tcp_port: int
) -> None:
    from boomscooter.node.config import NodeConfig
    from boomscooter.node.runtime import start_leader

    config = NodeConfig(data_dir=str(tmp_path / "d"), listen=f"127.0.0.1:{unused_tcp_port}")
    node = await start_leader(config)
    sent = payloads(3000)
    producer = Producer(node.address, max_batch_records=50, linger_ms=1, max_in_flight=8)
    halfway, resume = asyncio.Event(), asyncio.Event()

    async def produce() -> list[asyncio.Future[int | None]]:
        futures = []
        for i, p in enumerate(sent):
            futures.append(await producer.send(p))
            if i == len(sent) // 2:  # the restart lands mid-stream
                halfway.set()
                await resume.wait()
        await producer.flush()
        return futures

    task = asyncio.ensure_future(produce())
    await within(halfway.wait(), "half the records sent")
    await within(node.stop(grace_s=0), "the leader's stop")
    resume.set()  # the second half goes to a leader that is down, then back
    node = await within(start_leader(config), "the leader's restart")
    try:
        futures = await within(task, "every record acked")
        await producer.close()
        assert [f.result() for f in futures] == list(range(1, 3001))
        assert [r.payload for r in _stored(node)] == sent
        assert producer.reconnects >= 1
    finally:
        await node.stop()
