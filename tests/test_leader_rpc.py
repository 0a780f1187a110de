"""Every RPC of an in-process leader through raw gRPC stubs: good requests, every kind of
bad input (answered with the right code and a clear message, nothing stored changing),
the ack levels, health checking and reflection."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]
from grpc_reflection.v1alpha import (  # type: ignore[import-untyped]
    reflection_pb2,
    reflection_pb2_grpc,
)
from log_support import running_leader

from boomscooter.node.core import Appended, DedupeTable
from boomscooter.node.leader import LeaderNode
from boomscooter.storage import FsyncMode, FsyncPolicy, split_batches
from boomscooter.storage.batch import (
    MAX_CHANNEL_BYTES,
    Batch,
    Entry,
    Record,
    batch_crc,
    encode_batch,
)
from boomscooter.v1 import boomscooter_pb2 as pb
from boomscooter.v1 import boomscooter_pb2_grpc

if TYPE_CHECKING:
    from boomscooter.v1.boomscooter_pb2_grpc import BoomscooterAsyncStub

OK = grpc.StatusCode.OK
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
ALWAYS = FsyncPolicy(mode=FsyncMode.ALWAYS)
SMALL_BATCH_BYTES = 1024
SERVICE = "boomscooter.v1.Boomscooter"


@dataclass
class Leader:
    node: LeaderNode
    channel: grpc.aio.Channel
    stub: BoomscooterAsyncStub


StartLeader = Callable[..., Awaitable[Leader]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[StartLeader]:
    """``await start(**LeaderConfig options)``: a leader in ``tmp_path`` (fsync always, so
    the commit follows each append) and a channel to it; both closed after the test."""
    async with AsyncExitStack() as stack:

        async def starter(**options: Any) -> Leader:
            options.setdefault("fsync", ALWAYS)
            node = await stack.enter_async_context(running_leader(tmp_path, **options))
            channel = grpc.aio.insecure_channel(node.address)
            stack.push_async_callback(channel.close)
            return Leader(node, channel, boomscooter_pb2_grpc.BoomscooterStub(channel))

        yield starter


@pytest.fixture
async def leader(start: StartLeader) -> Leader:
    return await start(max_batch_bytes=SMALL_BATCH_BYTES, node_id="test-node")


def records(*payloads: bytes, channel: str | None = None, ts: int = 0) -> pb.RecordList:
    return pb.RecordList(
        records=[pb.Record(payload=p, channel=channel, timestamp_ms=ts) for p in payloads]
    )


def good(
    sequence: int, *payloads: bytes, ack: pb.AckLevel.ValueType = pb.ACK_LEVEL_LEADER
) -> pb.ProduceRequest:
    return pb.ProduceRequest(
        batch_sequence=sequence, ack_level=ack, record_list=records(*(payloads or (b"ok",)))
    )


async def produce(leader: Leader, *requests: pb.ProduceRequest) -> list[pb.ProduceResponse]:
    """Send ``requests`` on one Produce stream, half-close, read every response; the
    stream must end with OK."""
    call = leader.stub.Produce()
    for request in requests:
        await call.write(request)
    await call.done_writing()
    responses = [r async for r in call]
    assert await call.code() == OK
    return responses


async def fetch(leader: Leader, **fields: Any) -> pb.FetchResponse:
    return await leader.stub.Fetch(pb.FetchRequest(**fields))


def fetched(response: pb.FetchResponse | pb.SubscribeResponse) -> list[Record]:
    """The records a response means (``first_seqno`` … ``last_seqno`` of its batches)."""
    return [
        r
        for b in split_batches(response.batches)
        for r in b.records(response.first_seqno, response.last_seqno)
    ]


async def stored(leader: Leader) -> list[bytes]:
    response = await fetch(leader, from_seqno=1, include_uncommitted=True)
    return [r.payload for b in split_batches(response.batches) for r in b.records()]


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def encoded(*payloads: bytes, channel: str | None = None, base: int = 1, epoch: int = 0) -> bytes:
    batch = encode_batch([Entry(1, p, channel) for p in payloads], base_seqno=base, epoch=epoch)
    return bytes(batch.data)


def with_crc(raw: bytearray) -> bytes:
    """``raw`` with a CRC32C that matches it (so only the tampered content is wrong)."""
    struct.pack_into("<I", raw, 4, batch_crc(raw, 0, len(raw)))
    return bytes(raw)


def bad_crc() -> bytes:
    raw = bytearray(encoded(b"hello"))
    raw[-1] ^= 0xFF
    return bytes(raw)


def bad_utf8_channel() -> bytes:
    raw = bytearray(encoded(b"p", channel="ab"))
    at = raw.index(b"abp")
    raw[at : at + 2] = b"\xff\xfe"
    return with_crc(raw)


def bad_magic() -> bytes:
    raw = bytearray(encoded(b"p"))
    raw[8] = 0x00
    return with_crc(raw)


# -- Produce: bad input -----------------------------------------------------------------------

BAD: dict[str, tuple[pb.ProduceRequest, grpc.StatusCode, str]] = {
    "no records": (
        pb.ProduceRequest(batch_sequence=1, ack_level=pb.ACK_LEVEL_LEADER),
        INVALID_ARGUMENT,
        "needs records",
    ),
    "empty record_list": (
        pb.ProduceRequest(
            batch_sequence=1, ack_level=pb.ACK_LEVEL_LEADER, record_list=pb.RecordList()
        ),
        INVALID_ARGUMENT,
        "at least one record",
    ),
    "unknown ack level": (
        pb.ProduceRequest(batch_sequence=1, ack_level=99, record_list=records(b"x")),  # type: ignore[arg-type]
        INVALID_ARGUMENT,
        "unknown ack level 99",
    ),
    "empty encoded_batch": (
        pb.ProduceRequest(batch_sequence=1, ack_level=pb.ACK_LEVEL_LEADER, encoded_batch=b""),
        INVALID_ARGUMENT,
        "short batch header",
    ),
    "bad crc": (
        pb.ProduceRequest(batch_sequence=1, ack_level=pb.ACK_LEVEL_LEADER, encoded_batch=bad_crc()),
        INVALID_ARGUMENT,
        "CRC32C mismatch",
    ),
    "truncated in the header": (
        pb.ProduceRequest(
            batch_sequence=1, ack_level=pb.ACK_LEVEL_LEADER, encoded_batch=encoded(b"abc")[:30]
        ),
        INVALID_ARGUMENT,
        "short batch header: 30 bytes",
    ),
    "truncated in the records": (
        pb.ProduceRequest(
            batch_sequence=1, ack_level=pb.ACK_LEVEL_LEADER, encoded_batch=encoded(b"abc")[:-1]
        ),
        INVALID_ARGUMENT,
        "batch length",
    ),
    "trailing bytes": (
        pb.ProduceRequest(
            batch_sequence=1,
            ack_level=pb.ACK_LEVEL_LEADER,
            encoded_batch=encoded(b"a") + encoded(b"b"),
        ),
        INVALID_ARGUMENT,
        "batch length",
    ),
    "garbage": (
        pb.ProduceRequest(
            batch_sequence=1, ack_level=pb.ACK_LEVEL_LEADER, encoded_batch=b"\x07garbage" * 20
        ),
        INVALID_ARGUMENT,
        "bad batch magic",
    ),
    "bad magic with a good crc": (
        pb.ProduceRequest(
            batch_sequence=1, ack_level=pb.ACK_LEVEL_LEADER, encoded_batch=bad_magic()
        ),
        INVALID_ARGUMENT,
        "bad batch magic",
    ),
    "base seqno 0 placeholder": (
        pb.ProduceRequest(
            batch_sequence=1,
            ack_level=pb.ACK_LEVEL_LEADER,
            encoded_batch=with_crc(bytearray(encoded(b"x")[:16] + bytes(8) + encoded(b"x")[24:])),
        ),
        INVALID_ARGUMENT,
        "bad base seqno 0",
    ),
    "channel not utf-8": (
        pb.ProduceRequest(
            batch_sequence=1, ack_level=pb.ACK_LEVEL_LEADER, encoded_batch=bad_utf8_channel()
        ),
        INVALID_ARGUMENT,
        "not UTF-8",
    ),
    "oversized encoded_batch": (
        pb.ProduceRequest(
            batch_sequence=1,
            ack_level=pb.ACK_LEVEL_LEADER,
            encoded_batch=encoded(b"x" * SMALL_BATCH_BYTES),
        ),
        INVALID_ARGUMENT,
        f"exceeds the leader's limit of {SMALL_BATCH_BYTES} bytes",
    ),
    "oversized record_list": (
        pb.ProduceRequest(
            batch_sequence=1,
            ack_level=pb.ACK_LEVEL_LEADER,
            record_list=records(*[b"y" * 100] * 11),
        ),
        INVALID_ARGUMENT,
        f"exceeds the leader's limit of {SMALL_BATCH_BYTES} bytes",
    ),
    "channel too long": (
        pb.ProduceRequest(
            batch_sequence=1,
            ack_level=pb.ACK_LEVEL_LEADER,
            record_list=records(b"x", channel="c" * (MAX_CHANNEL_BYTES + 1)),
        ),
        INVALID_ARGUMENT,
        f"channel is longer than {MAX_CHANNEL_BYTES} bytes",
    ),
    "producer_id too long": (
        pb.ProduceRequest(
            producer_id="p" * 129,
            batch_sequence=1,
            ack_level=pb.ACK_LEVEL_LEADER,
            record_list=records(b"x"),
        ),
        INVALID_ARGUMENT,
        "longer than 128 bytes",
    ),
    "expected_first_seqno mismatch": (
        pb.ProduceRequest(
            batch_sequence=1,
            ack_level=pb.ACK_LEVEL_LEADER,
            expected_first_seqno=5,
            record_list=records(b"x"),
        ),
        FAILED_PRECONDITION,
        "expected first seqno 5, but the log continues at 1",
    ),
}


def bad_request(name: str, sequence: int, **fields: Any) -> pb.ProduceRequest:
    """A fresh copy of the bad request ``name`` (the table's messages stay untouched)."""
    request = pb.ProduceRequest()
    request.CopyFrom(BAD[name][0])
    request.batch_sequence = sequence
    for field_name, value in fields.items():
        setattr(request, field_name, value)
    return request


@pytest.mark.parametrize("name", list(BAD))
async def test_bad_batch_is_refused_in_band_and_the_stream_goes_on(
    leader: Leader, name: str
) -> None:
    _, code, message = BAD[name]
    bad = bad_request(name, 7)
    responses = await produce(leader, bad, good(8, b"after"))
    assert len(responses) == 2
    refused, acked = responses
    assert refused.batch_sequence == 7
    assert refused.WhichOneof("result") == "error", refused
    assert refused.error.code == code.value[0]
    assert message in refused.error.message
    assert not refused.error.retriable
    if code is FAILED_PRECONDITION:
        assert refused.error.HasField("next_seqno")
        assert refused.error.next_seqno == 1
    else:
        assert not refused.error.HasField("next_seqno")
    assert acked.batch_sequence == 8
    assert acked.WhichOneof("result") == "ack", acked
    assert (acked.ack.base_seqno, acked.ack.record_count) == (1, 1)  # nothing stored before
    assert leader.node.log.last_seqno == 1
    assert await stored(leader) == [b"after"]
    assert leader.node.counters["rejected"] == 1
    assert leader.node.counters["batches"] == 1


async def test_expected_first_seqno_mismatch_names_the_next_seqno(leader: Leader) -> None:
    request = good(1, b"a", b"b", b"c")
    request.expected_first_seqno = 1
    (first,) = await produce(leader, request)
    assert first.ack.base_seqno == 1
    late = good(2, b"d")
    late.expected_first_seqno = 2  # the log continues at 4
    right = good(3, b"e")
    right.expected_first_seqno = 4
    refused, acked = await produce(leader, late, right)
    assert refused.error.code == 9
    assert refused.error.next_seqno == 4
    assert "expected first seqno 2, but the log continues at 4" in refused.error.message
    assert (acked.ack.base_seqno, acked.batch_sequence) == (4, 3)
    assert await stored(leader) == [b"a", b"b", b"c", b"e"]


async def test_several_bad_batches_in_a_row(leader: Leader) -> None:
    names = ("garbage", "bad crc", "no records", "channel too long")
    requests = [bad_request(name, sequence) for sequence, name in enumerate(names, 1)]
    responses = await produce(leader, good(10, b"a"), *requests, good(11, b"b"))
    assert [r.WhichOneof("result") for r in responses] == ["ack", *["error"] * 4, "ack"]
    assert [r.batch_sequence for r in responses] == [10, 1, 2, 3, 4, 11]
    assert responses[-1].ack.base_seqno == 2
    assert leader.node.log.last_seqno == 2


async def test_a_batch_at_the_size_limit_is_accepted(leader: Leader) -> None:
    data = encoded(b"")
    payload = b"z" * (SMALL_BATCH_BYTES - len(data))
    exact = encoded(payload)
    assert len(exact) == SMALL_BATCH_BYTES
    request = pb.ProduceRequest(
        batch_sequence=1, ack_level=pb.ACK_LEVEL_LEADER, encoded_batch=exact
    )
    (response,) = await produce(leader, request)
    assert response.WhichOneof("result") == "ack", response
    assert await stored(leader) == [payload]


async def test_encoded_batch_is_restamped(leader: Leader) -> None:
    await produce(leader, good(1, b"first"))
    request = pb.ProduceRequest(
        batch_sequence=2,
        ack_level=pb.ACK_LEVEL_LEADER,
        encoded_batch=encoded(b"x", b"y", channel="orders", base=77, epoch=9),
    )
    (response,) = await produce(leader, request)
    assert (response.ack.base_seqno, response.ack.record_count) == (2, 2)
    assert response.ack.epoch == leader.node.epoch == 1
    reply = await fetch(leader, from_seqno=2)
    (batch,) = split_batches(reply.batches)
    assert (batch.base_seqno, batch.epoch) == (2, 1)
    assert [(r.seqno, r.channel, r.payload) for r in batch.records()] == [
        (2, "orders", b"x"),
        (3, "orders", b"y"),
    ]


async def test_record_list_fields_are_stored(leader: Leader) -> None:
    request = pb.ProduceRequest(
        batch_sequence=1,
        ack_level=pb.ACK_LEVEL_LEADER,
        record_list=pb.RecordList(
            records=[
                pb.Record(timestamp_ms=1234, payload=b"a", channel="c/1", key=b"k"),
                pb.Record(timestamp_ms=1235, payload=b"b", channel="", key=b""),
                pb.Record(timestamp_ms=0, payload=b""),
            ]
        ),
    )
    (response,) = await produce(leader, request)
    assert response.ack.record_count == 3
    got = fetched(await fetch(leader, from_seqno=1))
    assert [(r.timestamp_ms, r.channel, r.key, r.payload) for r in got[:2]] == [
        (1234, "c/1", b"k", b"a"),
        (1235, "", b"", b"b"),
    ]
    assert (got[2].channel, got[2].key, got[2].payload) == (None, None, b"")
    assert got[2].timestamp_ms > 1_600_000_000_000  # 0 asks the leader to stamp its clock


async def test_duplicate_on_one_stream(leader: Leader) -> None:
    def batch(sequence: int, payload: bytes) -> pb.ProduceRequest:
        request = good(sequence, payload)
        request.producer_id = "p-1"
        return request

    responses = await produce(leader, batch(1, b"a"), batch(2, b"b"), batch(1, b"again"))
    assert [(r.ack.base_seqno, r.ack.duplicate) for r in responses] == [
        (1, False),
        (2, False),
        (1, True),
    ]
    assert await stored(leader) == [b"a", b"b"]


async def test_a_refused_batch_can_be_retried_under_its_sequence(leader: Leader) -> None:
    bad = bad_request("bad crc", 1, producer_id="p-1")
    retry = good(1, b"fixed")
    retry.producer_id = "p-1"
    refused, acked = await produce(leader, bad, retry)
    assert refused.WhichOneof("result") == "error"
    assert (acked.ack.base_seqno, acked.ack.duplicate) == (1, False)  # not remembered
    assert leader.node.dedupe.lookup("p-1", 1) == Appended(1, 1, 1)
    assert await stored(leader) == [b"fixed"]


async def test_a_sequence_below_the_dedupe_window_is_refused(leader: Leader) -> None:
    leader.node.dedupe = DedupeTable(window=2)

    def batch(sequence: int) -> pb.ProduceRequest:
        request = good(sequence, b"s%d" % sequence)
        request.producer_id = "p-1"
        return request

    responses = await produce(leader, *[batch(s) for s in (1, 2, 3, 4)], batch(2), batch(3))
    refused, duplicate = responses[4:]
    assert refused.batch_sequence == 2
    assert refused.error.code == FAILED_PRECONDITION.value[0]
    assert "older than the dedupe window" in refused.error.message
    assert not refused.error.retriable
    assert (duplicate.ack.base_seqno, duplicate.ack.duplicate) == (3, True)
    assert leader.node.log.last_seqno == 4


# -- Produce: ack levels ----------------------------------------------------------------------


async def test_ack_none_answers_only_failures(leader: Leader) -> None:
    bad = bad_request("garbage", 2, ack_level=pb.ACK_LEVEL_NONE)
    responses = await produce(
        leader,
        good(1, b"a", ack=pb.ACK_LEVEL_NONE),
        bad,
        good(3, b"b", ack=pb.ACK_LEVEL_NONE),
    )
    assert [(r.batch_sequence, r.WhichOneof("result")) for r in responses] == [(2, "error")]
    assert await stored(leader) == [b"a", b"b"]


async def test_ack_none_good_batches_get_no_response(leader: Leader) -> None:
    responses = await produce(leader, *[good(s, ack=pb.ACK_LEVEL_NONE) for s in range(1, 6)])
    assert responses == []
    assert leader.node.log.last_seqno == 5


@pytest.mark.parametrize(
    "ack", [pb.ACK_LEVEL_LEADER, pb.ACK_LEVEL_QUORUM, pb.ACK_LEVEL_UNSPECIFIED]
)
async def test_leader_and_quorum_acks(leader: Leader, ack: pb.AckLevel.ValueType) -> None:
    responses = await produce(leader, good(1, b"a", b"b", ack=ack), good(2, b"c", ack=ack))
    assert [(r.batch_sequence, r.ack.base_seqno, r.ack.record_count) for r in responses] == [
        (1, 1, 2),
        (2, 3, 1),
    ]
    for response in responses:
        assert response.ack.epoch == 1
        assert not response.ack.duplicate
        last = response.ack.base_seqno + response.ack.record_count - 1
        assert response.ack.commit_seqno >= last  # min_insync 1: the leader's copy commits


async def test_quorum_ack_waits_for_the_interval_fsync(start: StartLeader) -> None:
    leader = await start(fsync=FsyncPolicy(mode=FsyncMode.INTERVAL, interval_ms=50))
    responses = await produce(leader, *[good(s, ack=pb.ACK_LEVEL_QUORUM) for s in range(1, 4)])
    assert [r.ack.base_seqno for r in responses] == [1, 2, 3]
    for response in responses:
        assert response.ack.commit_seqno >= response.ack.base_seqno
    assert leader.node.log.durable_seqno >= 3


async def test_min_insync_two_refuses_quorum_and_stores_leader_batches(
    start: StartLeader,
) -> None:
    leader = await start(min_insync=2)
    responses = await produce(
        leader,
        good(1, b"q", ack=pb.ACK_LEVEL_QUORUM),
        good(2, b"unspecified means quorum", ack=pb.ACK_LEVEL_UNSPECIFIED),
        good(3, b"l", ack=pb.ACK_LEVEL_LEADER),
        good(4, b"n", ack=pb.ACK_LEVEL_NONE),
    )
    by_sequence = {r.batch_sequence: r for r in responses}
    assert sorted(by_sequence) == [1, 2, 3]  # none for the ACK_LEVEL_NONE batch
    for sequence in (1, 2):
        error = by_sequence[sequence].error
        assert error.code == 14  # UNAVAILABLE
        assert error.retriable
        assert "acks=quorum needs 2 in-sync copies, 1 available" in error.message
    ack = by_sequence[3].ack
    assert (ack.base_seqno, ack.record_count, ack.commit_seqno) == (1, 1, 0)
    assert leader.node.log.last_seqno == 2
    assert leader.node.commit_seqno == 0
    assert await stored(leader) == [b"l", b"n"]
    nothing = await fetch(leader, from_seqno=1)  # committed only: nothing is
    assert nothing.batches == b""
    assert (nothing.commit_seqno, nothing.log_last_seqno) == (0, 2)


# -- Fetch ------------------------------------------------------------------------------------


async def three_batches(leader: Leader) -> None:
    """Seqnos 1..3, 4..5, 6 with payloads p1 … p6."""
    await produce(
        leader,
        good(1, b"p1", b"p2", b"p3"),
        good(2, b"p4", b"p5"),
        good(3, b"p6"),
    )


async def test_fetch_range(leader: Leader) -> None:
    await three_batches(leader)
    whole = await fetch(leader, from_seqno=1)
    assert [r.payload for r in fetched(whole)] == [b"p%d" % i for i in range(1, 7)]
    assert (whole.first_seqno, whole.last_seqno) == (1, 6)
    assert (whole.commit_seqno, whole.log_last_seqno) == (6, 6)
    middle = await fetch(leader, from_seqno=2, to_seqno=4)
    assert [b.base_seqno for b in split_batches(middle.batches)] == [1, 4]  # whole batches
    assert (middle.first_seqno, middle.last_seqno) == (2, 4)
    assert [r.seqno for r in fetched(middle)] == [2, 3, 4]
    one = await fetch(leader, from_seqno=6, to_seqno=6)
    assert [r.payload for r in fetched(one)] == [b"p6"]


async def test_fetch_from_seqno_zero_is_invalid(leader: Leader) -> None:
    error = await rpc_error(fetch(leader, from_seqno=0))
    assert error.code() == INVALID_ARGUMENT
    assert "from_seqno must be at least 1" in (error.details() or "")


async def test_fetch_to_below_from_is_invalid(leader: Leader) -> None:
    await three_batches(leader)
    error = await rpc_error(fetch(leader, from_seqno=4, to_seqno=3))
    assert error.code() == INVALID_ARGUMENT
    assert "to_seqno 3 is below from_seqno 4" in (error.details() or "")


@pytest.mark.parametrize("start_seqno", [7, 1000, 2**64 - 1])
async def test_fetch_past_the_end_is_empty(leader: Leader, start_seqno: int) -> None:
    await three_batches(leader)
    response = await fetch(leader, from_seqno=start_seqno)
    assert response.batches == b""
    assert (response.first_seqno, response.last_seqno) == (0, 0)
    assert (response.commit_seqno, response.log_last_seqno) == (6, 6)


async def test_fetch_on_an_empty_log(leader: Leader) -> None:
    response = await fetch(leader, from_seqno=1, include_uncommitted=True)
    assert response == pb.FetchResponse()


async def test_fetch_max_bytes(leader: Leader) -> None:
    await three_batches(leader)
    huge = await fetch(leader, from_seqno=1, max_bytes=2**32 - 1)  # capped, still works
    assert [r.seqno for r in fetched(huge)] == [1, 2, 3, 4, 5, 6]
    tiny = await fetch(leader, from_seqno=1, max_bytes=1)  # at least one batch
    assert [b.base_seqno for b in split_batches(tiny.batches)] == [1]
    assert (tiny.first_seqno, tiny.last_seqno) == (1, 3)
    rest = await fetch(leader, from_seqno=tiny.last_seqno + 1, max_bytes=1)
    assert (rest.first_seqno, rest.last_seqno) == (4, 5)


async def test_fetch_include_uncommitted(start: StartLeader) -> None:
    leader = await start(min_insync=2)  # nothing ever commits
    await produce(leader, good(1, b"a", b"b"))
    committed = await fetch(leader, from_seqno=1)
    assert committed.batches == b""
    assert (committed.commit_seqno, committed.log_last_seqno) == (0, 2)
    everything = await fetch(leader, from_seqno=1, include_uncommitted=True)
    assert [r.payload for r in fetched(everything)] == [b"a", b"b"]
    bounded = await fetch(leader, from_seqno=1, to_seqno=1, include_uncommitted=True)
    assert [r.payload for r in fetched(bounded)] == [b"a"]


# -- Subscribe --------------------------------------------------------------------------------


async def subscribe(
    leader: Leader, timeout_s: float = 1.5, **fields: Any
) -> list[pb.SubscribeResponse]:
    """Every response of a Subscribe stream that must end (with OK) within ``timeout_s``."""
    call = leader.stub.Subscribe(pb.SubscribeRequest(**fields))

    async def read() -> list[pb.SubscribeResponse]:
        return [r async for r in call]

    try:
        responses = await asyncio.wait_for(read(), timeout_s)
    finally:
        call.cancel()
    assert await call.code() == OK
    return responses


def delivered(responses: list[pb.SubscribeResponse], prefix: str | None = None) -> list[int]:
    out = []
    for response in responses:
        if not response.batches:
            continue
        for record in fetched(response):
            if prefix is None or (record.channel is not None and record.channel.startswith(prefix)):
                out.append(record.seqno)
    return out


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"seqno": 0}, "start seqno must be at least 1"),
        ({"seqno": 1, "count": 0}, "count must be at least 1"),
        ({"seqno": 5, "until_seqno": 3}, "until_seqno 3 is before the start 5"),
        ({"earliest": True, "count": 0}, "count must be at least 1"),
    ],
)
async def test_subscribe_bad_requests(leader: Leader, fields: dict[str, Any], message: str) -> None:
    await three_batches(leader)
    error = await rpc_error(subscribe(leader, **fields))
    assert error.code() == INVALID_ARGUMENT
    assert message in (error.details() or "")


