"""Produce on an in-process leader through raw gRPC stubs: good batches, every kind of bad
input (answered in-band with the right code and a clear message, nothing stored changing),
deduplication and the ack levels. The reading RPCs: test_leader_reads.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from boomscooter.node.core import Appended, DedupeTable
from boomscooter.storage import FsyncMode, FsyncPolicy, split_batches
from boomscooter.storage.batch import (
    MAX_CHANNEL_BYTES,
    Batch,
)
from boomscooter.v1 import boomscooter_pb2 as pb

from support.leader_rpc import (
    FAILED_PRECONDITION,
    INVALID_ARGUMENT,
    SMALL_BATCH_BYTES,
    Leader,
    StartLeader,
    bad_crc,
    bad_magic,
    bad_utf8_channel,
    default_leader,
    encoded,
    fetch,
    fetched,
    good,
    leader_starter,
    produce,
    records,
    stored,
    three_batches,
    with_crc,
)

if TYPE_CHECKING:
    pass


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[StartLeader]:
    async with leader_starter(tmp_path) as starter:
        yield starter


@pytest.fixture
async def leader(start: StartLeader) -> Leader:
    return await default_leader(start)


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
    # Errors are answered at once; acks when due (fsync=always: after the group fdatasync).
    errors = [r.batch_sequence for r in responses if r.WhichOneof("result") == "error"]
    acks = [r for r in responses if r.WhichOneof("result") == "ack"]
    assert errors == [1, 2, 3, 4] and [r.batch_sequence for r in acks] == [10, 11]
    responses = acks
    assert responses[-1].ack.base_seqno == 2
    assert leader.node.log.last_seqno == 2 == leader.node.log.durable_seqno


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
    leader.node.machine.dedupe = DedupeTable(window=2)

    def batch(sequence: int) -> pb.ProduceRequest:
        request = good(sequence, b"s%d" % sequence)
        request.producer_id = "p-1"
        return request

    responses = await produce(leader, *[batch(s) for s in (1, 2, 3, 4)], batch(2), batch(3))
    # The error is answered at once, acks after the group fdatasync: match by sequence.
    (refused,) = [r for r in responses if r.WhichOneof("result") == "error"]
    duplicate = [r for r in responses if r.batch_sequence == 3][-1]
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
