"""The log end to end in one process: producers → leader → subscribers in every mode.

Acceptance of the leader/SDK issue: 100k records from 2 concurrent producers reach 4
multicast subscribers, 1 unicast subscriber and the direct-file reader exactly once; a
subscriber from seqno 1 after 50k records catches up while production continues; page
loss (a test hook dropping pages) is repaired; garbage and foreign-cast datagrams on the
group change nothing.
"""

from __future__ import annotations

import asyncio
import random
import socket
from pathlib import Path
from typing import Any

import pytest

from boomscooter.client.producer import Producer
from boomscooter.client.subscriber import Subscriber
from boomscooter.node.runtime import Node
from boomscooter.storage import LogReader
from boomscooter.storage.batch import Record
from boomscooter.stream import StreamEncoder
from bootcast import page as bpage

from support.log import (
    check_exactly_once,
    check_payloads,
    check_producer_order,
    following,
    payload,
    running_leader,
)
from support.net import random_group
from support.waiting import eventually, within

pytestmark = pytest.mark.timeout(120)


async def produce(
    address: str, name: str, count: int, *, pause_every: int = 5000, batch: int = 10_000
) -> list[int]:
    """``count`` records ``name-00000000``…; returns the acked seqnos in send order."""
    futures = []
    async with Producer(
        address, acks="leader", channel=f"ch.{name}", linger_ms=2, max_batch_records=batch
    ) as producer:
        for i in range(count):
            futures.append(await producer.send(payload(name, i)))
            if i % pause_every == pause_every - 1:
                await asyncio.sleep(0.002)  # a stream, not one burst
        await producer.flush()
    return [int(f.result() or 0) for f in futures]


async def collect(sub: Subscriber, out: list[Record]) -> dict[str, Any]:
    async with sub:
        async for records in sub.batches():
            out.extend(records)
        return sub.stats


def log_payloads(node: Node) -> dict[int, bytes]:
    return {r.seqno: r.payload for r in node.log.read(1)}


@pytest.mark.slow
async def test_100k_records_two_producers_every_view_exactly_once(tmp_path: Path) -> None:
    total, half = 100_000, 50_000
    async with running_leader(tmp_path / "log", page_size_bytes=8192) as node:
        views: list[list[Record]] = [[] for _ in range(5)]
        modes = ["multicast"] * 4 + ["unicast"]
        subs = [
            Subscriber(node.address, start=1, count=total, mode=mode, interface="127.0.0.1")
            for mode in modes
        ]
        followers = [asyncio.create_task(collect(s, v)) for s, v in zip(subs, views, strict=True)]
        for sub in subs:
            await following(sub)
        acked = await asyncio.gather(
            produce(node.address, "a", half), produce(node.address, "b", half)
        )
        stats = await within(asyncio.gather(*followers), "every view of the 100k records")
        log_records = log_payloads(node)
    assert sorted(acked[0] + acked[1]) == list(range(1, total + 1))
    for records, mode, stat in zip(views, modes, stats, strict=True):
        assert stat["mode"] == mode
        check_exactly_once(records, total)
        check_payloads(records, log_records)
        check_producer_order(records, {"a": half, "b": half})
    for name, seqnos in zip("ab", acked, strict=True):  # each ack names the stored record
        assert [log_records[s] for s in seqnos] == [payload(name, i) for i in range(half)]
    with LogReader(tmp_path / "log", from_seqno=1) as reader:
        direct = [
            r for batches in iter(reader.read_batches, []) for b in batches for r in b.records()
        ]
    check_exactly_once(direct, total)
    check_payloads(direct, log_records)


async def test_catch_up_from_seqno_1_while_production_continues(tmp_path: Path) -> None:
    async with running_leader(tmp_path / "log", page_size_bytes=8192) as node:
        await produce(node.address, "a", 50_000)
        live = asyncio.create_task(produce(node.address, "b", 30_000, pause_every=1000))
        await eventually(lambda: node.log.last_seqno > 50_000, "the live production")
        records: list[Record] = []
        stats = await within(
            collect(Subscriber(node.address, start=1, count=80_000), records), "the catch-up"
        )
        await live
        log_records = log_payloads(node)
    check_exactly_once(records, 80_000)
    check_payloads(records, log_records)
    check_producer_order(records, {"a": 50_000, "b": 30_000})
    assert stats["mode"] == "multicast"
    assert stats["fetched_batches"] > 0  # the backlog came by Fetch …
    assert stats["pages"] > 0  # … and the live part by multicast


@pytest.mark.parametrize("loss", [0.05, 0.20])
async def test_lost_pages_are_repaired_exactly_once(tmp_path: Path, loss: float) -> None:
    rng = random.Random(int(loss * 100))
    dropped = 0

    def lossy(_: bytes) -> bool:
        nonlocal dropped
        if rng.random() < loss:
            dropped += 1
            return False
        return True

    async with running_leader(tmp_path / "log", page_size_bytes=1400) as node:
        records: list[Record] = []
        sub = Subscriber(node.address, start=1, count=20_000, page_filter=lossy)
        follower = asyncio.create_task(collect(sub, records))
        await following(sub)
        await produce(node.address, "a", 20_000, pause_every=500)
        stats = await within(follower, "the repaired records")
        log_records = log_payloads(node)
    assert dropped > 0
    check_exactly_once(records, 20_000)
    check_payloads(records, log_records)
    assert stats["fetches"] > 0 and stats["gaps"] > 0


