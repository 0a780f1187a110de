"""``boomscooter demo``: an embedded leader on loopback, producers, and subscribers in every
mode; finite; exits 0 only when every subscriber got every record exactly once, in order.

Two producers write ``records`` records between them (channels ``demo.a`` and ``demo.b``)
while four subscribers follow live — two on the multicast stream, one unicast, one in
notifications mode reading the segment files — and one more multicast subscriber starts
from seqno 1 halfway through (catch-up by Fetch, then live). Afterwards the direct-file
reader reads the whole log. Each view must equal the log: seqnos 1…N contiguous, the same
payload at every seqno, each producer's records in its own order.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
import time
from dataclasses import dataclass, field

from boomscooter.client.producer import Producer
from boomscooter.client.subscriber import Subscriber
from boomscooter.node.leader import LeaderConfig, start_leader
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


async def _produce(address: str, name: str, count: int) -> list[int]:
    seqnos: list[asyncio.Future[int | None]] = []
    async with Producer(address, acks="leader", channel=f"demo.{name}") as producer:
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


async def run_demo(*, records: int = 100_000) -> int:
    data_dir = tempfile.mkdtemp(prefix="boomscooter-demo-")
    total = records - records % 2
    half = total // 2
    try:
        node = await start_leader(
            LeaderConfig(
                data_dir=data_dir,
                listen="127.0.0.1:0",
                group=DEMO_GROUP,
                interface="127.0.0.1",
                page_size_bytes=8192,
                segment_bytes=4 << 20,
            )
        )
        address = node.address
        print(f"leader on {address}, data in {data_dir}, stream {DEMO_GROUP} (loopback)")
        views = [
            View("sub-1", "multicast"),
            View("sub-2", "multicast"),
            View("sub-3", "unicast"),
            View("sub-4", "notifications"),
        ]
        started = time.monotonic()
        followers = [asyncio.create_task(_follow(v, address, total, start=1)) for v in views]
        await asyncio.sleep(0.3)
        producers = [asyncio.create_task(_produce(address, name, half)) for name in ("a", "b")]
        late = View("late-from-1", "multicast")
        while node.log.last_seqno < total // 2:  # noqa: ASYNC110 (a demo's simple poll)
            await asyncio.sleep(0.01)
        followers.append(asyncio.create_task(_follow(late, address, total, start=1)))
        views.append(late)
        acked = await asyncio.gather(*producers)
        await asyncio.wait_for(asyncio.gather(*followers), 120)
        seconds = time.monotonic() - started
        reader_view = View("file-reader", "direct files")
        with LogReader(data_dir, from_seqno=1) as reader:
            while batches := reader.read_batches(max_bytes=4 << 20):
                for batch in batches:
                    reader_view.add(list(batch.records()))
        views.append(reader_view)
        sent = node.sender.bytes_sent if node.sender is not None else 0
        await node.stop()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return _summary(views, acked, total, seconds, sent)


def _summary(
    views: list[View], acked: list[list[int]], total: int, seconds: float, sent: int
) -> int:
    reference = views[-1].digest.hexdigest()
    acked_ok = sorted(s for seqnos in acked for s in seqnos) == list(range(1, total + 1))
    ok = acked_ok
    print(f"\n{'view':<13} {'mode':<14} {'records':>8}  {'in order':<8}  {'= log':<5}  notes")
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
            f"{view.name:<13} {view.mode:<14} {view.count:>8}  "
            f"{'yes' if view.seqnos_ok else 'NO':<8}  {'yes' if same else 'NO':<5}  {notes}"
        )
    subscribers = sum(1 for v in views if v.mode == "multicast")
    print(
        f"\n{total} records from 2 producers acknowledged with seqnos 1..{total}: "
        f"{'yes' if acked_ok else 'NO'}"
    )
    print(
        f"the leader multicast {sent / 1e6:.1f} MB once for {subscribers} multicast "
        f"subscribers (a copy each would be {subscribers * sent / 1e6:.1f} MB); "
        f"{seconds:.1f} s"
    )
    print("demo: " + ("every view holds every record exactly once, in order" if ok else "FAILED"))
    return 0 if ok else 1
