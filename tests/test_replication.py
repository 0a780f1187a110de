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
import json
import random
import time
from pathlib import Path

import pytest
from replication_support import (
    Node,
    ProducerRun,
    SubscriberRun,
    check_contiguous,
    check_exactly_once,
    check_identical_logs,
    cli,
    cluster,
    free_port,
    in_sync,
    replica_view,
    segment_bytes,
    status,
    subscribers,
    three_nodes,
    wait_for,
    wait_status,
)

from boomscooter.client.producer import Producer
from boomscooter.errors import ServerUnavailableError
from boomscooter.storage.batch import Record
from boomscooter.v1 import boomscooter_pb2 as pb

pytestmark = pytest.mark.slow

QUORUM_OPTIONS = ("--min-insync", "2", "--fsync", "always")


def all_in_sync(*replicas: Node) -> object:
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


def producer_runs(nodes: tuple[Node, ...], per_producer: int, **options: object) -> list[ProducerRun]:
    servers = ",".join(n.address for n in nodes)
    return [
        ProducerRun(name, Producer(servers, acks="quorum", **options), per_producer)  # type: ignore[arg-type]
        for name in ("p0", "p1")
    ]


# -- 1. a replica SIGKILLed and restarted five times under load -------------------------------

TOTAL = 200_000
KILLS = 5


