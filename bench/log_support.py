"""What every system in :mod:`bench.log_bench` shares: the :class:`Runner` interface, the
process harness that runs one producer and N subscribers, the nftables byte counter and the
server-process helpers.

A runner (one per system: Redis Streams, NATS JetStream, later boomscooter) provides

* ``start(workdir) -> Endpoint``: start the server on free loopback ports, wait until it
  serves, return a picklable :data:`Endpoint` (a plain dict: ports, names) the processes use;
* ``stop()``: stop the server and remove its data (idempotent; called in ``finally``);
* ``count_rules() -> list[str]``: nft match expressions for the traffic *the server* sends
  (``tcp sport <port>``, ``udp dport <group port>``), counted on ``oifname "lo"``;
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

import contextlib
import ctypes
import json
import math
import multiprocessing as mp
import os
import queue
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import traceback
from abc import ABC, abstractmethod
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar, Self, TypeAlias

from bench.peers import SERVER_NICE

HOST = "127.0.0.1"
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


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of an ascending sequence."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


# --- servers -------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_tcp(
    port: int, timeout_s: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    end = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}") from None
            if time.monotonic() > end:
                raise TimeoutError(f"nothing listens on {HOST}:{port}") from None
            time.sleep(0.05)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the bench dies (even by SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class ServerProcess:
    """A server started at :data:`bench.peers.SERVER_NICE` (as every server in the benches),
    logging to ``log``, killed if the bench dies, and stopped by :meth:`stop`."""

    def __init__(self, argv: Sequence[str], log: Path) -> None:
        self.log = log
        self._fh: IO[bytes] = log.open("wb")
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            ["nice", "-n", str(SERVER_NICE), *argv],
            stdin=subprocess.DEVNULL,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the bench, which stops the server last
            preexec_fn=_die_with_parent,
        )

    def tail(self, lines: int = 3) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._fh.close()


def data_dir(workdir: Path, name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))


def remove(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


# --- bytes the server sent: nftables -------------------------------------------------------

IP_HEADER = 20  # IPv4 without options: all traffic here is 127.0.0.1
UDP_HEADER = 8


@dataclass(frozen=True, slots=True)
class Traffic:
    packets: int
    bytes: int
    """Whole IP packets as nft counts them (IP + TCP/UDP headers + payload). On ``lo`` a
    TCP GSO skb of up to 64 KiB counts one header."""
    payload_bytes: int | None
    """The TCP/UDP payload alone (headers subtracted exactly: TCP rules are split by data
    offset); ``None`` if a match is neither TCP nor UDP."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TrafficCounter:
    """Counts the packets matching any of ``matches`` on the output hook of ``oifname``.

    Each match (e.g. ``"tcp sport 6379"``, ``"udp dport 5000"``, ``"ip daddr 239.1.2.3 udp
    dport 5000"``) becomes counter rules in a table ``inet logbench_<pid>`` that exists
    only inside the ``with`` block; a match without its own ``oif``/``oifname`` gets
    ``oifname "<oifname>"`` (multicast sent with ``IP_MULTICAST_LOOP`` leaves by the
    interface the socket chose, not ``lo``). Matches must be disjoint (a packet matching two
    is counted twice). Needs root and ``nft``; otherwise :attr:`error` says why and
    :meth:`read` returns ``None``.
    """

    def __init__(self, matches: Sequence[str], oifname: str = "lo") -> None:
        self.table = f"logbench_{os.getpid()}"
        self.matches = list(matches)
        self.oifname = oifname
        self.error: str | None = None
        self._headers: dict[str, int | None] = {}

    def _rules(self) -> list[str]:
        rules = []
        for i, match in enumerate(self.matches):
            tokens = match.split()
            if "tcp" in tokens:
                for doff in range(5, 16):
                    tag = f"m{i}d{doff}"
                    self._headers[tag] = IP_HEADER + 4 * doff
                    rules.append(f"{match} tcp doff {doff} counter comment {tag}")
            else:
                tag = f"m{i}"
                self._headers[tag] = IP_HEADER + UDP_HEADER if "udp" in tokens else None
                rules.append(f"{match} counter comment {tag}")
        return rules

    def _nft(self, args: Sequence[str], stdin: str | None = None) -> str:
        proc = subprocess.run(
            ["nft", *args], input=stdin, capture_output=True, text=True, timeout=10, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip() or f"nft exited {proc.returncode}")
        return proc.stdout

    def __enter__(self) -> Self:
        if os.geteuid() != 0 or shutil.which("nft") is None:
            self.error = "needs root and nft"
            return self
        self._remove_stale()
        lines = []
        for rule in self._rules():
            own = {"oif", "oifname"} & set(rule.split())
            lines.append(f"    {rule}" if own else f'    oifname "{self.oifname}" {rule}')
        body = "\n".join(lines)
        ruleset = (
            f"table inet {self.table} {{\n  chain out {{\n"
            f"    type filter hook output priority 0; policy accept;\n{body}\n  }}\n}}\n"
        )
        try:
            self._nft(["delete", "table", "inet", self.table]) if self._exists() else None
            self._nft(["-f", "-"], stdin=ruleset)
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            self.error = f"nft: {exc}"
        return self

    def _remove_stale(self) -> None:
        """Delete the tables of benches that died without cleaning up (pid gone)."""
        with contextlib.suppress(OSError, RuntimeError, subprocess.TimeoutExpired):
            for line in self._nft(["list", "tables"]).splitlines():
                name = line.split()[-1]
                pid = name.removeprefix("logbench_")
                if name.startswith("logbench_") and pid.isdigit() and not _alive(int(pid)):
                    self._nft(["delete", "table", "inet", name])

    def _exists(self) -> bool:
        try:
            self._nft(["list", "table", "inet", self.table])
        except (OSError, RuntimeError, subprocess.TimeoutExpired):
            return False
        return True

    def read(self) -> Traffic | None:
        if self.error is not None:
            return None
        out = json.loads(self._nft(["-j", "list", "table", "inet", self.table]))
        packets = total = headers = 0
        exact = True
        for item in out.get("nftables", []):
            rule = item.get("rule")
            if not rule or rule.get("comment") not in self._headers:
                continue
            for expr in rule.get("expr", []):
                if "counter" in expr:
                    n, b = int(expr["counter"]["packets"]), int(expr["counter"]["bytes"])
                    packets, total = packets + n, total + b
                    size = self._headers[rule["comment"]]
                    if size is None:
                        exact = False
                    else:
                        headers += n * size
        return Traffic(packets, total, total - headers if exact else None)

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.error is None:
            with contextlib.suppress(OSError, RuntimeError, subprocess.TimeoutExpired):
                self._nft(["delete", "table", "inet", self.table])


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
