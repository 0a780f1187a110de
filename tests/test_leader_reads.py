"""The reading RPCs of an in-process leader through raw gRPC stubs (Fetch, Subscribe,
Handshake, Status, Notifications), Replicate, health checking and reflection; bad input is
answered with the right code and a clear message."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]
from grpc_reflection.v1alpha import (  # type: ignore[import-untyped]
    reflection_pb2,
    reflection_pb2_grpc,
)

from boomscooter.storage import FsyncMode, FsyncPolicy, split_batches
from boomscooter.v1 import boomscooter_pb2 as pb
from boomscooter.v1 import boomscooter_pb2_grpc

from support.leader_rpc import (
    ALWAYS,
    INVALID_ARGUMENT,
    OK,
    SERVICE,
    Leader,
    StartLeader,
    default_leader,
    fetch,
    fetched,
    good,
    leader_starter,
    produce,
    records,
    rpc_error,
    three_batches,
)
from support.log import running_leader
from support.waiting import stays_quiet, within

if TYPE_CHECKING:
    pass


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[StartLeader]:
    async with leader_starter(tmp_path) as starter:
        yield starter


@pytest.fixture
async def leader(start: StartLeader) -> Leader:
    return await default_leader(start)


# -- Fetch ------------------------------------------------------------------------------------


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


async def subscribe(leader: Leader, **fields: Any) -> list[pb.SubscribeResponse]:
    """Every response of a Subscribe stream that must end (with OK)."""
    call = leader.stub.Subscribe(pb.SubscribeRequest(**fields))
    try:
        responses = await within(_collect(call), f"the end of Subscribe({fields})")
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
        # An idle subscription's first message is a heartbeat (after a second): by then it
        # has taken its start, commit + 1 = 7.
        idle = await within(call.read(), "the idle subscription's heartbeat")
        assert isinstance(idle, pb.SubscribeResponse)
        assert (idle.batches, idle.commit_seqno) == (b"", 6)
        await produce(leader, good(4, b"p7"), good(5, b"p8", b"p9"))
        responses = await within(_collect(call), "the two new records")
    finally:
        call.cancel()
    assert await call.code() == OK
    assert delivered(responses) == [7, 8]


async def _collect(call: Any) -> list[pb.SubscribeResponse]:
    """Every response up to the end of the stream (read(): the tests read some first)."""
    responses = []
    while (response := await call.read()) != grpc.aio.EOF:
        responses.append(response)
    return responses


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
        first = await within(call.read(), "the first notification")
        assert isinstance(first, pb.NotificationsResponse)
        assert (first.last_seqno, first.commit_seqno, first.first_seqno) == (0, 0, 1)
        assert first.log_dir == str(leader.node.log.directory)
        name, size = leader.node.segment_files()[-1]
        assert (first.segment_file, first.file_size_bytes) == (name, size)
        for sequence in (1, 2, 3):
            await produce(leader, good(sequence, b"x", b"y"))
            # The append and its commit (the group fdatasync) may be two changes.
            message = await within(call.read(), f"the notification of batch {sequence}")
            assert isinstance(message, pb.NotificationsResponse)
            if message.commit_seqno < 2 * sequence:
                assert message.last_seqno == 2 * sequence
                message = await within(call.read(), f"the commit of batch {sequence}")
                assert isinstance(message, pb.NotificationsResponse)
            assert (message.last_seqno, message.commit_seqno) == (2 * sequence, 2 * sequence)
            assert message.file_size_bytes == leader.node.segment_files()[-1][1] > size
        # Every change above has been announced: nothing changes, nothing is sent.
        await stays_quiet(call.read(), "a notification without a change")
    finally:
        call.cancel()


async def test_notifications_min_interval_coalesces(leader: Leader) -> None:
    interval_s = 1.0
    call = leader.stub.Notifications(pb.NotificationsRequest(min_interval_ms=1000))
    try:
        loop = asyncio.get_running_loop()
        first = await within(call.read(), "the first notification")
        assert isinstance(first, pb.NotificationsResponse)
        assert first.last_seqno == 0
        times = [loop.time()]
        await produce(leader, *[good(s, b"r") for s in range(1, 6)])  # five changes
        messages: list[pb.NotificationsResponse] = []
        while not messages or (messages[-1].last_seqno, messages[-1].commit_seqno) != (5, 5):
            message = await within(call.read(), "the notifications of the five changes")
            assert isinstance(message, pb.NotificationsResponse)
            times.append(loop.time())
            messages.append(message)
        # Held back for the interval each time, so five changes a few milliseconds apart are
        # coalesced. (Seen from here a gap can be shorter than the server's by how late the
        # earlier message was read: half the interval is left for that.)
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert all(gap >= 0.5 * interval_s for gap in gaps), gaps
        assert len(messages) < 5, [m.last_seqno for m in messages]
    finally:
        call.cancel()


# -- Replicate, health, reflection ------------------------------------------------------------


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
                first = await within(call.read(), "the first notification")
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
        from boomscooter.node.config import ProduceBatch

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
            note = await within(call.read(), "the first notification")
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
