"""The clusters of :mod:`bench.replication_bench`: boomscooter leader + 2 replicas and NATS
JetStream R3, each a :class:`bench.log_support.Runner` whose producer (a spawned process,
run by :func:`bench.log_support.run_workload` with no subscribers) also returns per-record
ack latencies.

* boomscooter: ``boomscooter leader --min-insync 2 --fsync F`` and two ``boomscooter
  replica --leader ... --fsync F``, all on 127.0.0.1 (multicast via 127.0.0.1), each a
  process at the benches' server nice level; the producer starts once ``boomscooter status
  --json`` shows both replicas in sync. Producer: :class:`boomscooter.Producer` with
  acks=quorum, batches of up to 2000 records, 64 in flight (throughput; linger 2 ms) and
  linger 0.2 ms in the paced latency run (as in :mod:`bench.log_boomscooter`; the
  bench's ``--latency-linger-ms``).
* nats: three ``nats-server`` clustered over routes on 127.0.0.1, JetStream file storage, a
  stream with ``num_replicas=3``; the producer connects to the stream's leader. Throughput:
  asynchronous publishes in windows of 1000 with 4 windows in flight (``--nats-windows``; the
  protocol of ``js.publish_async``, see :mod:`bench.log_peers`); latency: one publish per
  record when due. ``sync_interval: always`` (fsync per write) when the server accepts it
  (nats-server >= 2.10); older servers fsync on their own schedule (every 2 minutes).

Latency of a record: ``time.time_ns()`` right before ``send``/``publish`` to the moment its
acknowledgement is processed in the producer.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.log_boomscooter import BATCH_RECORDS, LATENCY_LINGER_MS
from bench.log_peers import CHUNK, _Acks, _nats
from bench.log_support import (
    HOST,
    Endpoint,
    Pacer,
    ProducerResult,
    Runner,
    ServerProcess,
    SubscriberResult,
    Workload,
    data_dir,
    filler,
    free_port,
    remove,
    wait_tcp,
)
from boomscooter import loops

REPO = Path(__file__).resolve().parent.parent
REPLICAS = 2
MAX_IN_FLIGHT = 64
WINDOWS = 4
"""NATS throughput: publish windows of CHUNK records in flight by default."""
NATS_STREAM = "REPLBENCH"
NATS_SUBJECT = "replbench"
START_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class AckedResult(ProducerResult):
    """A producer's result with, in latency runs, each record's ack latency in send order
    (``array('q')`` bytes, ns)."""

    latencies_ns: bytes = b""


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
            wait_tcp(port, timeout_s=START_TIMEOUT_S, proc=node.proc)
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
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            status = self.status()
            replicas = status.get("replicas", [])
            if len(replicas) == REPLICAS and all(r["in_sync"] for r in replicas):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas not in sync after {START_TIMEOUT_S:g} s: {status}")
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
        return loops.run(_bs_produce(endpoint, work, ready))

    @staticmethod
    def subscriber(
        endpoint: Endpoint, work: Workload, index: int, ready: Callable[[], None]
    ) -> SubscriberResult:
        raise NotImplementedError("the replication bench has no subscribers")


async def _bs_produce(endpoint: Endpoint, work: Workload, ready: Callable[[], None]) -> AckedResult:
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


# --- NATS JetStream R3 ---------------------------------------------------------------------


def nats_sync_always_supported() -> bool:
    """Whether this nats-server accepts ``jetstream { sync_interval: always }``
    (``nats-server -t``: test the configuration and exit)."""
    with tempfile.TemporaryDirectory(prefix="replbench-conf-") as tmp:
        conf = Path(tmp) / "test.conf"
        conf.write_text(f'jetstream {{ store_dir: "{tmp}", sync_interval: always }}\n')
        proc = subprocess.run(
            ["nats-server", "-t", "-c", str(conf)], capture_output=True, timeout=10, check=False
        )
    return proc.returncode == 0


def nats_version() -> str:
    try:
        out = subprocess.run(["nats-server", "--version"], capture_output=True, text=True,
                             timeout=10, check=False)  # fmt: skip
    except OSError:
        return "not found"
    return out.stdout.strip().removeprefix("nats-server: ")


class NatsCluster(Runner):
    """Three clustered ``nats-server -c`` with JetStream; a stream with 3 replicas.
    ``sync_always``: ``sync_interval: always`` in each server's jetstream block."""

    name = "nats R3"
    binary = "nats-server"

    def __init__(self, sync_always: bool, windows: int = WINDOWS) -> None:
        self.sync_always = sync_always
        self.windows = windows
        self._servers: list[ServerProcess] = []
        self._dirs: list[Path] = []

    def missing(self) -> str | None:
        if shutil.which(self.binary) is None:
            return "nats-server not found"
        try:
            import nats  # noqa: F401
        except ImportError:
            return "python module nats not installed"
        return None

    def describe(self) -> str:
        from nats.aio.client import __version__

        sync = "sync_interval: always" if self.sync_always else "default sync (every 2 min)"
        return (
            f"nats R3: nats-server {nats_version()} x3, routes on {HOST}, file storage, "
            f"{sync}; nats-py {__version__}, publishes acked in windows of {CHUNK}, "
            f"{self.windows} in flight, to the stream leader"
        )

    def start(self, workdir: Path) -> Endpoint:
        self.stop()
        ports = [free_port() for _ in range(3)]
        routes = [free_port() for _ in range(3)]
        for i in range(3):
            d = data_dir(workdir, f"nats{i + 1}")
            self._dirs.append(d)
            others = ", ".join(f'"nats-route://{HOST}:{p}"' for j, p in enumerate(routes) if j != i)
            sync = "  sync_interval: always\n" if self.sync_always else ""
            conf = d / "server.conf"
            conf.write_text(
                f'server_name: "n{i + 1}"\nlisten: "{HOST}:{ports[i]}"\n'
                f'jetstream {{\n  store_dir: "{d / "js"}"\n{sync}}}\n'
                f'cluster {{\n  name: "replbench"\n  listen: "{HOST}:{routes[i]}"\n'
                f"  routes: [{others}]\n}}\n"
            )
            self._servers.append(ServerProcess(["nats-server", "-c", str(conf)], d / "log"))
        for port, server in zip(ports, self._servers, strict=True):
            try:
                wait_tcp(port, timeout_s=START_TIMEOUT_S, proc=server.proc)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"nats-server: {exc}: {server.tail()}") from exc
        leader = asyncio.run(_add_stream(ports))
        return {"port": ports[int(leader.removeprefix("n")) - 1], "windows": self.windows}

    def health(self) -> str:
        notes = [
            f"n{i + 1} exited {s.proc.returncode}: {s.tail(1)}"
            for i, s in enumerate(self._servers)
            if s.proc.poll() is not None
        ]
        return "; ".join(notes)

    def stop(self) -> None:
        for server in reversed(self._servers):
            server.stop()
        self._servers = []
        for d in self._dirs:
            remove(d)
        self._dirs = []

    def count_rules(self) -> list[str]:
        return []

    @staticmethod
    def producer(endpoint: Endpoint, work: Workload, ready: Callable[[], None]) -> ProducerResult:
        return asyncio.run(_nats_produce(endpoint, work, ready))

    @staticmethod
    def subscriber(
        endpoint: Endpoint, work: Workload, index: int, ready: Callable[[], None]
    ) -> SubscriberResult:
        raise NotImplementedError("the replication bench has no subscribers")


