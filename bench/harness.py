"""The workload harness of :mod:`bench.log_bench` and :mod:`bench.replication_bench`: the
:class:`Runner` interface every system implements, the payloads, pacing and tallies of its
producer and subscribers, and :func:`run_workload`, which runs one producer and N
subscribers (N = 0 in the replication bench), each in its own process.

A runner (one per system: :mod:`bench.peer_redis`, :mod:`bench.peer_nats`,
:mod:`bench.log_boomscooter`) provides

* ``start(workdir) -> Endpoint``: start the server on free loopback ports, wait until it
  serves, return a picklable :data:`Endpoint` (a plain dict: ports, names) the processes use;
* ``stop()``: stop the server and remove its data (idempotent; called in ``finally``);
* ``count_rules() -> list[str]``: nft match expressions for the traffic *the server* sends
  (``tcp sport <port>``, ``udp dport <group port>``), counted on ``oifname "lo"`` by
  :class:`bench.traffic.TrafficCounter`;
* ``producer(endpoint, work, ready)`` and ``subscriber(endpoint, work, index, ready)``:
  static methods, each the body of its own spawned process (see :class:`Runner`).

The harness (:func:`run_workload`) spawns the subscribers and the producer (multiprocessing,
``spawn``), waits until every subscriber has subscribed and the producer has connected, then
releases the producer and collects one result per process.

Clocks: ``time.time_ns()`` throughout (system-wide, so comparable across processes). The
producer's clock starts right before its first send and stops after its last acknowledgement;
a subscriber stamps the moment it holds its last record. Latency payloads start with the
producer's ``time.time_ns()`` as 8 bytes little-endian (:func:`stamped`).
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import queue
import shutil
import signal
import struct
import time
import traceback
from abc import ABC, abstractmethod
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any, ClassVar, TypeAlias

from bench.processes import ServerProcess, data_dir, free_port, remove, wait_tcp

Endpoint: TypeAlias = dict[str, Any]
"""What the producer and subscribers need to reach a server: picklable (plain values)."""
_STAMP = struct.Struct("<q")


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """One run: ``records`` records of ``payload_bytes`` each to ``subscribers`` readers.

    ``rate`` is ``None`` for the throughput run (as fast as possible) or the fixed records/s
    of the latency run, whose payloads carry a :func:`stamped` send time."""

    records: int
    payload_bytes: int = 100
    subscribers: int = 4
    rate: float | None = None

    @property
    def latency(self) -> bool:
        return self.rate is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class ProducerResult:
    start_ns: int
    """``time.time_ns()`` right before the first send."""
    end_ns: int
    """``time.time_ns()`` once the last record was acknowledged."""
    records: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AckedResult(ProducerResult):
    """A producer's result with, in latency runs, each record's ack latency in send order
    (``array('q')`` bytes, ns)."""

    latencies_ns: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscriberResult:
    records: int
    last_ns: int
    """``time.time_ns()`` when the subscriber held its last record."""
    latencies_ns: bytes = b""
    """Latency runs: deliver − produce per record in arrival order, ``array('q')`` bytes."""


class Runner(ABC):
    """One system under test. Instances live in the driver process only; the producer and
    subscriber entry points are static methods so that ``spawn`` can pickle them by name
    (everything they get must be picklable: the :data:`Endpoint`, the :class:`Workload`).
    """

    name: ClassVar[str]
    """Row name in the table, and the ``--peers`` token."""
    peer: ClassVar[bool] = True
    """True for the systems compared against (Redis, NATS); False for boomscooter."""

    def missing(self) -> str | None:
        """Why this system cannot run here (a binary or module missing), else ``None``."""
        return None

    def describe(self) -> str:
        """One line on the configuration, printed above the table."""
        return self.name

    @abstractmethod
    def start(self, workdir: Path) -> Endpoint:
        """Start a fresh server (data under ``workdir``) on free 127.0.0.1 ports, wait
        until it serves, and return its endpoint. Called once per measured run."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the server; safe to call when it is not running."""

    @abstractmethod
    def count_rules(self) -> list[str]:
        """nft match expressions (disjoint) selecting the packets the server sends, e.g.
        ``["tcp sport 6379"]`` or ``["tcp sport 50051", "udp dport 5000"]``; counted on
        ``oifname "lo"`` unless a match names its own ``oifname`` (see
        :class:`TrafficCounter`). Called after :meth:`start`."""

    @staticmethod
    @abstractmethod
    def producer(endpoint: Endpoint, work: Workload, ready: Callable[[], None]) -> ProducerResult:
        """Process entry point. Connect, call ``ready()`` (it blocks until every subscriber
        is subscribed), then send ``work.records`` records: as fast as possible, or paced
        at ``work.rate`` (see :class:`Pacer`) with :func:`stamped` payloads."""

    @staticmethod
    @abstractmethod
    def subscriber(
        endpoint: Endpoint, work: Workload, index: int, ready: Callable[[], None]
    ) -> SubscriberResult:
        """Process entry point. Subscribe from the start of the log, call ``ready()``
        (returns at once), and read until holding ``work.records`` records; feed them to a
        :class:`Tally` and return ``tally.result()``."""


