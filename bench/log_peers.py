"""The peers of :mod:`bench.log_bench`: Redis Streams and NATS JetStream, one
:class:`bench.log_support.Runner` each.

* redis: Debian ``redis-server`` (``--appendonly yes --appendfsync everysec``; RDB snapshots
  off, ``--save ""``, so no fork lands in a run), redis-py (hiredis parser when installed),
  RESP2. Producer: ``XADD`` pipelined (no MULTI) in chunks of 1000, each chunk's replies
  awaited before the next; queued with ``execute_command("XADD", ...)``, ~30 % less client
  CPU than redis-py's ``xadd()`` argument building. Subscribers: ``XREAD COUNT 1000 BLOCK
  1000`` from ``0-0``, each on its own connection. Latency run: one ``XADD`` per record.
* nats: Debian ``nats-server -js -sd DIR`` (JetStream, file storage), nats-py. Producer:
  asynchronous publishes in windows of 1000 with two windows in flight (window k's acks
  are awaited once window k+1 was sent): ``nc.publish(subject, reply=<inbox>.<i>)`` with
  the stream's acks counted on one ``<inbox>.*`` subscription. That is the protocol of
  ``js.publish_async`` without its per-record future, NUID and ``PubAck`` dataclass, which
  cap nats-py at ~15k records/s here against ~50k this way. Subscribers: one ordered push
  consumer each (``deliver all``, no acks, server flow control), a callback per message
  (as fast as a plain push consumer here; a pull consumer's ``fetch(1000)`` was ~5× slower).
  Latency run: one publish per record when due, acks awaited at the end.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

CHUNK = 1000
"""Records per pipelined XADD chunk / per NATS publish window / per XREAD."""
REDIS_KEY = "logbench"
REDIS_FIELD = b"d"
NATS_STREAM = "LOGBENCH"
NATS_SUBJECT = "logbench"


class _ServerRunner(Runner):
    """A runner whose server is one process on one TCP port."""

    binary = ""

    def __init__(self) -> None:
        self._server: ServerProcess | None = None
        self._dir: Path | None = None
        self._port = 0

    def missing(self) -> str | None:
        if shutil.which(self.binary) is None:
            return f"{self.binary} not found"
        module = {"redis-server": "redis", "nats-server": "nats"}[self.binary]
        if importlib.util.find_spec(module) is None:
            return f"python module {module} not installed"
        return None

    def count_rules(self) -> list[str]:
        return [f"tcp sport {self._port}"]

    def _launch(self, workdir: Path, argv_for: Callable[[int, Path], list[str]]) -> int:
        self.stop()
        self._port = free_port()
        self._dir = data_dir(workdir, self.name)
        argv = argv_for(self._port, self._dir)
        self._server = ServerProcess(argv, self._dir.with_suffix(".log"))
        try:
            wait_tcp(self._port, proc=self._server.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{self.name} server: {exc}: {self._server.tail()}") from exc
        return self._port

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        remove(self._dir)
        self._dir = None


# --- Redis Streams -------------------------------------------------------------------------


def _redis(endpoint: Endpoint) -> Any:
    import redis

    return redis.Redis(host=HOST, port=endpoint["port"], protocol=2)


class RedisRunner(_ServerRunner):
    name = "redis"
    binary = "redis-server"

    def describe(self) -> str:
        import redis
        import redis.utils

        parser = "hiredis" if redis.utils.HIREDIS_AVAILABLE else "pure-Python parser"
        return (
            f"redis: redis-server appendonly, appendfsync everysec, no RDB; redis-py "
            f"{redis.__version__} ({parser}), XADD pipelined x{CHUNK}, XREAD COUNT {CHUNK}"
        )

    def start(self, workdir: Path) -> Endpoint:
        port = self._launch(
            workdir,
            lambda port, d: [
                "redis-server",
                "--port", str(port),
                "--bind", HOST,
                "--dir", str(d),
                "--appendonly", "yes",
                "--appendfsync", "everysec",
                "--save", "",
                "--daemonize", "no",
                "--logfile", "",
            ],
        )  # fmt: skip
        client = _redis({"port": port})
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except Exception as exc:  # redis.BusyLoadingError and friends while starting
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis not ready: {exc}") from exc
                time.sleep(0.05)
        client.close()
        return {"port": port}

    @staticmethod
    def producer(endpoint: Endpoint, work: Workload, ready: Callable[[], None]) -> ProducerResult:
        client = _redis(endpoint)
        client.ping()
        body = filler(work.payload_bytes)
        ready()
        start = time.time_ns()
        if work.rate is None:
            pipe = client.pipeline(transaction=False)
            for first in range(0, work.records, CHUNK):
                for _ in range(min(CHUNK, work.records - first)):
                    pipe.execute_command("XADD", REDIS_KEY, "*", REDIS_FIELD, body)
                pipe.execute()
        else:
            pacer = Pacer(work.rate)
            for i in range(work.records):
                pacer.wait(i)
                client.xadd(REDIS_KEY, {REDIS_FIELD: stamped(body)})
        end = time.time_ns()
        client.close()
        return ProducerResult(start_ns=start, end_ns=end, records=work.records)

    @staticmethod
    def subscriber(
        endpoint: Endpoint, work: Workload, index: int, ready: Callable[[], None]
    ) -> SubscriberResult:
        client = _redis(endpoint)
        client.ping()
        ready()
        tally = Tally(work)
        last: bytes | str = "0-0"
        while not tally.done:
            reply = client.xread({REDIS_KEY: last}, count=CHUNK, block=1000)
            if not reply:
                continue
            entries = reply[0][1]
            last = entries[-1][0]
            tally.add([fields[REDIS_FIELD] for _, fields in entries])
        client.close()
        return tally.result()


# --- NATS JetStream ------------------------------------------------------------------------


async def _nats(endpoint: Endpoint, closed: asyncio.Event | None = None) -> Any:
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


class _Acks:
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


class NatsRunner(_ServerRunner):
    name = "nats"
    binary = "nats-server"

    def describe(self) -> str:
        from nats.aio.client import __version__

        return (
            f"nats: nats-server -js file storage; nats-py {__version__}, async publishes "
            f"with acks awaited in windows of {CHUNK} (2 in flight), ordered push consumers"
        )

    def start(self, workdir: Path) -> Endpoint:
        port = self._launch(
            workdir,
            lambda port, d: ["nats-server", "-js", "-sd", str(d), "-a", HOST, "-p", str(port)],
        )
        asyncio.run(self._add_stream({"port": port}))
        return {"port": port}

    @staticmethod
    async def _add_stream(endpoint: Endpoint) -> None:
        from nats.js.api import StorageType

        nc = await _nats(endpoint)
        try:
            js = nc.jetstream()
            deadline = time.monotonic() + 20
            while True:
                try:
                    await js.add_stream(
                        name=NATS_STREAM, subjects=[NATS_SUBJECT], storage=StorageType.FILE
                    )
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
        nc = await _nats(endpoint)
        acks = _Acks()
        inbox = nc.new_inbox()
        await nc.subscribe(f"{inbox}.*", cb=acks.on_ack, pending_msgs_limit=8 * CHUNK)
        body = filler(work.payload_bytes)
        await nc.flush()
        await asyncio.get_running_loop().run_in_executor(None, ready)
        start = time.time_ns()
        if work.rate is None:
            for first in range(0, work.records, CHUNK):
                for i in range(first, min(first + CHUNK, work.records)):
                    await nc.publish(NATS_SUBJECT, body, reply=f"{inbox}.{i}")
                await acks.wait(first)  # the window before this one: 2 windows in flight
        else:
            pacer = Pacer(work.rate)
            i = 0
            while i < work.records:
                while i < work.records and pacer.due(i) <= 0:
                    await nc.publish(NATS_SUBJECT, stamped(body), reply=f"{inbox}.{i}")
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
        nc = await _nats(endpoint, closed)
        js = nc.jetstream()
        tally = Tally(work)
        done = asyncio.Event()

        async def on_msg(msg: Any) -> None:
            tally.add_one(msg.data)
            if tally.done:
                done.set()

        sub = await js.subscribe(NATS_SUBJECT, cb=on_msg, ordered_consumer=True)
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