async def test_subscribe_until(leader: Leader) -> None:
    await three_batches(leader)
    responses = await subscribe(leader, seqno=2, until_seqno=5)
    assert delivered(responses) == [2, 3, 4, 5]
    assert responses[0].first_seqno == 2
    assert responses[-1].last_seqno == 5
    assert all(r.commit_seqno == 6 for r in responses)


async def test_subscribe_until_just_before_the_start_is_empty(leader: Leader) -> None:
    await three_batches(leader)
    assert await subscribe(leader, seqno=4, until_seqno=3) == []


async def test_subscribe_count(leader: Leader) -> None:
    await three_batches(leader)
    responses = await subscribe(leader, seqno=3, count=2)
    assert delivered(responses) == [3, 4]
    assert responses[-1].last_seqno == 4


async def test_subscribe_earliest(leader: Leader) -> None:
    await three_batches(leader)
    responses = await subscribe(leader, earliest=True, until_seqno=6)
    assert delivered(responses) == [1, 2, 3, 4, 5, 6]


async def test_subscribe_latest_waits_for_new_records(leader: Leader) -> None:
    await three_batches(leader)
    call = leader.stub.Subscribe(pb.SubscribeRequest(latest=True, count=2))
    try:
        await asyncio.sleep(0.05)  # let the subscription start at commit + 1 = 7
        await produce(leader, good(4, b"p7"), good(5, b"p8", b"p9"))
        responses = await asyncio.wait_for(_collect(call), 1.5)
    finally:
        call.cancel()
    assert await call.code() == OK
    assert delivered(responses) == [7, 8]