# --- payloads, pacing, tallies ---------------------------------------------------------


def filler(size: int) -> bytes:
    """A fixed pseudo-random payload of ``size`` bytes (not compressible)."""
    return (os.urandom(16) * (size // 16 + 1))[:size]


def stamped(body: bytes) -> bytes:
    """``body`` with its first 8 bytes replaced by ``time.time_ns()``."""
    return _STAMP.pack(time.time_ns()) + body[8:]


class Pacer:
    """Due times of a fixed-rate producer: record ``i`` is due at ``t0 + i / rate``."""

    def __init__(self, rate: float) -> None:
        self._period = 1.0 / rate
        self._t0 = time.monotonic()

    def due(self, i: int) -> float:
        """Seconds until record ``i`` is due (<= 0: due now or late)."""
        return self._t0 + i * self._period - time.monotonic()

    def wait(self, i: int) -> None:
        delay = self.due(i)
        if delay > 0:
            time.sleep(delay)


class Tally:
    """A subscriber's count, last-record time and (latency runs) per-record latencies."""

    def __init__(self, work: Workload) -> None:
        self.want = work.records
        self.count = 0
        self.last_ns = 0
        self._latency = work.latency
        self._lat = array("q")

    @property
    def done(self) -> bool:
        return self.count >= self.want

    def add(self, payloads: Sequence[bytes]) -> None:
        """Records delivered together (one read/batch): all held now."""
        now = time.time_ns()
        if self._latency:
            unpack = _STAMP.unpack_from
            self._lat.extend(now - unpack(p)[0] for p in payloads)
        self.count += len(payloads)
        if self.count >= self.want and not self.last_ns:
            self.last_ns = now

    def add_one(self, payload: bytes) -> None:
        now = time.time_ns()
        if self._latency:
            self._lat.append(now - _STAMP.unpack_from(payload)[0])
        self.count += 1
        if self.count >= self.want and not self.last_ns:
            self.last_ns = now

    def result(self) -> SubscriberResult:
        return SubscriberResult(
            records=self.count, last_ns=self.last_ns, latencies_ns=self._lat.tobytes()
        )


# --- one server, one port ------------------------------------------------------------------


class ServerRunner(Runner):
    """A runner whose server is one process on one TCP port: ``binary``, with the Python
    client ``module`` (:meth:`missing` checks both); :meth:`launch` starts it."""

    binary: ClassVar[str] = ""
    module: ClassVar[str] = ""

    def __init__(self) -> None:
        self._server: ServerProcess | None = None
        self._dir: Path | None = None
        self._port = 0

    def missing(self) -> str | None:
        if shutil.which(self.binary) is None:
            return f"{self.binary} not found"
        if importlib.util.find_spec(self.module) is None:
            return f"python module {self.module} not installed"
        return None

    def count_rules(self) -> list[str]:
        return [f"tcp sport {self._port}"]

    def launch(self, workdir: Path, argv_for: Callable[[int, Path], list[str]]) -> int:
        """Start ``argv_for(port, data_dir)`` on a free port with a fresh data directory
        under ``workdir``, wait until it listens, and return the port."""
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


# --- the process harness -------------------------------------------------------------------


@dataclass(slots=True)
class RunOutcome:
    producer: ProducerResult | None = None
    subscribers: list[SubscriberResult] = field(default_factory=list)
    error: str | None = None


def _subscriber_main(
    runner: type[Runner], endpoint: Endpoint, work: Workload, index: int, out: Any
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver stops us
    try:
        result = runner.subscriber(endpoint, work, index, lambda: out.put(("ready", index, None)))
        out.put(("result", index, result))
    except BaseException:
        out.put(("error", index, traceback.format_exc(limit=6)))


def _producer_main(
    runner: type[Runner], endpoint: Endpoint, work: Workload, out: Any, go: MpEvent
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def ready() -> None:
        out.put(("ready", -1, None))
        go.wait()

    try:
        out.put(("result", -1, runner.producer(endpoint, work, ready)))
    except BaseException:
        out.put(("error", -1, traceback.format_exc(limit=6)))


def run_workload(
    runner: type[Runner], endpoint: Endpoint, work: Workload, timeout_s: float
) -> RunOutcome:
    """Run one producer and ``work.subscribers`` subscribers of ``runner``, each in its own
    spawned process; every process is gone when this returns."""
    ctx = mp.get_context("spawn")
    out: Any = ctx.Queue()
    go = ctx.Event()
    subs = [
        ctx.Process(target=_subscriber_main, args=(runner, endpoint, work, i, out), daemon=True)
        for i in range(work.subscribers)
    ]
    prod = ctx.Process(target=_producer_main, args=(runner, endpoint, work, out, go), daemon=True)
    procs = [*subs, prod]
    outcome = RunOutcome()
    results: dict[int, Any] = {}
    ready: set[int] = set()
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + 60.0  # to subscribe and connect
        released = False
        while len(results) < len(procs):
            if not released and len(ready) == len(procs):
                go.set()
                released = True
                deadline = time.monotonic() + timeout_s
            try:
                kind, index, value = out.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > deadline:
                    outcome.error = _who(
                        "timed out", procs, results, ready, released, work.subscribers
                    )
                    return outcome
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    time.sleep(0.5)  # let its error message arrive first
                    if out.empty():
                        outcome.error = f"a process died (exit {dead[0].exitcode})"
                        return outcome
                continue
            if kind == "ready":
                ready.add(index)
            elif kind == "error":
                who = "producer" if index < 0 else f"subscriber {index}"
                outcome.error = f"{who}: {str(value).strip().splitlines()[-1]}"
                return outcome
            else:
                results[index] = value
        outcome.producer = results[-1]
        outcome.subscribers = [results[i] for i in range(work.subscribers)]
        return outcome
    finally:
        go.set()
        _reap(procs, grace_s=5.0 if outcome.producer is not None else 0.0)
        out.close()
        out.cancel_join_thread()


def _who(
    what: str,
    procs: Iterable[Any],
    results: dict[int, Any],
    ready: set[int],
    released: bool,
    n: int,
) -> str:
    if not released:
        return f"{what} before start ({len(ready)} of {n + 1} processes ready)"
    pending = ["producer" if i < 0 else f"sub{i}" for i in [*range(n), -1] if i not in results]
    return f"{what}: no result from {', '.join(pending)}"


def _reap(procs: Iterable[Any], grace_s: float) -> None:
    """Join ``procs`` within ``grace_s`` in all, then terminate (and kill) what is left."""
    procs = [p for p in procs if p.pid is not None]  # started
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=3)
        if p.is_alive():
            p.kill()
            p.join(timeout=3)
