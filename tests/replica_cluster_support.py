"""Helpers for the replication tests that run every node as a real process
(``python -m boomscooter.cli --log-json leader|replica``), on loopback or inside the
network namespaces of :class:`bench.netns.Topology`.

:class:`NodeProcess` starts one node, waits for its ``leader.started`` /
``replica.started`` event and collects its JSON log (stderr) in a thread;
:class:`Cluster` stops every node it started (SIGTERM, then SIGKILL), also when a test
fails. :func:`status` runs ``boomscooter status --json``; :func:`log_digest`,
:func:`segment_digests` and :func:`read_payloads` read a stopped node's data directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from waiting import PATIENCE_S

from boomscooter.storage import LogReader
from boomscooter.storage.segment import LOG_SUFFIX, parse_file_name

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
CLI = [sys.executable, "-m", "boomscooter.cli", "--log-json"]

Spawn = Callable[..., "subprocess.Popen[bytes]"]
"""Starts an argv like :class:`subprocess.Popen` (``Topology.run`` bound to a host fits)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _parse(raw: bytes) -> dict[str, Any]:
    text = raw.decode(errors="replace").rstrip("\n")
    if text.startswith("{"):
        with contextlib.suppress(ValueError):
            event = json.loads(text)
            if isinstance(event, dict):
                return event
    return {"event": "raw", "text": text}  # a traceback, a warning: kept for the report