async def _collect(call: Any) -> list[pb.SubscribeResponse]:
    return [r async for r in call]


async def test_subscribe_by_time(leader: Leader) -> None:
    await produce(
        leader,
        pb.ProduceRequest(
            batch_sequence=1, ack_level=pb.ACK_LEVEL_LEADER, record_list=records(b"a", ts=1000)
        ),
        pb.ProduceRequest(
            batch_sequence=2, ack_level=pb.ACK_LEVEL_LEADER, record_list=records(b"b", ts=2000)
        ),
        pb.ProduceRequest(
            batch_sequence=3, ack_level=pb.ACK_LEVEL_LEADER, record_list=records(b"c", ts=3000)
        ),
    )
    assert delivered(await subscribe(leader, time_ms=1500, until_seqno=3)) == [2, 3]
    assert delivered(await subscribe(leader, time_ms=2000, until_seqno=3)) == [2, 3]
    assert delivered(await subscribe(leader, time_ms=0, until_seqno=3)) == [1, 2, 3]
    # after every record: starts at the next seqno, so an until of 3 is an empty range
    assert await subscribe(leader, time_ms=10_000, until_seqno=3) == []


async def test_subscribe_channel_prefix(leader: Leader) -> None:
    await produce(
        leader,
        pb.ProduceRequest(
            batch_sequence=1,
            ack_level=pb.ACK_LEVEL_LEADER,
            record_list=records(b"1", b"2", channel="orders/eu"),
        ),
        pb.ProduceRequest(
            batch_sequence=2, ack_level=pb.ACK_LEVEL_LEADER, record_list=records(b"3", b"4")
        ),
        pb.ProduceRequest(
            batch_sequence=3,
            ack_level=pb.ACK_LEVEL_LEADER,
            record_list=records(b"5", channel="billing"),
        ),
        pb.ProduceRequest(
            batch_sequence=4,
            ack_level=pb.ACK_LEVEL_LEADER,
            record_list=records(b"6", channel="orders/us"),
        ),
        pb.ProduceRequest(
            batch_sequence=5, ack_level=pb.ACK_LEVEL_LEADER, record_list=records(b"7", channel="")
        ),
    )
    responses = await subscribe(leader, seqno=1, until_seqno=7, channel_prefix="orders/")
    sent = [b.base_seqno for r in responses for b in split_batches(r.batches)]
    assert sent == [1, 6]  # batches without a match are not sent
    assert delivered(responses, "orders/") == [1, 2, 6]
    anything = await subscribe(leader, seqno=1, until_seqno=7, channel_prefix="")
    assert [b.base_seqno for r in anything for b in split_batches(r.batches)] == [1, 5, 6, 7]
    assert delivered(anything, "") == [1, 2, 5, 6, 7]
    counted = await subscribe(leader, seqno=1, count=3, channel_prefix="orders/")
    assert delivered(counted, "orders/") == [1, 2, 6]
    assert counted[-1].last_seqno == 6


