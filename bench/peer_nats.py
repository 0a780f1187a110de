"""NATS JetStream, the peer of :mod:`bench.log_bench` (one server, :class:`NatsRunner`) and
of :mod:`bench.replication_bench` (three clustered servers, a stream with 3 replicas:
:class:`NatsCluster`), each a :class:`bench.harness.Runner`.

* nats (log bench): Debian ``nats-server -js -sd DIR`` (JetStream, file storage), nats-py.
  Producer: asynchronous publishes in windows of 1000 with two windows in flight (window k's
  acks are awaited once window k+1 was sent): ``nc.publish(subject, reply=<inbox>.<i>)``
  with the stream's acks counted on one ``<inbox>.*`` subscription (:class:`Acks`). That is
  the protocol of ``js.publish_async`` without its per-record future, NUID and ``PubAck``
  dataclass, which cap nats-py at ~15k records/s here against ~50k this way. Subscribers:
  one ordered push consumer each (``deliver all``, no acks, server flow control), a callback
  per message (as fast as a plain push consumer here; a pull consumer's ``fetch(1000)`` was
  ~5× slower). Latency run: one publish per record when due, acks awaited at the end.
* nats R3 (replication bench): three ``nats-server`` clustered over routes on 127.0.0.1,
  JetStream file storage, a stream with ``num_replicas=3``; the producer connects to the
  stream's leader. Throughput: asynchronous publishes in windows of 1000 with 4 windows in
  flight (``--nats-windows``; the same protocol as above); latency: one publish per record
  when due, each record's latency from right before its ``publish`` to the moment its ack
  is processed in the producer. ``sync_interval: always`` (fsync per write) when the server
  accepts it (nats-server >= 2.10); older servers fsync on their own schedule (every 2
  minutes).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
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
    ServerRunner,
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

CHUNK = 1000
"""Records per publish window."""
STREAM = "LOGBENCH"
SUBJECT = "logbench"
WINDOWS = 4
"""NATS R3 throughput: publish windows of CHUNK records in flight by default."""
R3_STREAM = "REPLBENCH"
R3_SUBJECT = "replbench"


# --- connections and acks ------------------------------------------------------------------


async def connect(endpoint: Endpoint, closed: asyncio.Event | None = None) -> Any:
    """A connection that gives up when the server goes (no reconnects); ``closed`` is set
    when it is closed."""
    import nats

    async def on_error(exc: Exception) -> None:
        pass  # surfaces as a closed connection or a failed call

    async def on_closed() -> None:
        if closed is not None:
            closed.set()

    return await nats.connect(
        f"nats://{HOST}:{endpoint['port']}",
        allow_reconnect=False,
        error_cb=on_error,
        closed_cb=on_closed,
    )


class Acks:
    """Counts the stream's acknowledgements (``PubAck`` JSON, or ``{"error": ...}``) of
    publishes sent with a reply subject, and lets the producer wait for the first n."""

    def __init__(self) -> None:
        self.count = 0
        self.failed = 0
        self.first_error = b""
        self._need = 0
        self._event = asyncio.Event()

    async def on_ack(self, msg: Any) -> None:
        if b'"error"' in msg.data or not msg.data:
            self.failed += 1
            self.first_error = self.first_error or msg.data or b"no responders"
        self.count += 1
        if self.count >= self._need:
            self._event.set()

    async def wait(self, n: int) -> None:
        self._need = n
        while self.count < n:
            self._event.clear()
            await asyncio.wait_for(self._event.wait(), timeout=60)


# --- NATS JetStream, one server ------------------------------------------------------------


class NatsRunner(ServerRunner):
    name = "nats"
    binary = "nats-server"
    module = "nats"

    def describe(self) -> str:
        from nats.aio.client import __version__

        return (
            f"nats: nats-server -js file storage; nats-py {__version__}, async publishes "
            f"with acks awaited in windows of {CHUNK} (2 in flight), ordered push consumers"
        )

    def start(self, workdir: Path) -> Endpoint:
        port = self.launch(
            workdir,
            lambda port, d: ["nats-server", "-js", "-sd", str(d), "-a", HOST, "-p", str(port)],
        )
        asyncio.run(self._add_stream({"port": port}))
        return {"port": port}

    @staticmethod
    async def _add_stream(endpoint: Endpoint) -> None:
        from nats.js.api import StorageType

        nc = await connect(endpoint)
        try:
            js = nc.jetstream()
            deadline = time.monotonic() + 20
            while True:
                try:
                    await js.add_stream(name=STREAM, subjects=[SUBJECT], storage=StorageType.FILE)
                    return
                except Exception as exc:  # JetStream not ready yet
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"nats stream: {exc}") from exc
                    await asyncio.sleep(0.1)
        finally:
            await nc.close()

    @staticmethod
    def producer(endpoint: Endpoint, work: Workload, ready: Callable[[], None]) -> ProducerResult:
        return asyncio.run(NatsRunner._produce(endpoint, work, ready))

    @staticmethod
    async def _produce(
        endpoint: Endpoint, work: Workload, ready: Callable[[], None]
    ) -> ProducerResult:
        nc = await connect(endpoint)
        acks = Acks()
        inbox = nc.new_inbox()
        await nc.subscribe(f"{inbox}.*", cb=acks.on_ack, pending_msgs_limit=8 * CHUNK)
        body = filler(work.payload_bytes)
        await nc.flush()
        await asyncio.get_running_loop().run_in_executor(None, ready)
        start = time.time_ns()
        if work.rate is None:
            for first in range(0, work.records, CHUNK):
                for i in range(first, min(first + CHUNK, work.records)):
                    await nc.publish(SUBJECT, body, reply=f"{inbox}.{i}")
                await acks.wait(first)  # the window before this one: 2 windows in flight
        else:
            pacer = Pacer(work.rate)
            i = 0
            while i < work.records:
                while i < work.records and pacer.due(i) <= 0:
                    await nc.publish(SUBJECT, stamped(body), reply=f"{inbox}.{i}")
                    i += 1
                if i < work.records:
                    await asyncio.sleep(max(0.0, pacer.due(i)))
        await acks.wait(work.records)
        end = time.time_ns()
        await nc.close()
        if acks.failed:
            raise RuntimeError(f"{acks.failed} publishes not stored: {acks.first_error!r}")
        return ProducerResult(start_ns=start, end_ns=end, records=work.records)

    @staticmethod
    def subscriber(
        endpoint: Endpoint, work: Workload, index: int, ready: Callable[[], None]
    ) -> SubscriberResult:
        return asyncio.run(NatsRunner._subscribe(endpoint, work, ready))

    @staticmethod
    async def _subscribe(
        endpoint: Endpoint, work: Workload, ready: Callable[[], None]
    ) -> SubscriberResult:
        closed = asyncio.Event()
        nc = await connect(endpoint, closed)
        js = nc.jetstream()
        tally = Tally(work)
        done = asyncio.Event()

        async def on_msg(msg: Any) -> None:
            tally.add_one(msg.data)
            if tally.done:
                done.set()

        sub = await js.subscribe(SUBJECT, cb=on_msg, ordered_consumer=True)
        ready()
        waits = [asyncio.ensure_future(e.wait()) for e in (done, closed)]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        if not tally.done:
            raise RuntimeError(f"connection closed after {tally.count} records")
        await sub.unsubscribe()
        await nc.close()
        return tally.result()


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
                wait_tcp(port, timeout_s=CLUSTER_START_TIMEOUT_S, proc=server.proc)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"nats-server: {exc}: {server.tail()}") from exc
        leader = asyncio.run(_add_r3_stream(ports))
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
        return asyncio.run(_produce_r3(endpoint, work, ready))

    @staticmethod
    def subscriber(
        endpoint: Endpoint, work: Workload, index: int, ready: Callable[[], None]
    ) -> SubscriberResult:
        raise NotImplementedError("the replication bench has no subscribers")


async def _add_r3_stream(ports: list[int]) -> str:
    """Create the R3 stream once JetStream's meta group has a leader, wait until every
    replica is current, and return the name of the stream's leader."""
    from nats.js.api import StorageType

    nc = await connect({"port": ports[0]})
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + CLUSTER_START_TIMEOUT_S
        created = False
        while True:
            try:
                if not created:
                    await js.add_stream(name=R3_STREAM, subjects=[R3_SUBJECT],
                                        storage=StorageType.FILE, num_replicas=3)  # fmt: skip
                    created = True
                info = await js.stream_info(R3_STREAM)
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


async def _produce_r3(endpoint: Endpoint, work: Workload, ready: Callable[[], None]) -> AckedResult:
    nc = await connect(endpoint)
    acks = Acks()
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
                await nc.publish(R3_SUBJECT, body, reply=f"{inbox}.{i}")
            await acks.wait(first - (windows - 1) * CHUNK)  # `windows` windows in flight
    else:
        pacer = Pacer(work.rate)
        i = 0
        while i < work.records:
            while i < work.records and pacer.due(i) <= 0:
                sent[i] = now()
                await nc.publish(R3_SUBJECT, body, reply=f"{inbox}.{i}")
                i += 1
            if i < work.records:
                await asyncio.sleep(max(0.0, pacer.due(i)))
    await acks.wait(work.records)
    end = time.time_ns()
    await nc.close()
    if acks.failed:
        raise RuntimeError(f"{acks.failed} publishes not stored: {acks.first_error!r}")
    return AckedResult(start_ns=start, end_ns=end, records=work.records, latencies_ns=lat.tobytes())