@dataclass
class NodeProcess:
    """One ``boomscooter leader|replica`` process and its JSON log."""

    name: str
    argv: list[str]
    spawn: Spawn = subprocess.Popen
    proc: subprocess.Popen[bytes] | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    started: dict[str, Any] = field(default_factory=dict)
    _drain: threading.Thread | None = None
    _signalled: bool = False

    def start(self, timeout_s: float = PATIENCE_S) -> dict[str, Any]:
        """Start the node; return its ``leader.started`` / ``replica.started`` event."""
        assert self.proc is None, f"{self.name} already started"
        self.proc = self.spawn(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=ENV, cwd=REPO,
        )  # fmt: skip
        assert self.proc.stderr is not None
        stream = self.proc.stderr
        found = threading.Event()

        def drain() -> None:
            for raw in stream:
                event = _parse(raw)
                self.log.append(event)
                if str(event["event"]).endswith(".started") and not found.is_set():
                    self.started = event
                    found.set()
            found.set()  # the process ended (before it started, if ``started`` is empty)

        self._drain = threading.Thread(target=drain, name=f"log {self.name}", daemon=True)
        self._drain.start()
        if not found.wait(timeout_s) or not self.started:
            raise AssertionError(f"{self.name} did not start: {self.tail()}")
        return self.started

    @property
    def address(self) -> str:
        return str(self.started["listen"])

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in list(self.log) if e.get("event") == name]

    def wait_for(
        self,
        name: str,
        predicate: Callable[[list[dict[str, Any]]], bool],
        timeout_s: float = PATIENCE_S,
    ) -> list[dict[str, Any]]:
        """Wait until ``predicate(self.events(name))`` holds; return those events."""
        deadline = time.monotonic() + timeout_s
        while True:
            events = self.events(name)
            if predicate(events):
                return events
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {name} as wanted: {self.tail()}")
            time.sleep(0.1)

    def tail(self, lines: int = 15) -> str:
        return "\n".join(json.dumps(e) for e in list(self.log)[-lines:])

    def send_signal(self, signum: int = signal.SIGTERM) -> None:
        """Send ``signum`` (once: :meth:`stop` then only waits)."""
        if self.proc is not None and self.proc.poll() is None:
            self._signalled = True
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout_s: float = PATIENCE_S) -> int | None:
        """Stop the node (SIGKILL if it does not end within ``timeout_s``); its exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            if not self._signalled:  # a second SIGTERM after the loop closed would kill it
                self.send_signal(signum)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._drain is not None:
            self._drain.join(5)
        if proc.stderr is not None:
            proc.stderr.close()
        return proc.returncode


@dataclass
class Cluster:
    """The nodes of one test; ``with Cluster() as c:`` stops all of them on the way out."""

    log_dir: Path | None = None
    """Where each node's log is written as ``<name>.jsonl`` once it stopped (for a
    failure's post-mortem: pytest keeps the last runs' ``tmp_path``)."""
    nodes: list[NodeProcess] = field(default_factory=list)

    def add(self, node: NodeProcess) -> NodeProcess:
        self.nodes.append(node)
        return node

    def stop_all(self) -> dict[str, int | None]:
        """SIGTERM every node at once, then wait for each; their exit codes by name."""
        for node in self.nodes:
            node.send_signal()
        codes = {node.name: node.stop() for node in self.nodes}
        if self.log_dir is not None:
            for node in self.nodes:
                lines = (json.dumps(event) + "\n" for event in node.log)
                (self.log_dir / f"{node.name}.jsonl").write_text("".join(lines))
        return codes

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def node_argv(
    role: str,
    data_dir: Path,
    *,
    listen: str,
    group: str,
    interface: str,
    fsync: str,
    leader: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """``boomscooter --log-json leader|replica`` with the options every node here takes."""
    argv = [*CLI, role, "--data-dir", str(data_dir), "--listen", listen, "--group", group,
            "--interface", interface, "--fsync", fsync, *extra]  # fmt: skip
    if leader is not None:
        argv += ["--leader", leader]
    return argv


def status(
    server: str, prefix: Sequence[str] = (), timeout_s: float = PATIENCE_S
) -> dict[str, Any]:
    """``boomscooter status --server SERVER --json`` (run under ``prefix``, e.g. the
    ``ip netns exec NS`` of the namespace that can reach SERVER)."""
    argv = [*prefix, sys.executable, "-m", "boomscooter.cli", "status", "--server", server,
            "--json"]  # fmt: skip
    done = subprocess.run(
        argv, capture_output=True, env=ENV, cwd=REPO, timeout=timeout_s, check=False
    )
    assert done.returncode == 0, f"status {server}: {done.stderr.decode(errors='replace')}"
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def wait_status(
    server: str,
    predicate: Callable[[dict[str, Any]], bool],
    *,
    timeout_s: float = PATIENCE_S,
    prefix: Sequence[str] = (),
    every_s: float = 0.5,
) -> dict[str, Any]:
    """Poll :func:`status` until ``predicate`` holds; the status that satisfied it. (Each
    poll starts a Python process: about a second of CPU.)"""
    deadline = time.monotonic() + timeout_s
    while True:
        current = status(server, prefix)
        if predicate(current):
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"status of {server} never satisfied the wait: {current}")
        time.sleep(every_s)


@dataclass(frozen=True)
class LogDigest:
    """A log's content: its seqnos and a SHA-256 over its batches' bytes, in order."""

    first_seqno: int
    last_seqno: int
    batches: int
    sha256: str


def log_digest(data_dir: Path) -> LogDigest:
    """Read a (stopped) node's whole log: contiguous seqnos, hash of every batch's bytes
    (header, epoch and CRC included), independent of where its segments roll."""
    digest = hashlib.sha256()
    first = last = batches = 0
    with LogReader(data_dir) as reader:
        while chunk := reader.read_batches(max_bytes=32 << 20):
            for batch in chunk:
                assert batch.base_seqno == last + 1 or not batches, (
                    f"{data_dir}: batch at {batch.base_seqno} after {last}"
                )
                first = first or batch.base_seqno
                last = batch.last_seqno
                batches += 1
                digest.update(batch.data)
    return LogDigest(first, last, batches, digest.hexdigest())


def segment_digests(data_dir: Path) -> dict[str, str]:
    """SHA-256 of every segment file (``*.log``), by name."""
    out: dict[str, str] = {}
    for path in sorted(data_dir.iterdir()):
        parsed = parse_file_name(path.name)
        if parsed is None or parsed.suffix != LOG_SUFFIX or parsed.temporary:
            continue
        digest = hashlib.sha256()
        with path.open("rb") as file:
            while block := file.read(8 << 20):
                digest.update(block)
        out[path.name] = digest.hexdigest()
    return out


def read_payloads(data_dir: Path, from_seqno: int | None = None) -> dict[int, bytes]:
    """The records of a (stopped) node's log from ``from_seqno`` on: payload by seqno."""
    out: dict[int, bytes] = {}
    with LogReader(data_dir, from_seqno=from_seqno) as reader:
        while records := reader.read():
            for record in records:
                out[record.seqno] = bytes(record.payload)
    return out


@contextlib.contextmanager
def timed(label: str, sink: dict[str, float]) -> Iterator[None]:
    """Record how long the block took in ``sink[label]`` (seconds), for the test's report."""
    began = time.monotonic()
    try:
        yield
    finally:
        sink[label] = round(time.monotonic() - began, 2)