# -- Handshake, Status, Notifications ---------------------------------------------------------


async def test_handshake(leader: Leader) -> None:
    node = leader.node
    empty = await leader.stub.Handshake(pb.HandshakeRequest(subscriber_id="me"))
    assert (empty.first_seqno, empty.last_seqno, empty.commit_seqno) == (1, 0, 0)
    await three_batches(leader)
    response = await leader.stub.Handshake(pb.HandshakeRequest())
    session = response.session
    group, _, port = node.config.group.rpartition(":")
    assert (session.group, session.port) == (group, int(port))
    assert session.cast_id == session.epoch == node.epoch == 1
    assert session.page_size_bytes == node.config.page_size_bytes
    assert session.interface_hint == "127.0.0.1"
    assert session.heartbeat_interval_ms == 50
    assert (response.first_seqno, response.last_seqno, response.commit_seqno) == (1, 6, 6)


async def test_handshake_page_size(start: StartLeader) -> None:
    leader = await start(page_size_bytes=1400)
    response = await leader.stub.Handshake(pb.HandshakeRequest())
    assert response.session.page_size_bytes == 1400


async def test_status(leader: Leader) -> None:
    await three_batches(leader)
    status = await leader.stub.Status(pb.StatusRequest())
    assert status.role == pb.ROLE_LEADER
    assert status.node_id == "test-node"
    assert status.epoch == 1
    assert (status.first_seqno, status.last_seqno, status.commit_seqno) == (1, 6, 6)
    assert status.durable_seqno == 6
    assert status.leader_address == leader.node.address
    assert status.min_insync == 1
    assert status.log_bytes >= sum(
        len(b.data) for b in split_batches((await fetch(leader, from_seqno=1)).batches)
    )
    assert status.segment_count == 1
    assert list(status.replicas) == []


