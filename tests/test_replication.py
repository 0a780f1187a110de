"""Whole-stack acceptance tests of replication: a leader and two replicas as real processes
(``python -m boomscooter.cli leader`` / ``replica``), SDK producers and subscribers in the
test process, SIGKILLs, a manual failover with ``boomscooter promote``.

1. Replica crashes under load: ``--min-insync 2``, ``acks=quorum``, ``--fsync always``;
   200k records from two producers while one replica is SIGKILLed and restarted five times
   and a subscriber reads on every node. Afterwards the three logs are identical, every
   acked record is stored once at its acked seqno, every subscriber saw 1..N.
2. Failover: the leader is SIGKILLed, a replica promoted; nothing acked at quorum is lost,
   producers and subscribers go on; the old leader, restarted with its own command line,
   is fenced and converges as a replica.
3. A replica down longer than ``--insync-timeout``: out of sync in the leader's status;
   with ``--min-insync 3`` quorum produce fails with UNAVAILABLE (nothing is stored);
   restarted, the replica catches up (sealed segments by cast) and is in sync again.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from boomscooter.client.producer import Producer
from boomscooter.errors import ServerUnavailableError
from boomscooter.storage.batch import Record
from boomscooter.v1 import boomscooter_pb2 as pb

from support.log import produce_raw
from support.net import free_port
from support.process import Event, Node, cluster
from support.replication import (
    ProducerRun,
    SubscriberRun,
    check_contiguous,
    check_identical_logs,
    check_stored,
    cli,
    in_sync,
    raw_batch,
    replica_view,
    segment_bytes,
    status,
    subscribers,
    three_nodes,
    wait_status,
)
from support.waiting import eventually, within

pytestmark = pytest.mark.slow

QUORUM_OPTIONS = ("--min-insync", "2", "--fsync", "always")


def all_in_sync(*replicas: Node) -> Callable[[pb.StatusResponse], bool]:
    checks = [in_sync(r) for r in replicas]
    return lambda s: all(check(s) for check in checks)


def caught_up(leader_status: pb.StatusResponse, *replicas: Node) -> bool:
    """Every replica is in sync and holds the leader's whole log durably."""
    for replica in replicas:
        view = replica_view(leader_status, replica)
        if view is None or not view.in_sync or view.durable_seqno != leader_status.last_seqno:
            return False
    return leader_status.commit_seqno == leader_status.last_seqno


def check_subscriber(run: SubscriberRun, log_records: list[Record]) -> None:
    assert run.error is None, f"{run.node.name} ({run.mode}): {run.error!r}"
    check_contiguous([r.seqno for r in run.records])
    assert run.records == log_records[: len(run.records)], f"{run.node.name}: not the log"


def producer_runs(nodes: tuple[Node, ...], per_producer: int) -> list[ProducerRun]:
    """Two producers at ``acks=quorum`` given every node's address."""
    servers = ",".join(n.address for n in nodes)
    return [
        ProducerRun(
            name, Producer(servers, acks="quorum", linger_ms=5, retry_timeout_s=60), per_producer
        )
        for name in ("p0", "p1")
    ]


def acked(runs: list[ProducerRun]) -> int:
    return sum(len(r.acked) for r in runs)


async def wait_acked(runs: list[ProducerRun], at_least: int, what: str) -> None:
    await eventually(lambda: acked(runs) >= at_least, what)


def producing(runs: list[ProducerRun]) -> asyncio.Future[list[None]]:
    """Both producers at about 5k records/s each (the crashes must come under load)."""
    return asyncio.gather(*(r.run(per_tick=100, tick_s=0.02) for r in runs))


async def stop_producing(runs: list[ProducerRun], sending: asyncio.Future[list[None]]) -> None:
    """End both producers; each must have every record it sent acknowledged."""
    for run in runs:
        run.stop.set()
    await within(sending, "the producers' end")
    for run in runs:
        assert not run.failed, f"{run.name}: {run.failed[:3]}"
        assert len(run.acked) == run.sent


async def converge(
    leader: Node, replicas: tuple[Node, ...], subs: tuple[SubscriberRun, ...]
) -> None:
    """Replicas hold the leader's whole log durably and the subscribers delivered it."""
    final = await wait_status(leader.address, lambda s: caught_up(s, *replicas), "caught up")
    await eventually(
        lambda: all(len(s.records) >= final.last_seqno or s.error for s in subs),
        "subscribers to deliver everything",
    )