async def test_tail_loss_is_noticed_from_heartbeats(tmp_path: Path) -> None:
    """The last batch's pages are all lost: only a heartbeat tells the subscriber."""
    drop = False

    def filter_(data: bytes) -> bool:
        return not drop or len(data) < 100  # heartbeats (short pages) pass

    async with running_leader(tmp_path / "log") as node:
        records: list[Record] = []
        sub = Subscriber(node.address, start=1, count=200, page_filter=filter_)
        follower = asyncio.create_task(collect(sub, records))
        await following(sub)
        await produce(node.address, "a", 100)
        await eventually(lambda: len(records) == 100, "the first 100 records delivered")
        drop = True
        await produce(node.address, "b", 100)
        stats = await within(follower, "the records of the lost tail")
    check_exactly_once(records, 200)
    assert stats["fetches"] >= 1


async def test_garbage_and_foreign_casts_on_the_group_change_nothing(tmp_path: Path) -> None:
    async with running_leader(tmp_path / "log") as node:
        records: list[Record] = []
        sub = Subscriber(node.address, start=1, count=3000)
        follower = asyncio.create_task(collect(sub, records))
        await following(sub)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        dest = (node.group, node.group_port)
        foreign = StreamEncoder(epoch=node.epoch + 5)  # another cast id, a plausible stream
        older = StreamEncoder(epoch=0)
        rng = random.Random(7)
        try:
            for i in range(3):
                await produce(node.address, f"p{i}", 1000)
                for _ in range(50):
                    sock.sendto(rng.randbytes(rng.randrange(0, 1500)), dest)
                sock.sendto(foreign.heartbeat(10**9, 10**9), dest)
                sock.sendto(older.heartbeat(10**9, 10**9), dest)
                good = bpage.encode(1, node.epoch, b"\xb7\x01\x01\x00" + b"\x00" * 40)
                sock.sendto(good[:-8], dest)  # truncated
                sock.sendto(good[:20] + bytes([good[20] ^ 1]) + good[21:], dest)  # bad CRC
        finally:
            sock.close()
        stats = await within(follower, "the 3000 records")
        log_records = log_payloads(node)
        assert node.log.last_seqno == 3000
    check_exactly_once(records, 3000)
    check_payloads(records, log_records)
    drops = {k: v for k, v in stats.items() if k.startswith("drop_")}
    assert sum(drops.values()) >= 150, drops
    assert stats.get("epochs", 0) == 0  # a forged newer cast id did not restart the stream


async def test_sync_iteration_and_channel_filter(tmp_path: Path) -> None:
    async with running_leader(tmp_path / "log") as node:
        await asyncio.gather(produce(node.address, "a", 500), produce(node.address, "b", 500))

        def read() -> list[Record]:
            with Subscriber(node.address, start="earliest", count=500, channel="ch.b") as sub:
                return list(sub)

        records = await asyncio.to_thread(read)
    assert [r.payload for r in records] == [payload("b", i) for i in range(500)]
    assert [r.seqno for r in records] == sorted({r.seqno for r in records})


async def test_start_below_retention_is_an_explicit_error(tmp_path: Path) -> None:
    from boomscooter.errors import TrimmedError

    async with running_leader(tmp_path / "log", segment_bytes=4096, retention_bytes=8192) as node:
        await produce(node.address, "a", 2000, batch=100)
        assert await node.apply_retention() > 0
        first = node.log.first_seqno
        assert first > 1
        for mode in ("multicast", "unicast", "notifications"):
            with pytest.raises(TrimmedError):
                async with Subscriber(node.address, start=1, mode=mode) as sub:
                    async for _ in sub.batches():
                        pass


async def test_loss_repair_on_uvloop(tmp_path: Path) -> None:
    """The CLI, the demo and the blocking SDK run on uvloop (boomscooter.loops): the
    subscriber's timers and socket callbacks must work there too."""
    from boomscooter import loops

    rng = random.Random(5)

    def lossy(_: bytes) -> bool:
        return rng.random() >= 0.1

    async with running_leader(tmp_path / "log", page_size_bytes=1400) as node:
        errors: list[str] = []
        sub = Subscriber(node.address, start=1, count=5000, page_filter=lossy)

        async def follow() -> tuple[list[Record], dict[str, Any]]:
            asyncio.get_running_loop().set_exception_handler(
                lambda _, context: errors.append(str(context.get("exception", context)))
            )
            records: list[Record] = []
            stats = await within(collect(sub, records), "the 5000 records on uvloop")
            return records, stats

        follower = asyncio.create_task(asyncio.to_thread(loops.run, follow()))
        await following(sub)
        await produce(node.address, "a", 5000, pause_every=250)
        records, stats = await follower
        log_records = log_payloads(node)
    loop_name = type(loops.new_event_loop()).__module__
    assert loop_name.startswith("uvloop"), loop_name
    assert errors == []  # no callback failed (uvloop's timer handles differ from asyncio's)
    check_exactly_once(records, 5000)
    check_payloads(records, log_records)
    assert stats["gaps"] > 0 and stats["fetches"] > 0


async def test_two_logs_on_one_group_never_mix(tmp_path: Path) -> None:
    """Two leaders, both at epoch 1, multicast on the same group and port: a subscriber
    of one delivers only its own log (pages are filtered by the source port the
    handshake names)."""
    group = random_group()
    async with (
        running_leader(tmp_path / "a", group=group) as a,
        running_leader(tmp_path / "b", group=group) as b,
    ):
        assert (a.epoch, a.group_port) == (b.epoch, b.group_port)
        records: list[Record] = []
        sub = Subscriber(a.address, start=1, count=300)
        follower = asyncio.create_task(collect(sub, records))
        await following(sub)
        await produce(b.address, "B", 500)  # B first: its heartbeats commit further than A
        await produce(a.address, "A", 300)
        stats = await within(follower, "A's 300 records")
    check_exactly_once(records, 300)
    assert [r.payload for r in records] == [payload("A", i) for i in range(300)]
    assert stats["mode"] == "multicast"
    assert stats["drop_foreign_source"] > 0
