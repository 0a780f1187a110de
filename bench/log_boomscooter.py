"""boomscooter in :mod:`bench.log_bench`: one leader, the SDK's Producer and Subscribers.

* Leader: ``boomscooter leader`` (a separate process at the benches' server nice level) on
  127.0.0.1, multicasting via 127.0.0.1 with 8 KiB pages (a jumbo-frame LAN; the default
  1400-byte pages are a flag away), ``--fsync interval:1``: every record a subscriber
  delivers is on disk (fdatasync'd) first — stronger than the peers, which deliver before
  their fsync (Redis ``appendfsync everysec``).
* Producer: :class:`boomscooter.Producer`, acks=leader, batches of up to 2000 records
  (``linger_ms`` 2; 0.2 in the latency run: a gRPC stream carries ~1.5k messages/s one
  after the other here, so 5k records/s need a few records per message).
* Subscribers: :class:`boomscooter.Subscriber` in multicast mode from seqno 1, batch-level
  iteration (``batches()``).
* Bytes the server sent: its gRPC port (acks, Fetch repairs, handshakes) plus every
  datagram to the stream's group port.

For experiments, ``BS_FSYNC`` (e.g. ``never``, ``always``) and ``BS_LINGER`` (the latency
run's linger in ms) override the two settings; the README's figures use the defaults.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.log_support import (
    HOST,
    Endpoint,
    Pacer,
    ProducerResult,
    Runner,
    ServerProcess,
    SubscriberResult,
    Tally,
    Workload,
    data_dir,
    filler,
    free_port,
    remove,
    stamped,
    wait_tcp,
)
from boomscooter import loops

PAGE_SIZE = 8192
FSYNC = os.environ.get("BS_FSYNC", "interval:1")
BATCH_RECORDS = 2000
LATENCY_LINGER_MS = 0.2


class BoomscooterRunner(Runner):
    name = "boomscooter"
    peer = False

    def __init__(self) -> None:
        self._server: ServerProcess | None = None
        self._dir: Path | None = None
        self._port = 0
        self._group_port = 0

    def describe(self) -> str:
        return (
            f"boomscooter: leader --fsync {FSYNC} (delivers only fsynced records), "
            f"{PAGE_SIZE}-byte multicast pages on lo; SDK Producer acks=leader, batches "
            f"<= {BATCH_RECORDS}; Subscribers multicast from seqno 1"
        )

    def start(self, workdir: Path) -> Endpoint:
        self.stop()
        self._port = free_port()
        self._group_port = free_port()
        group = f"239.255.{random.randrange(1, 255)}.{random.randrange(2, 254)}"
        self._dir = data_dir(workdir, self.name)
        argv = [
            sys.executable, "-m", "boomscooter.cli", "--log-json", "--log-level", "warning",
            "leader",
            "--data-dir", str(self._dir),
            "--listen", f"{HOST}:{self._port}",
            "--group", f"{group}:{self._group_port}",
            "--interface", HOST,
            "--page-size", str(PAGE_SIZE),
            "--fsync", FSYNC,
        ]  # fmt: skip
        self._server = ServerProcess(argv, self._dir.with_suffix(".log"))
        try:
            wait_tcp(self._port, proc=self._server.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"boomscooter leader: {exc}: {self._server.tail()}") from exc
        return {"address": f"{HOST}:{self._port}"}

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        remove(self._dir)
        self._dir = None

    def count_rules(self) -> list[str]:
        return [f"tcp sport {self._port}", f"udp dport {self._group_port}"]

    @staticmethod
    def producer(endpoint: Endpoint, work: Workload, ready: Callable[[], None]) -> ProducerResult:
        return loops.run(_produce(endpoint, work, ready))

    @staticmethod
    def subscriber(
        endpoint: Endpoint, work: Workload, index: int, ready: Callable[[], None]
    ) -> SubscriberResult:
        return loops.run(_subscribe(endpoint, work, index, ready))


async def _produce(endpoint: Endpoint, work: Workload, ready: Callable[[], None]) -> ProducerResult:
    from boomscooter.client.producer import Producer

    body = filler(work.payload_bytes)
    latency = work.rate is not None
    async with Producer(
        endpoint["address"],
        acks="leader",
        linger_ms=float(os.environ.get("BS_LINGER", LATENCY_LINGER_MS)) if latency else 2,
        max_batch_records=BATCH_RECORDS,
        max_in_flight=64,
    ) as producer:
        await producer.flush()  # connected
        await asyncio.get_running_loop().run_in_executor(None, ready)
        start = time.time_ns()
        if work.rate is None:
            send = producer.send
            for _ in range(work.records):
                await send(body)
        else:
            pacer = Pacer(work.rate)
            for i in range(work.records):
                delay = pacer.due(i)
                if delay > 0:
                    await asyncio.sleep(delay)
                await producer.send(stamped(body))
        await producer.flush()
        end = time.time_ns()
    return ProducerResult(start_ns=start, end_ns=end, records=work.records)


async def _subscribe(
    endpoint: Endpoint, work: Workload, index: int, ready: Callable[[], None]
) -> SubscriberResult:
    from boomscooter.client.subscriber import Subscriber

    tally = Tally(work)
    async with Subscriber(
        endpoint["address"], start=1, count=work.records, subscriber_id=f"bench-{index}"
    ) as sub:
        ready()
        async for records in sub.batches():
            tally.add([r.payload for r in records])
        stats = sub.stats
    if stats.get("mode") != "multicast":
        print(json.dumps({"subscriber": index, "stats": stats}), file=sys.stderr)
    return tally.result()