async def test_notifications_one_per_change(leader: Leader) -> None:
    call = leader.stub.Notifications(pb.NotificationsRequest())
    try:
        first = await asyncio.wait_for(call.read(), 0.5)  # immediately
        assert isinstance(first, pb.NotificationsResponse)
        assert (first.last_seqno, first.commit_seqno, first.first_seqno) == (0, 0, 1)
        assert first.log_dir == str(leader.node.log.directory)
        name, size = leader.node.segment_files()[-1]
        assert (first.segment_file, first.file_size_bytes) == (name, size)
        for sequence in (1, 2, 3):
            await produce(leader, good(sequence, b"x", b"y"))
            message = await asyncio.wait_for(call.read(), 1.0)
            assert isinstance(message, pb.NotificationsResponse)
            assert (message.last_seqno, message.commit_seqno) == (2 * sequence, 2 * sequence)
            assert message.file_size_bytes == leader.node.segment_files()[-1][1] > size
        with pytest.raises(TimeoutError):  # nothing changed: nothing is sent
            await asyncio.wait_for(call.read(), 0.3)
    finally:
        call.cancel()


async def test_notifications_min_interval_coalesces(leader: Leader) -> None:
    call = leader.stub.Notifications(pb.NotificationsRequest(min_interval_ms=400))
    try:
        loop = asyncio.get_running_loop()
        first = await asyncio.wait_for(call.read(), 0.5)
        assert isinstance(first, pb.NotificationsResponse)
        began = loop.time()
        assert first.last_seqno == 0
        await produce(leader, *[good(s, b"r") for s in range(1, 6)])  # five changes
        message = await asyncio.wait_for(call.read(), 1.0)
        assert isinstance(message, pb.NotificationsResponse)
        assert loop.time() - began >= 0.35  # held back for the interval
        assert message.last_seqno == 5  # all five in one message
        assert message.commit_seqno == 5
    finally:
        call.cancel()