async def start_in_sync(leader: Node, *replicas: Node) -> Event:
    """Start the leader, then its replicas; return once both are in sync (the leader's
    ``node.leading`` event)."""
    first = await leader.start()
    await asyncio.gather(*(r.start() for r in replicas))
    await wait_status(leader.address, all_in_sync(*replicas), "both in sync")
    return first


async def promoted_event(node: Node) -> Event:
    """The ``node.promoted`` event of ``node`` (its log arrives through a pipe: soon)."""
    await eventually(lambda: bool(node.events("node.promoted")), "the node.promoted event")
    (event,) = node.events("node.promoted")
    return event


def check_acked(records: list[Record], runs: list[ProducerRun]) -> None:
    """Every acknowledged record is stored at the seqno it was acknowledged with."""
    stored = {r.seqno: r.payload for r in records}
    for run in runs:
        lost = [seqno for seqno, data in run.acked.items() if stored.get(seqno) != data]
        assert not lost, f"{run.name}: acknowledged, then lost or replaced: {lost[:5]}"


# -- 1. a replica SIGKILLed and restarted five times under load -------------------------------

TOTAL = 200_000
KILLS = 5


async def test_replica_crashes_under_load_lose_nothing(tmp_path: Path) -> None:
    # 1 MiB segments: the log (about 5 MB) rolls several times, crashes or not.
    leader, steady, crashing = three_nodes(tmp_path, *QUORUM_OPTIONS, "--segment-bytes", "1048576")
    rng = random.Random()
    with cluster(leader, steady, crashing):
        await leader.start()
        await asyncio.gather(steady.start(), crashing.start())
        await wait_status(leader.address, all_in_sync(steady, crashing), "both in sync")
        runs = producer_runs((leader, steady, crashing), TOTAL // 2)
        restarts = 0
        kill_points: list[int] = []

        def may_send(run: ProducerRun) -> bool:
            # Sending pauses near the end until every crash happened: all come under load.
            return restarts >= KILLS or run.sent < 0.9 * run.total

        for run in runs:
            run.gate = functools.partial(may_send, run)
        subs = (
            SubscriberRun(leader, "multicast"),
            SubscriberRun(steady, "unicast"),
            SubscriberRun(crashing, "multicast"),
        )
        async with subscribers(*subs), runs[0].producer, runs[1].producer:
            sending = producing(runs)
            try:
                for kill in range(KILLS):
                    await wait_acked(runs, (kill + 1) * TOTAL // 7, f"acks before crash {kill}")
                    kill_points.append(acked(runs))
                    await crashing.kill()
                    await subs[2].stop()  # its server is gone; resumes after the last delivered
                    await asyncio.sleep(rng.uniform(0.1, 0.6))
                    await crashing.start()
                    subs[2].start()
                    await crashing.wait_event("replica.session")
                    restarts += 1
                await within(sending, "every record sent", timeout_s=240)
            finally:
                sending.cancel()
            for run in runs:
                assert not run.failed, f"{run.name}: {run.failed[:3]}"
                assert len(run.acked) == run.total
            final = await wait_status(leader.address, lambda s: caught_up(s, steady, crashing),
                                      "replicas caught up")  # fmt: skip
            assert final.last_seqno == TOTAL
            await eventually(lambda: all(len(s.records) >= TOTAL or s.error for s in subs),
                             "subscribers to deliver everything")  # fmt: skip
        assert crashing.starts == KILLS + 1
        # Every crash came under load, and every restart recovered what it had stored.
        assert max(kill_points) < TOTAL, kill_points
        recovered = [e["last_seqno"] for e in crashing.events("replica.started")]
        assert recovered == sorted(recovered) and recovered[1] > 0, recovered
        assert len(crashing.events("replica.session")) >= KILLS + 1
        for node in (leader, steady, crashing):
            assert await node.stop() == 0, node.stderr_tail()

    records = check_identical_logs(leader.data_dir, steady.data_dir, crashing.data_dir)
    assert len(records) == TOTAL
    check_stored(records, runs, exactly_once=True)
    segments = segment_bytes(leader.data_dir)
    assert len(segments) > 3
    assert segment_bytes(steady.data_dir) == segments
    assert segment_bytes(crashing.data_dir) == segments
    for sub in subs:
        check_subscriber(sub, records)
        assert len(sub.records) == TOTAL
    assert subs[2].restarts == KILLS + 1


# -- 2. failover: SIGKILL the leader, promote a replica ---------------------------------------


async def test_promoted_replica_keeps_every_quorum_ack_and_fences_the_old_leader(
    tmp_path: Path,
) -> None:
    old, new, other = three_nodes(tmp_path, *QUORUM_OPTIONS)
    with cluster(old, new, other):
        first = await start_in_sync(old, new, other)
        runs = producer_runs((old, new, other), 10**9)  # until stopped
        subs = (SubscriberRun(new, "multicast"), SubscriberRun(other, "unicast"))
        async with subscribers(*subs), runs[0].producer, runs[1].producer:
            sending = producing(runs)
            try:
                await wait_acked(runs, 20_000, "acks before the kill")
                await old.kill()
                acked_before = {seqno: p for r in runs for seqno, p in r.acked.items()}
                promoted = await cli("promote", "--server", new.address)
                assert promoted.returncode == 0, promoted.stderr.decode(errors="replace")
                event = await promoted_event(new)
                epoch = event["epoch"]
                assert epoch > first["epoch"]
                assert f"leads at epoch {epoch}" in promoted.stdout.decode()
                # Nothing acked at quorum is lost: the new leader holds it all already.
                assert event["last_seqno"] >= max(acked_before)
                await wait_acked(runs, acked(runs) + 20_000, "acks after the promotion")
                # The old leader returns with its own command line: it must follow.
                await old.start()
                await eventually(
                    lambda: bool(old.events("node.fenced", 2) or old.events("node.following", 2)),
                    "the old leader fenced",
                )
                # (Its status shows the new epoch once its first session with the new leader
                # began: until then it reports the epoch of its own log.)
                fenced = await wait_status(
                    old.address,
                    lambda s: s.role == pb.ROLE_REPLICA and s.epoch == epoch,
                    "the old leader a replica at the new epoch",
                )
                assert fenced.leader_address == new.address
                await wait_status(new.address, all_in_sync(old, other), "old leader in sync")
                await wait_acked(runs, acked(runs) + 5_000, "acks after its return")
                await stop_producing(runs, sending)
            finally:
                sending.cancel()
            await converge(new, (old, other), subs)
        for node in (new, other, old):
            assert await node.stop() == 0, node.stderr_tail()

    records = check_identical_logs(new.data_dir, other.data_dir, old.data_dir)
    stored = {r.seqno: r.payload for r in records}
    lost = {s: p for s, p in acked_before.items() if stored.get(s) != p}
    assert not lost, f"acked at quorum before the kill, not on the new leader: {list(lost)[:5]}"
    for run in runs:
        for seqno, data in run.acked.items():
            assert stored[seqno] == data
    for sub in subs:
        check_subscriber(sub, records)
        assert len(sub.records) == len(records)
    # At least once only: the retry of a batch whose ack was lost with the old leader is
    # stored again by the new one (see test_a_retry_after_failover_is_deduplicated_...).
    check_stored(records, runs, exactly_once=False)


async def test_a_forced_switchover_under_load_loses_no_acknowledged_record(
    tmp_path: Path,
) -> None:
    """``promote --force`` while the leader leads and two producers write at quorum: the
    promoted replica fences the old leader and the other replica before it gathers, so the
    old epoch commits nothing after the gather. Every acknowledged record is stored at the
    seqno it was acknowledged with, on all three nodes; subscribers saw one log. Before
    (issue 14), the old leader kept committing with the other replica until its fencing
    check noticed the new epoch, and both then truncated what they had acknowledged."""
    old, new, other = three_nodes(tmp_path, *QUORUM_OPTIONS)
    with cluster(old, new, other):
        first = await start_in_sync(old, new, other)
        runs = producer_runs((old, new, other), 10**9)  # until stopped
        subs = (SubscriberRun(new, "multicast"), SubscriberRun(other, "unicast"))
        async with subscribers(*subs), runs[0].producer, runs[1].producer:
            sending = producing(runs)
            try:
                await wait_acked(runs, 20_000, "acks before the switchover")
                promoted = await cli("promote", "--force", "--server", new.address)
                assert promoted.returncode == 0, promoted.stderr.decode(errors="replace")
                event = await promoted_event(new)
                assert event["epoch"] > first["epoch"]
                # The old leader was fenced by the promotion itself, not seconds later: its
                # Status says so as soon as promote returned (its log lines come through a
                # pipe, later).
                assert (await status(old.address)).epoch == event["epoch"]
                await wait_acked(runs, acked(runs) + 20_000, "acks after the switchover")
                await stop_producing(runs, sending)
            finally:
                sending.cancel()
            await converge(new, (old, other), subs)
        for node in (new, other, old):
            assert await node.stop() == 0, node.stderr_tail()

    records = check_identical_logs(new.data_dir, other.data_dir, old.data_dir)
    check_acked(records, runs)
    for sub in subs:
        check_subscriber(sub, records)
        assert len(sub.records) == len(records)
    check_stored(records, runs, exactly_once=False)


async def test_a_frozen_leader_is_presumed_lost_and_replaced(tmp_path: Path) -> None:
    """The leader is frozen (SIGSTOP), its TCP connections open and silent. Its replicas
    hear nothing for ``--leader-timeout`` and end their sessions (no redirect to it from
    then on); the operator promotes one, which fences the other; producers get acks from
    the new leader. Resumed, the old leader learns the new epoch and follows. Before
    (issue 14), the third replica stayed attached to the frozen leader and producers got
    no ack for the whole pause."""
    old, new, other = three_nodes(tmp_path, *QUORUM_OPTIONS, "--leader-timeout", "2")
    with cluster(old, new, other):
        first = await start_in_sync(old, new, other)
        runs = producer_runs((old, new, other), 10**9)
        async with runs[0].producer, runs[1].producer:
            sending = producing(runs)
            try:
                await wait_acked(runs, 5_000, "acks before the freeze")
                await old.pause()
                for replica in (new, other):
                    await eventually(
                        lambda r=replica: any(  # type: ignore[misc]
                            "no word from the leader" in e.get("reason", "")
                            for e in r.events("replica.session_ended")
                        ),
                        f"{replica.name} presumes the frozen leader lost",
                    )
                promoted = await cli("promote", "--server", new.address)
                assert promoted.returncode == 0, promoted.stderr.decode(errors="replace")
                event = await promoted_event(new)
                assert event["epoch"] > first["epoch"]
                assert (await status(other.address)).epoch == event["epoch"], "not fenced"
                await wait_acked(runs, acked(runs) + 5_000, "acks from the new leader")
                await old.resume()
                await wait_status(
                    old.address,
                    lambda s: s.role == pb.ROLE_REPLICA and s.epoch == event["epoch"],
                    "the old leader a replica at the new epoch",
                )
                await wait_status(new.address, all_in_sync(old, other), "both in sync again")
                await stop_producing(runs, sending)
            finally:
                sending.cancel()
        await converge(new, (old, other), ())
        for node in (new, other, old):
            assert await node.stop() == 0, node.stderr_tail()
    check_acked(check_identical_logs(new.data_dir, other.data_dir, old.data_dir), runs)


# -- 3. a replica down longer than --insync-timeout ---------------------------------------------


async def refused_at_quorum(leader: Node, payload: bytes) -> None:
    """``acks=quorum`` fails with UNAVAILABLE (retried for 2 s) and stores nothing."""
    before = (await status(leader.address)).last_seqno
    started = time.monotonic()
    async with Producer(leader.address, acks="quorum", retry_timeout_s=2) as producer:
        refused = await producer.send(payload)
        with pytest.raises(ServerUnavailableError, match="acks=quorum needs 3 in-sync copies"):
            await producer.flush()
    assert isinstance(refused.exception(), ServerUnavailableError)
    assert time.monotonic() - started < 30  # refused (and retried for 2 s), never held
    assert (await status(leader.address)).last_seqno == before, "a refused batch was stored"


def silent(node: Node) -> Callable[[pb.StatusResponse], bool]:
    """Connected but out of sync (it stopped acknowledging)."""

    def check(leader_status: pb.StatusResponse) -> bool:
        view = replica_view(leader_status, node)
        return view is not None and view.connected and not view.in_sync

    return check


async def test_replica_down_past_insync_timeout_blocks_quorum_then_catches_up(
    tmp_path: Path,
) -> None:
    options = ("--min-insync", "3", "--fsync", "always", "--insync-timeout", "2",
               "--segment-bytes", str(64 << 10))  # fmt: skip
    leader, steady, down = three_nodes(tmp_path, *options)
    leader.options += ["--cast-listen", f"127.0.0.1:{free_port()}"]
    with cluster(leader, steady, down):
        await leader.start()
        await asyncio.gather(steady.start(), down.start())
        await wait_status(leader.address, all_in_sync(steady, down), "both in sync")
        async with Producer(leader.address, acks="quorum", retry_timeout_s=10) as producer:
            futures = [await producer.send(b"before-%d" % i) for i in range(1000)]
        assert [f.result() for f in futures] == list(range(1, 1001))

        # Frozen (SIGSTOP): its session stays open, its acks stop; after --insync-timeout
        # it is out of sync, and quorum writes are refused rather than held.
        await down.pause()
        await leader.wait_event("replica.out_of_sync")
        await wait_status(leader.address, silent(down), "the frozen replica out of sync")
        await refused_at_quorum(leader, b"refused-while-frozen")
        await down.resume()
        await wait_status(leader.address, all_in_sync(steady, down), "in sync again")

        # Dead (SIGKILL): disconnected and out of sync at once, the other still in sync.
        await down.kill()
        await wait_status(
            leader.address,
            lambda s: in_sync(steady)(s) and (view := replica_view(s, down)) is not None
            and not (view.connected or view.in_sync),
            "the dead replica disconnected",
        )  # fmt: skip
        shown = await cli("status", "--server", leader.address, "--json")
        replicas = {r["address"]: r for r in json.loads(shown.stdout)["replicas"]}
        assert replicas[down.address]["in_sync"] is False
        assert replicas[down.address]["connected"] is False
        assert replicas[steady.address]["in_sync"] is True
        await refused_at_quorum(leader, b"refused-while-down")

        # Records acked by the leader alone meanwhile: the replica misses whole segments.
        async with Producer(leader.address, acks="leader") as producer:
            for i in range(30_000):
                await producer.send(b"while-down-%d" % i)
        missed = await status(leader.address)
        assert missed.segment_count > 3 and missed.commit_seqno == 1000

        await down.start()
        await wait_status(leader.address, lambda s: caught_up(s, steady, down),
                          "the replica caught up and in sync")  # fmt: skip
        assert down.events("replica.segment_cast", 2), "no segment was cast to the replica"
        async with Producer(leader.address, acks="quorum", retry_timeout_s=10) as producer:
            last = await producer.send(b"after")
        assert last.result() == 31_001
        for node in (leader, steady, down):
            assert await node.stop() == 0, node.stderr_tail()

    records = check_identical_logs(leader.data_dir, steady.data_dir, down.data_dir)
    assert len(records) == 31_001
    assert records[-1].payload == b"after"
    assert not [r for r in records if r.payload.startswith(b"refused")]


# -- smaller failover details ------------------------------------------------------------------


async def test_a_retry_after_failover_is_deduplicated_by_the_new_leader(tmp_path: Path) -> None:
    """The ack of a batch is lost with the leader (it was replicated and committed); the
    producer resends it, with its batch_sequence, to the promoted replica."""
    old, new, other = three_nodes(tmp_path, *QUORUM_OPTIONS)
    with cluster(old, new, other):
        await old.start()
        await asyncio.gather(new.start(), other.start())
        await wait_status(old.address, all_in_sync(new, other), "both in sync")
        batch = raw_batch("px", 1, [b"once-1", b"once-2"])
        (first,) = await produce_raw(old.address, [batch])
        assert (first.ack.base_seqno, first.ack.record_count) == (1, 2)
        await wait_status(old.address, lambda s: caught_up(s, new, other), "replicated")
        await old.kill()
        promoted = await cli("promote", "--server", new.address)
        assert promoted.returncode == 0, promoted.stderr.decode(errors="replace")
        await wait_status(new.address, all_in_sync(other), "the other replica following")
        (again,) = await produce_raw(new.address, [batch])
        assert again.HasField("ack"), again
        stored = (await status(new.address)).last_seqno
        assert (again.ack.base_seqno, again.ack.duplicate, stored) == (1, True, 2)


async def test_a_replica_redirects_a_quorum_producer_to_the_leader(tmp_path: Path) -> None:
    leader = Node("leader", tmp_path / "leader", "leader", list(QUORUM_OPTIONS))
    replica = Node("replica", tmp_path / "replica", "replica", list(QUORUM_OPTIONS),
                   leader=leader.address)  # fmt: skip
    with cluster(leader, replica):
        await leader.start()
        await replica.start()
        await wait_status(leader.address, in_sync(replica), "the replica in sync")
        (answer,) = await produce_raw(replica.address, [raw_batch("px", 1, [b"r"])])
        assert answer.HasField("error")
        assert (answer.error.code, answer.error.leader_address) == (
            9,  # FAILED_PRECONDITION: NOT_LEADER
            leader.address,
        ), answer.error
