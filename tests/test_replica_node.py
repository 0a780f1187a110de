"""Replication in process: a leader and replicas as :class:`Node` objects on one loop.

The stream, quorum commit, the in-sync set, refusals (Produce and Replicate on a replica,
a bad replica id, acks=quorum without enough copies), reconciliation of a diverged tail,
promotion and fencing. The whole-stack versions (processes, SIGKILL, namespaces) are in
test_replication*.py; these are the fast ones.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from boomscooter import Producer, Subscriber
from boomscooter.node.runtime import Node
from boomscooter.storage import Entry, SegmentedLog
from boomscooter.storage.batch import encode_batch
from boomscooter.v1 import boomscooter_pb2 as pb
from boomscooter.v1 import boomscooter_pb2_grpc as pb_grpc

from support.node_cluster import Start
from support.waiting import eventually, within


def log_bytes(node: Node) -> bytes:
    first = node.log.first_seqno
    return b"".join(b.data for b in node.log.read_batches(first, max_bytes=1 << 30))


async def produce(servers: str, count: int, *, prefix: bytes = b"r") -> list[int]:
    async with Producer(servers, acks="quorum", linger_ms=1, retry_timeout_s=20) as producer:
        futures = [await producer.send(b"%s-%06d" % (prefix, i)) for i in range(count)]
        await producer.flush()
    return [int(f.result() or 0) for f in futures]


async def test_replicas_store_the_stream_and_the_commit_needs_a_quorum(cluster: Start) -> None:
    leader = await cluster("leader", min_insync=2)
    replicas = [await cluster(f"r{i}", follow=leader.address) for i in (1, 2)]
    await eventually(lambda: leader.replicas.in_sync_copies() == 3, "replicas in sync")
    seqnos = await produce(leader.address, 5000)
    assert sorted(seqnos) == list(range(1, 5001))
    assert leader.commit_seqno == 5000
    await eventually(lambda: all(r.log.last_seqno == 5000 for r in replicas), "replicas")
    assert all(log_bytes(r) == log_bytes(leader) for r in replicas)
    # Replicas hold what the leader multicast; their commit follows the leader's.
    await eventually(lambda: all(r.commit_seqno == 5000 for r in replicas), "commit")
    assert sum(r.follower.stats["appended_batches"] for r in replicas) > 0
    async with Subscriber(replicas[0].address, start=1, count=5000, mode="unicast") as sub:
        got = [r.seqno async for r in sub]
    assert got == list(range(1, 5001))
    # A reader of a replica's files, told by the replica where its committed batches end.
    async with Subscriber(replicas[1].address, start=1, count=5000, mode="notifications",
                          data_dir=replicas[1].config.data_dir) as sub:  # fmt: skip
        got = [r.seqno async for r in sub]
    assert got == list(range(1, 5001))
    status = await _status(leader.address)
    assert [(r.in_sync, r.durable_seqno) for r in status.replicas] == [(True, 5000)] * 2


async def _status(address: str) -> pb.StatusResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        response: pb.StatusResponse = await pb_grpc.BoomscooterStub(channel).Status(
            pb.StatusRequest(), timeout=5
        )
        return response


async def _produce_raw(address: str, ack_level: int) -> pb.ProduceResponse:
    # Its own channel with default options: the SDK's channels to a restarted node may
    # still be backing off (gRPC shares subchannels between channels of equal options).
    batch = encode_batch([Entry(1, b"x")], base_seqno=1, epoch=0)
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.BoomscooterStub(channel).Produce()
        await call.write(pb.ProduceRequest(batch_sequence=1, ack_level=ack_level,  # type: ignore[arg-type]
                                           encoded_batch=bytes(batch.data)))  # fmt: skip
        response = await call.read()
        call.cancel()
    assert isinstance(response, pb.ProduceResponse)
    return response


async def test_quorum_without_enough_in_sync_copies_fails_unavailable(cluster: Start) -> None:
    leader = await cluster("leader", min_insync=3, insync_timeout_s=2.0)
    replica = await cluster("r1", follow=leader.address)
    await eventually(lambda: leader.replicas.in_sync_copies() == 2, "replica in sync")
    response = await _produce_raw(leader.address, pb.ACK_LEVEL_QUORUM)
    assert response.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "needs 3 in-sync copies, 2 available" in response.error.message
    assert leader.log.last_seqno == 0  # refused before anything was stored
    # acks=leader still works; the commit waits for a third copy that never comes.
    response = await _produce_raw(leader.address, pb.ACK_LEVEL_LEADER)
    assert response.ack.base_seqno == 1 and leader.commit_seqno == 0
    # A replica that stops acknowledging leaves the in-sync set after the timeout.
    await replica.stop(grace_s=0.1)
    await eventually(lambda: leader.replicas.in_sync_copies() == 1, "replica out of sync")
    status = await _status(leader.address)
    assert [(r.connected, r.in_sync) for r in status.replicas] == [(False, False)]


async def test_a_replica_refuses_produce_and_replicate_naming_the_leader(cluster: Start) -> None:
    leader = await cluster("leader")
    replica = await cluster("r1", follow=leader.address)
    await eventually(lambda: replica.session is not None, "replica session")
    response = await _produce_raw(replica.address, pb.ACK_LEVEL_LEADER)
    assert response.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert response.error.leader_address == leader.address
    assert replica.log.last_seqno == 0
    async with grpc.aio.insecure_channel(replica.address) as channel:
        call = pb_grpc.BoomscooterStub(channel).Replicate()
        await call.write(pb.ReplicateRequest(replica_id="x", address="127.0.0.1:1"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert leader.address in (info.value.details() or "")
    # A replica's Handshake names its leader's stream: subscribers on it get the same pages.
    status = await _status(replica.address)
    assert status.role == pb.ROLE_REPLICA and status.leader_address == leader.address


async def test_replicate_refuses_a_bad_replica_id_and_promote_on_the_leader(
    cluster: Start,
) -> None:
    leader = await cluster("leader")
    async with grpc.aio.insecure_channel(leader.address) as channel:
        stub = pb_grpc.BoomscooterStub(channel)
        for bad in ("", "x" * 200):
            call = stub.Replicate()
            await call.write(pb.ReplicateRequest(replica_id=bad))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Promote(pb.PromoteRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "already the leader" in (info.value.details() or "")
    assert leader.is_leader and not leader.replicas.replicas


def _write_log(path: Path, batches: list[tuple[int, int, list[bytes]]]) -> None:
    """Batches as (base seqno, epoch, payloads), appended in order."""
    with SegmentedLog.open(path) as log:
        for base, epoch, payloads in batches:
            entries = [Entry(1000 + i, p) for i, p in enumerate(payloads)]
            log.append_batch(encode_batch(entries, base_seqno=base, epoch=epoch))


async def test_a_diverged_tail_is_truncated_to_the_last_common_batch(
    cluster: Start, tmp_path: Path
) -> None:
    common = [(1 + 10 * i, 1, [b"c%d-%d" % (i, j) for j in range(10)]) for i in range(10)]
    # The leader went on in epoch 2; the replica holds an epoch-1 tail no one else has.
    _write_log(tmp_path / "leader", [*common, (101, 2, [b"new"] * 50)])
    _write_log(tmp_path / "r1", [*common, (101, 1, [b"stale"] * 30), (131, 1, [b"stale"] * 5)])
    leader = await cluster("leader")
    replica = await cluster("r1", follow=leader.address)
    await eventually(lambda: replica.log.last_seqno == 150, "replica caught up")
    assert log_bytes(replica) == log_bytes(leader)
    assert replica.follower.stats["truncations"] == 1
    assert all(b"stale" not in r.payload for r in replica.log.read(101))


async def test_promote_then_the_old_leader_is_fenced_and_converges(cluster: Start) -> None:
    leader = await cluster("leader", min_insync=2)
    r1 = await cluster("r1", follow=leader.address)
    r2 = await cluster("r2", follow=leader.address)
    await eventually(lambda: leader.replicas.in_sync_copies() == 3, "replicas in sync")
    await eventually(lambda: len(r1.machine.peers) == 1, "replicas know each other")
    servers = ",".join(n.address for n in (leader, r1, r2))

    async def follow(mode: str) -> list[int]:
        async with Subscriber(servers, start=1, count=5000, mode=mode) as sub:
            return [r.seqno async for r in sub]

    # Subscribers on the leader, given every node: they fail over with it.
    subscribers = [asyncio.create_task(follow(m)) for m in ("multicast", "unicast")]
    before = await produce(servers, 3000, prefix=b"before")
    old_epoch, old_address = leader.epoch, leader.address
    await leader.stop(grace_s=0.1)
    done = await r1.promote()
    assert done["epoch"] == old_epoch + 1 and r1.is_leader
    assert all(s <= r1.log.last_seqno for s in before)
    # r2 finds the new leader through its peers; quorum commits continue.
    await eventually(lambda: r2.leader_address == r1.address and r2.session is not None
                   and r2.session.epoch == r1.epoch, "r2 follows r1")  # fmt: skip
    after = await produce(servers, 2000, prefix=b"after")
    assert min(after) == max(before) + 1 and sorted(after) == list(range(3001, 5001))
    for seen in await within(asyncio.gather(*subscribers), "every subscriber's records"):
        assert seen == list(range(1, 5001))
    # The old leader returns with its own command line: it sees the higher epoch, follows.
    old = await cluster("leader", min_insync=2, listen=old_address)
    assert old.role == "replica" and old.leader_address == r1.address
    await eventually(lambda: old.log.last_seqno == 5000, "old leader converged")
    assert log_bytes(old) == log_bytes(r1)
    response = await _produce_raw(old.address, pb.ACK_LEVEL_LEADER)
    assert response.error.leader_address == r1.address


async def test_promote_refuses_while_the_leader_answers_unless_forced(cluster: Start) -> None:
    leader = await cluster("leader")
    replica = await cluster("r1", follow=leader.address)
    await eventually(lambda: leader.replicas.in_sync_copies() == 2, "replica in sync")
    async with grpc.aio.insecure_channel(replica.address) as channel:
        stub = pb_grpc.BoomscooterStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Promote(pb.PromoteRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "still answers" in (info.value.details() or "")
        assert replica.role == "replica" and replica.follower is not None
        done = await stub.Promote(pb.PromoteRequest(force=True), timeout=10)
    assert done.epoch == leader.epoch + 1 and replica.is_leader
    # The old leader notices the higher epoch (its fencing check) and follows.
    await eventually(lambda: leader.role == "replica", "old leader fenced")
    assert leader.leader_address == replica.address
    status = await _status(replica.address)
    assert status.counters["batches"] == 0 and "pages_sent" in status.counters


async def test_an_empty_replica_of_a_trimmed_log_starts_where_the_leader_does(
    cluster: Start,
) -> None:
    leader = await cluster("leader", segment_bytes=64 << 10, retention_bytes=128 << 10)
    await produce(leader.address, 20_000)
    await leader.apply_retention()
    first = leader.log.first_seqno
    assert first > 1
    replica = await cluster("r1", follow=leader.address)
    await eventually(lambda: replica.log.last_seqno == 20_000, "replica caught up")
    assert replica.log.first_seqno == first
    assert log_bytes(replica) == log_bytes(leader)