# -- Replicate, health, reflection ------------------------------------------------------------


async def test_replicate_is_unimplemented(leader: Leader) -> None:
    call = leader.stub.Replicate()
    await call.write(pb.ReplicateRequest(replica_id="r1", address="127.0.0.1:1"))
    await call.done_writing()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "not supported" in (info.value.details() or "")


@pytest.mark.parametrize("service", ["", SERVICE])
async def test_health_check_serving(leader: Leader, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(leader.channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_check_unknown_service(leader: Leader) -> None:
    stub = health_pb2_grpc.HealthStub(leader.channel)
    error = await rpc_error(stub.Check(health_pb2.HealthCheckRequest(service="nope.v1.Nope")))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_the_service(leader: Leader) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(leader.channel)
    call = stub.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE))
    await call.done_writing()
    listed, described = [r async for r in call]
    names = {s.name for s in listed.list_services_response.service}
    assert SERVICE in names
    assert "grpc.health.v1.Health" in names
    protos = described.file_descriptor_response.file_descriptor_proto
    assert protos and any(b"Produce" in p for p in protos)


# -- a closing check: bad input leaves everything as it was -----------------------------------


async def test_bad_input_changes_nothing(leader: Leader) -> None:
    await three_batches(leader)
    before_status = await leader.stub.Status(pb.StatusRequest())
    before = await fetch(leader, from_seqno=1)
    bad = [bad_request(name, sequence) for sequence, name in enumerate(BAD, 100)]
    responses = await produce(leader, *bad)
    assert len(responses) == len(BAD)
    assert all(r.WhichOneof("result") == "error" for r in responses)
    after = await fetch(leader, from_seqno=1)
    assert after == before
    after_status = await leader.stub.Status(pb.StatusRequest())
    assert after_status.last_seqno == before_status.last_seqno == 6
    assert after_status.log_bytes == before_status.log_bytes
    assert Batch.from_bytes(split_batches(after.batches)[-1].data).last_seqno == 6