async def test_replica_crashes_under_load_lose_nothing(tmp_path: Path) -> None:
    leader, steady, crashing = three_nodes(tmp_path, *QUORUM_OPTIONS)
    rng = random.Random()
    with cluster(leader, steady, crashing):
        await leader.start()
        await asyncio.gather(steady.start(), crashing.start())
        await wait_status(leader.address, all_in_sync(steady, crashing), 20, "both in sync")  # type: ignore[arg-type]
        runs = producer_runs((leader, steady, crashing), TOTAL // 2, linger_ms=5,
                             retry_timeout_s=60)  # fmt: skip
        restarts = 0
        # Sending pauses near the end until every crash happened: the crashes are under load.
        for run in runs:
            run.gate = lambda r=run: restarts >= KILLS or r.sent < 0.9 * r.total  # type: ignore[misc]
        acked = lambda: sum(len(r.acked) for r in runs)  # noqa: E731
        subs = (
            SubscriberRun(leader, "multicast"),
            SubscriberRun(steady, "unicast"),
            SubscriberRun(crashing, "multicast"),
        )
        async with subscribers(*subs), runs[0].producer, runs[1].producer:
            producing = asyncio.gather(*(r.run(per_tick=100, tick_s=0.02) for r in runs))
            try:
                for kill in range(KILLS):
                    await wait_for(lambda k=kill: acked() >= (k + 1) * TOTAL // 7, 60, "acks")  # type: ignore[misc]
                    await crashing.kill()
                    await subs[2].stop()  # its server is gone; resumes after the last delivered
                    await asyncio.sleep(rng.uniform(0.1, 0.6))
                    await crashing.start()
                    subs[2].start()
                    await crashing.wait_event("replica.session", 20)
                    restarts += 1
                await asyncio.wait_for(producing, 120)
            finally:
                producing.cancel()
            for run in runs:
                assert not run.failed, f"{run.name}: {run.failed[:3]}"
                assert len(run.acked) == run.total
            final = await wait_status(leader.address, lambda s: caught_up(s, steady, crashing),
                                      60, "replicas caught up")  # fmt: skip
            assert final.last_seqno == TOTAL
            await wait_for(lambda: all(len(s.records) >= TOTAL or s.error for s in subs), 60,
                           "subscribers to deliver everything")  # fmt: skip
        assert crashing.starts == KILLS + 1
        assert len(crashing.events("replica.session")) >= KILLS + 1
        for node in (leader, steady, crashing):
            assert await node.stop() == 0, node.stderr_tail()

    records = check_identical_logs(leader.data_dir, steady.data_dir, crashing.data_dir)
    assert len(records) == TOTAL
    check_exactly_once(records, runs)
    segments = segment_bytes(leader.data_dir)
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
        first = await old.start()
        await asyncio.gather(new.start(), other.start())
        await wait_status(old.address, all_in_sync(new, other), 20, "both in sync")  # type: ignore[arg-type]
        runs = producer_runs((old, new, other), 10**9, linger_ms=5, retry_timeout_s=60)
        acked = lambda: sum(len(r.acked) for r in runs)  # noqa: E731
        subs = (SubscriberRun(new, "multicast"), SubscriberRun(other, "unicast"))
        async with subscribers(*subs), runs[0].producer, runs[1].producer:
            producing = asyncio.gather(*(r.run(per_tick=100, tick_s=0.02) for r in runs))
            try:
                await wait_for(lambda: acked() >= 20_000, 60, "acks before the kill")
                await old.kill()
                acked_before = {seqno: p for r in runs for seqno, p in r.acked.items()}
                promoted = await cli("promote", "--server", new.address)
                assert promoted.returncode == 0, promoted.stderr.decode(errors="replace")
                (event,) = new.events("node.promoted")
                epoch = event["epoch"]
                assert epoch > first["epoch"]
                assert f"leads at epoch {epoch}" in promoted.stdout.decode()
                # Nothing acked at quorum is lost: the new leader holds it all already.
                assert event["last_seqno"] >= max(acked_before)
                resumed_at = acked()
                await wait_for(lambda: acked() >= resumed_at + 20_000, 60, "acks after promote")
                # The old leader returns with its own command line: it must follow.
                await old.start()
                await wait_for(
                    lambda: bool(old.events("node.fenced", 2) or old.events("node.following", 2)),
                    20,
                    "the old leader fenced",
                )
                fenced = await status(old.address)
                assert fenced.role == pb.ROLE_REPLICA, fenced
                assert fenced.epoch == epoch and fenced.leader_address == new.address
                await wait_status(new.address, all_in_sync(old, other), 20, "old leader in sync")  # type: ignore[arg-type]
                resumed_at = acked()
                await wait_for(lambda: acked() >= resumed_at + 5_000, 60, "acks after its return")
                for run in runs:
                    run.stop.set()
                await asyncio.wait_for(producing, 60)
            finally:
                producing.cancel()
            for run in runs:
                assert not run.failed, f"{run.name}: {run.failed[:3]}"
                assert len(run.acked) == run.sent
            final = await wait_status(new.address, lambda s: caught_up(s, old, other), 60,
                                      "replicas caught up")  # fmt: skip
            await wait_for(lambda: all(len(s.records) >= final.last_seqno or s.error for s in subs),
                           60, "subscribers to deliver everything")  # fmt: skip
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
    check_exactly_once(records, runs)


# -- 3. a replica down longer than --insync-timeout ---------------------------------------------


async def test_replica_down_past_insync_timeout_blocks_quorum_then_catches_up(
    tmp_path: Path,
) -> None:
    options = ("--min-insync", "3", "--fsync", "always", "--insync-timeout", "1",
               "--segment-bytes", str(64 << 10))  # fmt: skip
    leader, steady, down = three_nodes(tmp_path, *options)
    leader.options += ["--cast-listen", f"127.0.0.1:{free_port()}"]
    with cluster(leader, steady, down):
        await leader.start()
        await asyncio.gather(steady.start(), down.start())
        await wait_status(leader.address, all_in_sync(steady, down), 20, "both in sync")  # type: ignore[arg-type]
        async with Producer(leader.address, acks="quorum", retry_timeout_s=2) as producer:
            futures = [await producer.send(b"before-%d" % i) for i in range(1000)]
            await producer.flush()
            assert [f.result() for f in futures] == list(range(1, 1001))

            await down.kill()
            await asyncio.sleep(1.5)  # longer than --insync-timeout
            before = await wait_status(leader.address, lambda s: not in_sync(down)(s), 5,
                                       "the replica out of sync")  # fmt: skip
            view = replica_view(before, down)
            assert view is not None and not view.in_sync
            assert in_sync(steady)(before)
            shown = await cli("status", "--server", leader.address, "--json")
            replicas = {r["address"]: r for r in json.loads(shown.stdout)["replicas"]}
            assert replicas[down.address]["in_sync"] is False
            assert replicas[steady.address]["in_sync"] is True

            started = time.monotonic()
            refused = await producer.send(b"refused")
            with pytest.raises(ServerUnavailableError, match="acks=quorum needs 3 in-sync"):
                await producer.flush()
            assert refused.done() and isinstance(refused.exception(), ServerUnavailableError)
            assert time.monotonic() - started < 10
            after = await status(leader.address)
            assert after.last_seqno == before.last_seqno == 1000, "the refused batch was stored"

        # Records acked by the leader alone meanwhile: the replica misses whole segments.
        async with Producer(leader.address, acks="leader") as producer:
            for i in range(30_000):
                await producer.send(b"while-down-%d" % i)
        missed = await status(leader.address)
        assert missed.segment_count > 3 and missed.commit_seqno == 1000

        await down.start()
        await wait_status(leader.address, lambda s: caught_up(s, steady, down), 30,
                          "the replica caught up and in sync")  # fmt: skip
        assert down.events("replica.segment_cast", 2), "no segment was cast to the replica"
        async with Producer(leader.address, acks="quorum", retry_timeout_s=10) as producer:
            last = await producer.send(b"after")
            await producer.flush()
            assert last.result() == 31_001
        for node in (leader, steady, down):
            assert await node.stop() == 0, node.stderr_tail()

    records = check_identical_logs(leader.data_dir, steady.data_dir, down.data_dir)
    assert len(records) == 31_001
    assert records[-1].payload == b"after"
    assert b"refused" not in {r.payload for r in records}