async def _add_stream(ports: list[int]) -> str:
    """Create the R3 stream once JetStream's meta group has a leader, wait until every
    replica is current, and return the name of the stream's leader."""
    from nats.js.api import StorageType

    nc = await _nats({"port": ports[0]})
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + START_TIMEOUT_S
        created = False
        while True:
            try:
                if not created:
                    await js.add_stream(name=NATS_STREAM, subjects=[NATS_SUBJECT],
                                        storage=StorageType.FILE, num_replicas=3)  # fmt: skip
                    created = True
                info = await js.stream_info(NATS_STREAM)
                cluster = info.cluster
                if (
                    cluster is not None
                    and cluster.leader
                    and len(cluster.replicas or []) == 2
                    and all(r.current for r in cluster.replicas or [])
                ):
                    return str(cluster.leader)
            except Exception as exc:  # JetStream not ready yet
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nats R3 stream: {exc}") from exc
            if time.monotonic() > deadline:
                raise RuntimeError("nats R3 stream: replicas not current")
            await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def _nats_produce(
    endpoint: Endpoint, work: Workload, ready: Callable[[], None]
) -> AckedResult:
    nc = await _nats(endpoint)
    acks = _Acks()
    inbox = nc.new_inbox()
    windows: int = endpoint["windows"]
    body = filler(work.payload_bytes)
    lat = array("q", bytes(8 * work.records)) if work.latency else array("q")
    sent = array("q", bytes(8 * work.records)) if work.latency else array("q")
    now = time.time_ns
    skip = len(inbox) + 1

    async def on_ack(msg: Any) -> None:
        i = int(msg.subject[skip:])
        lat[i] = now() - sent[i]
        await acks.on_ack(msg)

    await nc.subscribe(f"{inbox}.*", cb=on_ack if work.latency else acks.on_ack,
                       pending_msgs_limit=(windows + 4) * CHUNK)  # fmt: skip
    await nc.flush()
    await asyncio.get_running_loop().run_in_executor(None, ready)
    start = time.time_ns()
    if work.rate is None:
        for first in range(0, work.records, CHUNK):
            for i in range(first, min(first + CHUNK, work.records)):
                await nc.publish(NATS_SUBJECT, body, reply=f"{inbox}.{i}")
            await acks.wait(first - (windows - 1) * CHUNK)  # `windows` windows in flight
    else:
        pacer = Pacer(work.rate)
        i = 0
        while i < work.records:
            while i < work.records and pacer.due(i) <= 0:
                sent[i] = now()
                await nc.publish(NATS_SUBJECT, body, reply=f"{inbox}.{i}")
                i += 1
            if i < work.records:
                await asyncio.sleep(max(0.0, pacer.due(i)))
    await acks.wait(work.records)
    end = time.time_ns()
    await nc.close()
    if acks.failed:
        raise RuntimeError(f"{acks.failed} publishes not stored: {acks.first_error!r}")
    return AckedResult(start_ns=start, end_ns=end, records=work.records, latencies_ns=lat.tobytes())
