"""boomscooter's own runners: :class:`BoomscooterRunner` in :mod:`bench.log_bench` (one
leader, the SDK's Producer and Subscribers) and :class:`BoomscooterCluster` in
:mod:`bench.replication_bench` (a leader and two replicas, the Producer at acks=quorum).

In :mod:`bench.log_bench`:

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

In :mod:`bench.replication_bench`: ``boomscooter leader --min-insync 2 --fsync F`` and two
``boomscooter replica --leader ... --fsync F``, all on 127.0.0.1 (multicast via 127.0.0.1),
each a process at the benches' server nice level; the producer starts once ``boomscooter
status --json`` shows both replicas in sync. Producer: :class:`boomscooter.Producer` with
acks=quorum, batches of up to 2000 records, 64 in flight (throughput; linger 2 ms) and
linger 0.2 ms in the paced latency run (the bench's ``--latency-linger-ms``). Latency of a
record: ``time.time_ns()`` right before ``send`` to the moment its acknowledgement is
processed in the producer. The cluster has no subscribers.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import subprocess
import sys
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import (
    AckedResult,
    Endpoint,
    Pacer,
    ProducerResult,
    Runner,
    SubscriberResult,
    Tally,
    Workload,
    filler,
    stamped,
)
from bench.processes import (
    CLUSTER_START_TIMEOUT_S,
    HOST,
    ServerProcess,
    data_dir,
    free_port,
    remove,
    wait_tcp,
)
from boomscooter import loops

PAGE_SIZE = 8192
FSYNC = os.environ.get("BS_FSYNC", "interval:1")
BATCH_RECORDS = 2000
LATENCY_LINGER_MS = 0.2
REPO = Path(__file__).resolve().parent.parent
REPLICAS = 2
MAX_IN_FLIGHT = 64


# --- one leader: the log bench -------------------------------------------------------------


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


# --- a leader and two replicas: the replication bench --------------------------------------


def _cli(*args: str, timeout_s: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "boomscooter.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def _log_events(path: Path) -> list[dict[str, Any]]:
    events = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            event = {"event": line.strip(), "level": "text"}
        if isinstance(event, dict):
            events.append(event)
    return events


class BoomscooterCluster(Runner):
    """``boomscooter leader`` + 2 ``boomscooter replica`` with ``--fsync`` ``fsync``."""

    name = "boomscooter"
    peer = False

    def __init__(
        self, fsync: str, page_size: int | None = None, linger_ms: float = LATENCY_LINGER_MS
    ) -> None:
        self.fsync = fsync
        self.page_size = page_size
        self.linger_ms = linger_ms
        self._nodes: list[ServerProcess] = []
        self._dirs: list[Path] = []
        self.address = ""

    def describe(self) -> str:
        page = f"--page-size {self.page_size}" if self.page_size else "default page size"
        return (
            f"boomscooter: leader --min-insync 2 + {REPLICAS} replicas, --fsync {self.fsync}, "
            f"{page}; Producer acks=quorum, batches <= {BATCH_RECORDS}, {MAX_IN_FLIGHT} in "
            f"flight (linger 2 ms; {self.linger_ms:g} ms paced)"
        )

    def _node(self, workdir: Path, role: str, port: int, group: str, extra: list[str]) -> None:
        d = data_dir(workdir, f"bs-{role}")
        self._dirs.append(d)
        argv = [
            sys.executable, "-m", "boomscooter.cli", "--log-json", "--log-level", "info",
            role,
            "--data-dir", str(d),
            "--listen", f"{HOST}:{port}",
            "--group", group,
            "--interface", HOST,
            "--fsync", self.fsync,
            *(["--page-size", str(self.page_size)] if self.page_size else []),
            *extra,
        ]  # fmt: skip
        node = ServerProcess(argv, d.with_suffix(".log"))
        self._nodes.append(node)
        try:
            wait_tcp(port, timeout_s=CLUSTER_START_TIMEOUT_S, proc=node.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"boomscooter {role}: {exc}: {node.tail()}") from exc

    def start(self, workdir: Path) -> Endpoint:
        self.stop()
        group = f"239.255.{random.randrange(1, 255)}.{random.randrange(2, 254)}:{free_port()}"
        port = free_port()
        self.address = f"{HOST}:{port}"
        self._node(workdir, "leader", port, group, ["--min-insync", str(REPLICAS + 1)])
        for _ in range(REPLICAS):
            self._node(workdir, "replica", free_port(), group, ["--leader", self.address])
        deadline = time.monotonic() + CLUSTER_START_TIMEOUT_S
        while True:
            status = self.status()
            replicas = status.get("replicas", [])
            if len(replicas) == REPLICAS and all(r["in_sync"] for r in replicas):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"replicas not in sync after {CLUSTER_START_TIMEOUT_S:g} s: {status}"
                )
            time.sleep(0.2)
        return {"address": self.address, "linger_ms": self.linger_ms}

    def status(self) -> dict[str, Any]:
        """``boomscooter status --json`` of the leader (``{"error": ...}`` if it fails)."""
        try:
            out = _cli("status", "--server", self.address, "--json")
        except subprocess.TimeoutExpired:
            return {"error": "status timed out"}
        if out.returncode != 0:
            return {"error": out.stderr.strip()}
        status: dict[str, Any] = json.loads(out.stdout)
        return status

    def health(self) -> str:
        """What went wrong so far, as a note ("" if nothing): replicas out of sync or
        behind in the leader's status, commit behind the log, warnings in the nodes' logs."""
        notes = []
        status = self.status()
        if "error" in status:
            notes.append(f"status: {status['error']}")
        else:
            for r in status["replicas"]:
                if not r["in_sync"] or r["durable_seqno"] < status["commit_seqno"]:
                    notes.append(
                        f"replica {r['address']} in_sync={r['in_sync']} "
                        f"durable={r['durable_seqno']} of {status['last_seqno']}"
                    )
            if status["commit_seqno"] != status["last_seqno"]:
                notes.append(f"commit {status['commit_seqno']} < last {status['last_seqno']}")
        for role, node in zip(["leader", "replica1", "replica2"], self._nodes, strict=False):
            bad = [
                str(e.get("event"))
                for e in _log_events(node.log)
                if e.get("level") in ("warning", "error", "critical", "text")
                or e.get("event") in ("replica.disconnected", "replica.session_ended")
            ]
            if bad:
                counts = {name: bad.count(name) for name in dict.fromkeys(bad)}
                notes.append(f"{role} log: " + ", ".join(f"{k} x{v}" for k, v in counts.items()))
            if node.proc.poll() is not None:
                notes.append(f"{role} exited {node.proc.returncode}: {node.tail(1)}")
        return "; ".join(notes)

    def stop(self) -> None:
        for node in reversed(self._nodes):
            node.stop()
        self._nodes = []
        for d in self._dirs:
            remove(d)
            d.with_suffix(".log").unlink(missing_ok=True)
        self._dirs = []

    def count_rules(self) -> list[str]:
        return []

    @staticmethod
    def producer(endpoint: Endpoint, work: Workload, ready: Callable[[], None]) -> ProducerResult:
        return loops.run(_produce_acked(endpoint, work, ready))

    @staticmethod
    def subscriber(
        endpoint: Endpoint, work: Workload, index: int, ready: Callable[[], None]
    ) -> SubscriberResult:
        raise NotImplementedError("the replication bench has no subscribers")


async def _produce_acked(
    endpoint: Endpoint, work: Workload, ready: Callable[[], None]
) -> AckedResult:
    from boomscooter.client.producer import Producer

    body = filler(work.payload_bytes)
    lat = array("q", bytes(8 * work.records)) if work.latency else array("q")
    async with Producer(
        endpoint["address"],
        acks="quorum",
        linger_ms=endpoint["linger_ms"] if work.latency else 2,
        max_batch_records=BATCH_RECORDS,
        max_in_flight=MAX_IN_FLIGHT,
    ) as producer:
        await producer.flush()  # connected
        await asyncio.get_running_loop().run_in_executor(None, ready)
        start = time.time_ns()
        if work.rate is None:
            send = producer.send
            for _ in range(work.records):
                await send(body)
        else:
            now = time.time_ns

            def acked(i: int, sent: int, future: asyncio.Future[int | None]) -> None:
                lat[i] = now() - sent

            pacer = Pacer(work.rate)
            for i in range(work.records):
                delay = pacer.due(i)
                if delay > 0:
                    await asyncio.sleep(delay)
                sent = now()
                future = await producer.send(body)
                future.add_done_callback(functools.partial(acked, i, sent))
        await producer.flush()
        end = time.time_ns()
    return AckedResult(start_ns=start, end_ns=end, records=work.records, latencies_ns=lat.tobytes())
