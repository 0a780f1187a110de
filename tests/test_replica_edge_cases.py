"""Replication edge cases a review found broken (now fixed): a promotion that fails half-way
goes back to following; two promotions at once lead once; a replica behind the leader's
retention starts again where the leader's log starts; Notifications of a restarted replica
or of a restarted leader with min_insync > 1 announce exactly the committed end."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path
from typing import Any

import pytest

from boomscooter import Producer, Subscriber
from boomscooter.errors import RequestError
from boomscooter.node import peers, rules, runtime
from boomscooter.node.runtime import Node
from boomscooter.node.state import save_state
from boomscooter.storage import Entry, SegmentedLog
from boomscooter.storage.batch import encode_batch

from support.net import free_port
from support.node_cluster import Start
from support.waiting import PATIENCE_S, eventually, within


async def produce(servers: str, count: int, *, acks: str = "quorum") -> list[int]:
    async with Producer(servers, acks=acks, linger_ms=1, retry_timeout_s=20) as producer:
        futures = [await producer.send(b"r-%06d" % i) for i in range(count)]
        await producer.flush()
    return [int(f.result() or 0) for f in futures]


async def test_two_concurrent_promotes_lead_once(cluster: Start) -> None:
    leader = await cluster("leader")
    replica = await cluster("r1", follow=leader.address)
    await eventually(lambda: leader.replicas.in_sync_copies() == 2, "replica in sync")
    await leader.stop(grace_s=0.1)
    results = await asyncio.gather(replica.promote(), replica.promote(), return_exceptions=True)
    ok = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, RequestError)]
    assert len(ok) == 1 and len(refused) == 1, results


async def test_a_failed_promotion_leaves_the_node_following(
    cluster: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    leader = await cluster("leader")
    replica = await cluster("r1", follow=leader.address)
    await eventually(lambda: leader.replicas.in_sync_copies() == 2, "replica in sync")
    await leader.stop(grace_s=0.1)

    # A peer with a more up-to-date log answers the survey, then vanishes mid-gather.
    ahead = rules.PeerStatus(role=rules.PeerRole.REPLICA, epoch=1, leader_address="",
                             last_seqno=100, last_epoch=9)  # fmt: skip

    async def survey(addresses: Any) -> dict[str, rules.PeerStatus]:
        return {"127.0.0.1:9": ahead}

    async def fence(addresses: Any, epoch: int, leader: str) -> dict[str, rules.PeerStatus]:
        return {"127.0.0.1:9": dataclasses.replace(ahead, epoch=epoch, leader_address=leader)}

    async def peer_vanished(node: Node, source: str, first: int, last: int) -> int:
        raise peers.PeerFailed("a peer failed (UNAVAILABLE: peer gone)")

    monkeypatch.setattr(peers, "survey", survey)
    monkeypatch.setattr(peers, "fence", fence)
    monkeypatch.setattr(peers, "gather", peer_vanished)
    with pytest.raises(RequestError, match="promotion failed, still a replica") as info:
        await replica.promote()
    assert info.value.grpc_status == "UNAVAILABLE"
    # The promotion failed: the node must still be a working replica (or a leader).
    assert replica.is_leader or replica.follower is not None, replica.role


async def test_a_replica_behind_the_leaders_retention_catches_up(cluster: Start) -> None:
    options: dict[str, Any] = {"segment_bytes": 16 << 10, "retention_bytes": 32 << 10}
    leader = await cluster("leader", **options)
    replica = await cluster("r1", follow=leader.address, **options)
    await eventually(lambda: leader.replicas.in_sync_copies() == 2, "replica in sync")
    await produce(leader.address, 50)
    await eventually(lambda: replica.log.last_seqno == 50, "replica caught up")
    await replica.stop(grace_s=0.1)
    for _ in range(4):
        await produce(leader.address, 2000)
    await leader.apply_retention()
    assert leader.log.first_seqno > 51, leader.log.segment_files()
    replica = await cluster("r1", follow=leader.address, **options)
    await eventually(lambda: replica.log.last_seqno == leader.log.last_seqno, "caught up")


def _write_log(path: Path, batches: list[tuple[int, int, list[bytes]]]) -> None:
    """Batches as (base seqno, epoch, payloads), appended in order."""
    with SegmentedLog.open(path) as log:
        for base, epoch, payloads in batches:
            entries = [Entry(1000 + i, p) for i, p in enumerate(payloads)]
            log.append_batch(encode_batch(entries, base_seqno=base, epoch=epoch))


async def test_notifications_on_a_restarted_replica_never_deliver_its_uncommitted_tail(
    cluster: Start, tmp_path: Path
) -> None:
    common = [(1 + 10 * i, 1, [b"c%d-%d" % (i, j) for j in range(10)]) for i in range(10)]
    _write_log(tmp_path / "leader", [*common, (101, 2, [b"new"] * 50)])
    _write_log(tmp_path / "r1", [*common, (101, 1, [b"stale"] * 35)])
    leader_address = f"127.0.0.1:{free_port()}"
    replica = await cluster("r1", follow=leader_address)  # the leader is not up yet

    sub = Subscriber(replica.address, start=1, count=150, mode="notifications",
                     data_dir=replica.config.data_dir)  # fmt: skip

    async def read() -> list[bytes]:
        async with sub:
            return [r.payload async for r in sub]

    reader = asyncio.create_task(read())
    # The reader has its first notification (and reads the replica's files) before the
    # leader is up.
    await eventually(lambda: sub.stats.get("notifications", 0) >= 1, "the first notification")
    leader = await cluster("leader", listen=leader_address)
    await eventually(lambda: replica.log.last_seqno == 150, "replica caught up")
    assert leader.log.last_seqno == 150
    try:
        payloads = await within(reader, "the 150 records")
    finally:
        reader.cancel()
    assert b"stale" not in payloads
    assert payloads[100:] == [b"new"] * 50


async def test_notifications_after_a_restart_with_min_insync_2_deliver_the_committed_log(
    cluster: Start,
) -> None:
    leader = await cluster("leader", min_insync=2)
    replica = await cluster("r1", follow=leader.address)
    await eventually(lambda: leader.replicas.in_sync_copies() == 2, "replica in sync")
    await produce(leader.address, 100)
    await eventually(lambda: replica.log.last_seqno == 100, "replica caught up")
    address = leader.address
    await leader.stop(grace_s=0.1)
    leader = await cluster("leader", min_insync=2, listen=address)
    await eventually(lambda: leader.commit_seqno == 100, "the restarted leader commits")
    async with Subscriber(leader.address, start=1, count=100, mode="notifications",
                          data_dir=leader.config.data_dir) as sub:  # fmt: skip
        got = await within(_seqnos(sub), "the 100 records")
    assert got == list(range(1, 101))


async def _seqnos(sub: Subscriber) -> list[int]:
    return [r.seqno async for r in sub]


async def test_a_fenced_leader_stepping_down_is_not_taken_for_a_leader(
    cluster: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CI found two nodes fencing each other: the deposed leader, saving the new epoch on
    its way to follow the promoted one, answered "replica of myself, epoch 2"; the promoted
    leader took that for a leader of its epoch and followed it. Here the leader's save of
    the promotion's fence is held: asked meanwhile, it names the claimant, not itself."""
    leader = await cluster("leader")
    replica = await cluster("r1", follow=leader.address)
    await eventually(lambda: leader.replicas.in_sync_copies() == 2, "replica in sync")
    saving, release = threading.Event(), threading.Event()

    def slow_save(data_dir: str, state: Any, version: int) -> None:  # on an executor thread
        if data_dir == leader.config.data_dir and state.epoch == 2:
            saving.set()
            release.wait(PATIENCE_S)
        save_state(data_dir, state, version)

    async def replica_sees_newer() -> tuple[str, int] | None:
        answers = await peers.survey([leader.address])
        return rules.newer_leader(replica.machine.view(), answers)

    monkeypatch.setattr(runtime, "save_state", slow_save)
    promotion = asyncio.create_task(replica.promote(force=True))
    await eventually(saving.is_set, "the fenced leader's state save")
    try:
        status = (await peers.survey([leader.address]))[leader.address]
        assert status.role is rules.PeerRole.NONE and status.epoch == 2
        assert status.leader_address == replica.address  # whom it is about to follow
        assert await replica_sees_newer() is None
    finally:
        release.set()
        await within(promotion, "the promotion")
    await eventually(lambda: leader.role == "replica", "the old leader follows")
    assert leader.leader_address == replica.address and replica.is_leader
    assert await replica_sees_newer() is None