async def test_notifications_log_dir_is_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with running_leader(Path("data"), fsync=ALWAYS) as node:
        channel = grpc.aio.insecure_channel(node.address)
        try:
            stub = boomscooter_pb2_grpc.BoomscooterStub(channel)
            call = stub.Notifications(pb.NotificationsRequest())
            try:
                first = await asyncio.wait_for(call.read(), 0.5)
            finally:
                call.cancel()
        finally:
            await channel.close()
    assert isinstance(first, pb.NotificationsResponse)
    assert first.log_dir == str(tmp_path / "data")


async def test_notifications_announce_the_committed_end_not_the_file_end(tmp_path: Path) -> None:
    """Under fsync=interval a batch is in the file before it is durable (committed): the
    announced (file, size) stops before it, so a LogReader honouring it reads only
    committed records."""
    from boomscooter.storage import Entry, LogReader

    slow = FsyncPolicy(mode=FsyncMode.INTERVAL, interval_ms=60_000)
    async with running_leader(tmp_path / "log", fsync=slow) as node:
        from boomscooter.node.leader import ProduceBatch

        def batch(sequence: int) -> ProduceBatch:
            return ProduceBatch(
                producer_id="p",
                batch_sequence=sequence,
                expected_first_seqno=None,
                entries=[Entry(1, b"x%d" % sequence)] * 3,
            )

        await node.append(batch(1))  # the syncer's first sync comes at once …
        assert await node.wait_commit(3, 5)
        await node.append(batch(2))  # … the next not for a minute
        assert (node.log.last_seqno, node.commit_seqno) == (6, 3)
        name, size = node.committed_end()
        active, file_size = node.log.active_segment()
        assert name == active and size < file_size
        channel = grpc.aio.insecure_channel(node.address)
        try:
            stub = boomscooter_pb2_grpc.BoomscooterStub(channel)
            call = stub.Notifications(pb.NotificationsRequest())
            note = await asyncio.wait_for(call.read(), 1)
            call.cancel()
            assert isinstance(note, pb.NotificationsResponse)
        finally:
            await channel.close()
        assert (note.segment_file, note.file_size_bytes) == (name, size)
        assert (note.last_seqno, note.commit_seqno) == (6, 3)
        with LogReader(node.log_dir, from_seqno=1) as reader:
            reader.notify(note.segment_file, note.file_size_bytes)
            seqnos = [r.seqno for b in reader.read_batches() for r in b.records()]
        assert seqnos == [1, 2, 3]
