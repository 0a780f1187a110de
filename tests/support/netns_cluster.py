"""Helpers for the replication tests that run every node as a real process
(:class:`support.process.NodeProcess`) with a command line of their own, on loopback or
inside the network namespaces of :class:`bench.netns.Topology`.

:class:`Cluster` stops every node it started (SIGTERM, then SIGKILL), also when a test
fails, and keeps their logs. :func:`status` runs ``boomscooter status --json``;
:func:`log_digest`, :func:`segment_digests` and :func:`read_payloads` read a stopped node's
data directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boomscooter.storage import LogReader
from boomscooter.storage.segment import LOG_SUFFIX, parse_file_name

from support.process import CLI, ENV, REPO, NodeProcess
from support.waiting import PATIENCE_S


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
    argv = [*CLI, "--log-json", role, "--data-dir", str(data_dir), "--listen", listen,
            "--group", group, "--interface", interface, "--fsync", fsync, *extra]  # fmt: skip
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
