"""``boomscooter demo``: an embedded cluster on loopback — a leader and two replicas —
producers, and subscribers in every mode on every node; finite; exits 0 only when every
subscriber got every record exactly once, in order, and the three logs are identical.

The leader commits a batch when two copies hold it (``min_insync=2``); two producers write
``records`` records between them at ``acks=quorum`` (channels ``demo.a`` and ``demo.b``)
while four subscribers follow live — on the multicast stream through the leader and through
a replica, unicast from the other replica, in notifications mode reading the leader's
segment files — and one more multicast subscriber starts from seqno 1 halfway through
(catch-up by Fetch, then live). The replicas receive the same multicast pages as the
subscribers: the leader sends each batch once. Afterwards a direct-file reader reads each
node's log. Each view must equal the log: seqnos 1…N contiguous, the same payload at every
seqno, each producer's records in its own order.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

from boomscooter.client.producer import Producer
from boomscooter.client.subscriber import Subscriber
from boomscooter.node.config import NodeConfig
from boomscooter.node.runtime import Node, start_leader
from boomscooter.storage import LogReader
from boomscooter.storage.batch import Record

DEMO_GROUP = "239.255.66.77:7677"


@dataclass
class View:
    name: str
    mode: str
    seqnos_ok: bool = True
    count: int = 0
    next_seqno: int = 1
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    stats: dict[str, object] = field(default_factory=dict)
    error: str = ""

    def add(self, records: list[Record]) -> None:
        for record in records:
            if record.seqno != self.next_seqno:
                self.seqnos_ok = False
            self.next_seqno = record.seqno + 1
            self.digest.update(b"%d:%s\n" % (record.seqno, record.payload))
        self.count += len(records)


async def _produce(servers: str, name: str, count: int) -> list[int]:
    seqnos: list[asyncio.Future[int | None]] = []
    async with Producer(servers, acks="quorum", channel=f"demo.{name}") as producer:
        for i in range(count):
            seqnos.append(await producer.send(b"%s-%07d" % (name.encode(), i)))
            if i % 2000 == 1999:
                await asyncio.sleep(0.005)  # a steady stream rather than one burst
        await producer.flush()
    return [int(f.result() or 0) for f in seqnos]


async def _follow(view: View, address: str, total: int, **options: object) -> None:
    try:
        async with Subscriber(address, count=total, mode=view.mode, **options) as sub:  # type: ignore[arg-type]
            async for records in sub.batches():
                view.add(records)
            view.stats = sub.stats
    except Exception as exc:
        view.error = f"{type(exc).__name__}: {exc}"


def _read_files(name: str, data_dir: str) -> View:
    view = View(name, "direct files")
    with LogReader(data_dir, from_seqno=1) as reader:
        while batches := reader.read_batches(max_bytes=4 << 20):
            for batch in batches:
                view.add(list(batch.records()))
    return view


def _config(data_dir: str, **options: object) -> NodeConfig:
    return NodeConfig(
        data_dir=data_dir,
        listen="127.0.0.1:0",
        group=DEMO_GROUP,
        interface="127.0.0.1",
        page_size_bytes=8192,
        segment_bytes=4 << 20,
        **options,  # type: ignore[arg-type]
    )


async def run_demo(*, records: int = 100_000) -> int:
    root = tempfile.mkdtemp(prefix="boomscooter-demo-")
    total = records - records % 2
    half = total // 2
    dirs = [os.path.join(root, n) for n in ("leader", "replica-1", "replica-2")]
    nodes: list[Node] = []
    try:
        nodes.append(await start_leader(_config(dirs[0], min_insync=2)))
        leader = nodes[0]
        for data_dir in dirs[1:]:
            nodes.append(await start_leader(_config(data_dir, follow=leader.address)))
        async with asyncio.timeout(30):
            while leader.replicas.in_sync_copies() < 3:  # noqa: ASYNC110 (a demo's poll)
                await asyncio.sleep(0.01)
        addresses = [n.address for n in nodes]
        print(
            f"leader on {addresses[0]}, replicas on {addresses[1]} and {addresses[2]}; data "
            f"in {root}; stream {DEMO_GROUP} (loopback); min_insync=2, acks=quorum"
        )
        views = [
            View("sub-1@leader", "multicast"),
            View("sub-2@replica-1", "multicast"),
            View("sub-3@replica-2", "unicast"),
            View("sub-4@leader", "notifications"),
        ]
        homes = [addresses[0], addresses[1], addresses[2], addresses[0]]
        started = time.monotonic()
        followers = [
            asyncio.create_task(_follow(v, home, total, start=1))
            for v, home in zip(views, homes, strict=True)
        ]
        await asyncio.sleep(0.3)
        servers = ",".join(addresses)
        producers = [asyncio.create_task(_produce(servers, name, half)) for name in ("a", "b")]
        late = View("late@replica-2", "multicast")
        while leader.log.last_seqno < total // 2:  # noqa: ASYNC110 (a demo's simple poll)
            await asyncio.sleep(0.01)
        followers.append(asyncio.create_task(_follow(late, addresses[2], total, start=1)))
        views.append(late)
        acked = await asyncio.gather(*producers)
        await asyncio.wait_for(asyncio.gather(*followers), 120)
        seconds = time.monotonic() - started
        sent = leader.sender.bytes_sent if leader.sender is not None else 0
        for node in reversed(nodes):
            await node.stop()
        nodes.clear()
        names = ("files@leader", "files@replica-1", "files@replica-2")
        views.extend(_read_files(n, d) for n, d in zip(names, dirs, strict=True))
    finally:
        for node in nodes:
            await node.stop()
        shutil.rmtree(root, ignore_errors=True)
    return _summary(views, acked, total, seconds, sent)


def _summary(
    views: list[View], acked: list[list[int]], total: int, seconds: float, sent: int
) -> int:
    reference = views[-1].digest.hexdigest()
    acked_ok = sorted(s for seqnos in acked for s in seqnos) == list(range(1, total + 1))
    ok = acked_ok
    print(f"\n{'view':<16} {'mode':<14} {'records':>8}  {'in order':<8}  {'= log':<5}  notes")
    for view in views:
        same = view.digest.hexdigest() == reference
        good = not view.error and view.count == total and view.seqnos_ok and same
        ok = ok and good
        notes = view.error or ", ".join(
            f"{k}={v}"
            for k, v in view.stats.items()
            if k in ("fetches", "gaps", "responses", "notifications") and v
        )
        print(
            f"{view.name:<16} {view.mode:<14} {view.count:>8}  "
            f"{'yes' if view.seqnos_ok else 'NO':<8}  {'yes' if same else 'NO':<5}  {notes}"
        )
    subscribers = 2 + sum(1 for v in views if v.mode == "multicast")  # replicas too
    print(
        f"\n{total} records from 2 producers acknowledged with seqnos 1..{total}: "
        f"{'yes' if acked_ok else 'NO'}"
    )
    print(
        f"the leader multicast {sent / 1e6:.1f} MB once for 2 replicas and "
        f"{subscribers - 2} multicast subscribers (a copy each would be "
        f"{subscribers * sent / 1e6:.1f} MB); "
        f"{seconds:.1f} s"
    )
    print(
        "demo: "
        + (
            "every view holds every record exactly once, in order; the three logs are identical"
            if ok
            else "FAILED"
        )
    )
    return 0 if ok else 1
