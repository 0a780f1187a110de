"""Leader restarts: the leader runs as a process (``python -m boomscooter.cli leader``) and is
stopped mid-stream with SIGTERM, or killed with SIGKILL (``--fsync always``), then started
again on the same data directory and port.

Meanwhile one producer in the test process (the SDK, ``acks=leader``) writes records with
distinct payloads without pause and notes every ack, and a multicast and a unicast
subscriber read from seqno 1. Afterwards: every acked record is in the log at its acked
seqno; the log is exactly the producer's records, each once, in send order, seqnos 1..N
(the retries after the restart were deduplicated through the producer journal); each
subscriber saw exactly 1..N with the log's payloads. A subscriber whose leader stays down
longer than ``server_timeout_s`` fails with ``ServerUnavailableError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from boomscooter.client.producer import Producer
from boomscooter.client.subscriber import Subscriber
from boomscooter.errors import ServerUnavailableError
from boomscooter.node.config import ProduceBatch
from boomscooter.node.multicast import StreamSender
from boomscooter.storage import Entry, FsyncPolicy
from boomscooter.storage.batch import Record

from support.log import (
    check_exactly_once,
    payload,
    produce_raw,
    raw_batch,
    running_leader,
)
from support.net import random_group
from support.process import Node, cluster
from support.replication import read_log
from support.waiting import eventually, within


@contextlib.asynccontextmanager
async def leader_process(data_dir: Path) -> AsyncIterator[Node]:
    """``boomscooter leader --fsync always`` as a process on a fixed port, so a restart
    comes back where the clients look for it; killed on the way out."""
    with cluster(Node("leader", data_dir, "leader", ["--fsync", "always"])) as (leader,):
        yield leader


@dataclass
class ProducerRun:
    """Sends ``payload("r", i)`` for i = 0, 1, … until told to stop; notes every ack."""

    producer: Producer
    sent: list[bytes] = field(default_factory=list)
    acked: dict[int, bytes] = field(default_factory=dict)
    failed: list[BaseException] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def _on_done(self, data: bytes, future: asyncio.Future[int | None]) -> None:
        if future.cancelled():
            self.failed.append(asyncio.CancelledError())
        elif (error := future.exception()) is not None:
            self.failed.append(error)
        else:
            seqno = future.result()
            assert seqno is not None
            assert seqno not in self.acked, f"seqno {seqno} acked twice"
            self.acked[seqno] = data

    async def run(self, per_tick: int = 50, tick_s: float = 0.005) -> None:
        index = 0
        while not self.stop.is_set():
            for _ in range(per_tick):
                data = payload("r", index)
                future = await self.producer.send(data)
                self.sent.append(data)
                future.add_done_callback(functools.partial(self._on_done, data))
                index += 1
            await asyncio.sleep(tick_s)
        await self.producer.flush()


@dataclass
class SubscriberRun:
    subscriber: Subscriber
    records: list[Record] = field(default_factory=list)
    error: BaseException | None = None

    async def run(self) -> None:
        try:
            async for batch in self.subscriber.batches():
                self.records.extend(batch)
        except Exception as exc:  # checked by the test
            self.error = exc


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum",
    [
        pytest.param(signal.SIGTERM, id="sigterm"),
        pytest.param(signal.SIGKILL, id="sigkill"),
    ],
)
async def test_leader_restart_keeps_every_acked_record_and_subscribers_continue(
    tmp_path: Path, signum: int
) -> None:
    data_dir = tmp_path / "log"
    async with leader_process(data_dir) as leader:
        first = await leader.start()
        assert first["last_seqno"] == 0
        server = leader.address
        subs = [
            SubscriberRun(
                Subscriber(
                    server,
                    start=1,
                    mode=mode,
                    interface="127.0.0.1",
                    server_timeout_s=20,
                    subscriber_id=mode,
                )
            )
            for mode in ("multicast", "unicast")
        ]
        sub_tasks = [asyncio.create_task(s.run()) for s in subs]
        producer = Producer(server, acks="leader", retry_timeout_s=30, linger_ms=2)
        run = ProducerRun(producer)
        try:
            async with producer:
                produce = asyncio.create_task(run.run())
                await eventually(lambda: len(run.acked) >= 3000, "acks before the restart")
                # Both subscribers are under way before the leader goes.
                await eventually(lambda: all(s.records for s in subs), "subscribers under way")
                acked_before = dict(run.acked)
                code = await leader.stop(signum)
                assert code == (0 if signum == signal.SIGTERM else -signal.SIGKILL)
                await asyncio.sleep(0.5)  # the producer keeps queueing meanwhile
                second = await leader.start()
                # Nothing acked was lost, and the log goes on from where it stopped.
                assert second["last_seqno"] >= max(acked_before)
                assert second["journal_entries"] > 0 and second["producers"] >= 1
                # Every start is a new epoch: a seqno never holds two different records
                # under one epoch, even after a crash lost an unsynced tail.
                assert second["epoch"] == first["epoch"] + 1
                resumed_at = len(run.acked)
                await eventually(
                    lambda: len(run.acked) >= resumed_at + 3000, "acks after the restart"
                )
                run.stop.set()
                await within(produce, "the producer's end")
            assert not run.failed, run.failed[:3]
            total = len(run.sent)
            assert sorted(run.acked) == list(range(1, total + 1))
            await eventually(
                lambda: all(len(s.records) >= total or s.error for s in subs),
                "subscribers to catch up",
            )
        finally:
            for task in sub_tasks:
                task.cancel()
            await asyncio.gather(*sub_tasks, return_exceptions=True)
            for s in subs:
                await s.subscriber.close()
        assert await leader.stop(signal.SIGTERM) == 0

    log_records = read_log(data_dir)
    check_exactly_once(log_records, total)
    stored = {r.seqno: r.payload for r in log_records}
    for seqno, data in run.acked.items():
        assert stored[seqno] == data, f"acked record {seqno} is not what the log holds"
    # Retried batches were deduplicated: each payload once, in the order it was sent.
    assert [r.payload for r in log_records] == run.sent
    for s in subs:
        assert s.error is None, f"{s.subscriber.mode}: {s.error!r}"
        check_exactly_once(s.records, total)
        assert [r.payload for r in s.records] == run.sent, s.subscriber.mode


@pytest.mark.parametrize("mode", ["multicast", "unicast", "notifications"])
async def test_a_leader_down_longer_than_server_timeout_is_an_error(
    tmp_path: Path, mode: str
) -> None:
    timeout_s = 1.5
    records: list[Record] = []
    async with running_leader(tmp_path / "log") as node:
        server = node.address
        async with Producer(server) as producer:
            for i in range(10):
                await producer.send(payload("p", i))
        subscriber = Subscriber(
            server, start=1, mode=mode, interface="127.0.0.1", server_timeout_s=timeout_s
        )
        await subscriber.open()
        batches = subscriber.batches()
        while len(records) < 10:
            records.extend(await within(anext(batches), "the ten records"))
        # The subscriber heard from the leader just now; from here it goes for good (a
        # slow stop on a loaded host must not count against the subscriber's timeout).
        stopped_at = time.monotonic()
    try:
        with pytest.raises(ServerUnavailableError):
            async with asyncio.timeout(timeout_s + 15):
                async for batch in batches:
                    records.extend(batch)
        waited = time.monotonic() - stopped_at
    finally:
        await subscriber.close()
    check_exactly_once(records, 10)
    assert timeout_s * 0.9 <= waited < timeout_s + 15, waited


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_a_batch_retried_after_a_restart_is_stored_once(tmp_path: Path, signum: int) -> None:
    """The retry of a batch whose ack was lost with the leader: the restarted leader knows
    it from the producer journal and answers with the original seqnos, storing nothing."""
    data_dir = tmp_path / "log"
    async with leader_process(data_dir) as leader:
        await leader.start()
        server = leader.address
        batches = [raw_batch("p1", n, [b"a%d" % n, b"b%d" % n]) for n in (1, 2)]
        other = raw_batch("p2", 1, [b"other"])
        first = await produce_raw(server, [*batches, other])
        assert [r.ack.base_seqno for r in first] == [1, 3, 5]
        assert not any(r.ack.duplicate for r in first)
        await leader.stop(signum)
        started = await leader.start()
        assert started["last_seqno"] == 5 and started["producers"] == 2
        again = await produce_raw(server, [batches[1], other, batches[0]])
        assert [(r.ack.base_seqno, r.ack.record_count, r.ack.duplicate) for r in again] == [
            (3, 2, True),
            (5, 1, True),
            (1, 2, True),
        ]
        # A new sequence of the same producer is appended after them.
        (new,) = await produce_raw(server, [raw_batch("p1", 3, [b"c3"])])
        assert (new.ack.base_seqno, new.ack.duplicate) == (6, False)
        assert await leader.stop(signal.SIGTERM) == 0
    records = read_log(data_dir)
    check_exactly_once(records, 6)
    assert [r.payload for r in records] == [b"a1", b"b1", b"a2", b"b2", b"other", b"c3"]


HUNG_S = 10.0  # a close that takes this long, even on a loaded host, has hung


async def test_stream_sender_close_always_returns() -> None:
    hangs = 0
    for attempt in range(40):
        group, _, port = random_group().rpartition(":")
        sender = StreamSender(
            group, int(port), epoch=1, page_size_bytes=1400, interface="127.0.0.1",
            heartbeat_ms=10, position=lambda: (0, 0),
        )  # fmt: skip
        sender.start()
        await asyncio.sleep(0.001 * (attempt % 15))
        if attempt % 2:
            sender.commit_advanced()  # the leader does this on every append
        closing = asyncio.ensure_future(sender.close())
        done, _ = await asyncio.wait([closing], timeout=HUNG_S)
        if not done:
            hangs += 1
            assert sender._task is not None
            sender._task.cancel()  # until it takes: clean up after the failed close
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(closing, 2)
    assert hangs == 0, f"close() hung {hangs} times in 40"


async def test_an_append_cancelled_mid_write_still_deduplicates_its_retry(
    tmp_path: Path,
) -> None:
    async with running_leader(tmp_path / "log", fsync=FsyncPolicy.parse("always")) as node:
        original = node.log.append_batch
        appending: list[asyncio.Task[Any]] = []

        def cancelled_while_writing(batch: Any) -> Any:
            appending[0].cancel()  # the Produce stream broke while the batch was being written
            return original(batch)

        node.log.append_batch = cancelled_while_writing  # type: ignore[method-assign,assignment]
        request = ProduceBatch(
            producer_id="p1",
            batch_sequence=1,
            expected_first_seqno=None,
            entries=[Entry(0, b"only-once", None, None)],
        )
        first = asyncio.create_task(node.append(request))
        appending.append(first)
        with pytest.raises(asyncio.CancelledError):
            await first
        assert node.log.last_seqno == 1, "the batch was stored"
        node.log.append_batch = original  # type: ignore[method-assign]
        retry = await node.append(request)  # the producer resends after reconnecting
        assert (retry.appended.base_seqno, retry.duplicate) == (1, True)
        assert node.log.last_seqno == 1