async def test_a_cancelled_promotion_leaves_the_node_following(
    cluster: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Promote RPC's deadline passes during a long gather: the node follows again
    rather than stay one that neither follows nor leads (nor can be promoted again)."""
    leader = await cluster("leader")
    replica = await cluster("r1", follow=leader.address)
    await eventually(lambda: leader.replicas.in_sync_copies() == 2, "replica in sync")
    await leader.stop(grace_s=0.1)
    ahead = rules.PeerStatus(role=rules.PeerRole.REPLICA, epoch=1, leader_address="",
                             last_seqno=100, last_epoch=9)  # fmt: skip
    gathering = asyncio.Event()

    async def survey(addresses: Any) -> dict[str, rules.PeerStatus]:
        return {"127.0.0.1:9": ahead}

    async def fence(addresses: Any, epoch: int, leader: str) -> dict[str, rules.PeerStatus]:
        return {"127.0.0.1:9": dataclasses.replace(ahead, epoch=epoch, leader_address=leader)}

    async def slow_gather(node: Node, source: str, first: int, last: int) -> int:
        gathering.set()
        await asyncio.Event().wait()  # until cancelled
        return 0

    monkeypatch.setattr(peers, "survey", survey)
    monkeypatch.setattr(peers, "fence", fence)
    monkeypatch.setattr(peers, "gather", slow_gather)
    promotion = asyncio.create_task(replica.promote())
    await within(gathering.wait(), "the gather under way")
    promotion.cancel()
    with pytest.raises(asyncio.CancelledError):
        await promotion
    await eventually(lambda: replica.role == "replica" and replica.follower is not None,
                     "following again")  # fmt: skip
    monkeypatch.undo()
    done = await replica.promote()  # not stuck: a new promotion goes through
    # The cancelled one had claimed epoch 2: an epoch is never taken twice.
    assert replica.is_leader and done["epoch"] == 3
