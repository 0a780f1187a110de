"""The run harness of the file benches (:mod:`bench.files_bench`, :mod:`bench.files_floor`)
and of their peers (:mod:`bench.files_peers`).

* :class:`RunSpec` and :class:`Outcome`: what a peer runner is given for one run (a built
  :class:`bench.netns.Topology`, the source file, one output path per client, a log
  directory, a timeout, rates) and what it returns (the wall time or ``None``, a note).
* The processes a runner starts in the topology's hosts: each logging to its own file
  (:class:`RunLogs`), the server's at :data:`bench.processes.SERVER_NICE`
  (:func:`start_process`, :func:`start_clients`), waited for together (:func:`wait_all`,
  :func:`wait_tcp_from`) and stopped when the run ends (:func:`stop_processes`).
* The source file of a run and the SHA-256 its copies are checked against
  (:func:`make_source`, :func:`sha256_of`), and the checks a bench makes before it builds
  namespaces (:func:`prepare_netns`).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from bench.netns import Host, Topology, cleanup_stale, netns_available
from bench.processes import SERVER_NICE, exit_on_sigterm

FILE_NAME = "file.bin"


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSpec:
    """Everything a peer runner needs for one run."""

    topo: Topology
    src: Path
    outputs: list[Path]
    """Destination file per client (index-aligned with ``topo.clients``)."""
    logdir: Path
    timeout_s: float
    send_rate_mbit: float
    udpcast_fec: str
    """``--fec`` value for udp-sender, empty for none."""
    link_mbit: float
    """The tbf rate of the server's link."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    wall_s: float | None
    note: str = ""


class RunLogs:
    """Opens one log file per process and closes them all at the end of a run."""

    def __init__(self, logdir: Path) -> None:
        self._dir = logdir
        self._files: list[IO[bytes]] = []

    def open(self, name: str) -> IO[bytes]:
        fh = (self._dir / f"{name}.log").open("wb")
        self._files.append(fh)
        return fh

    def close(self) -> None:
        for fh in self._files:
            fh.close()

    def tail(self, name: str, lines: int = 3) -> str:
        path = self._dir / f"{name}.log"
        try:
            text = path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])


def start_process(
    spec: RunSpec,
    logs: RunLogs,
    host: Host,
    name: str,
    argv: Sequence[str],
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` on ``host`` (at :data:`bench.processes.SERVER_NICE` on the server),
    logging to ``<name>.log``."""
    if host is spec.topo.server:
        argv = ["nice", "-n", str(SERVER_NICE), *argv]
    log = logs.open(name)
    return spec.topo.run(
        host, argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd
    )


def start_clients(
    spec: RunSpec, logs: RunLogs, name: str, argv_for: Callable[[Host, Path], list[str]]
) -> list[subprocess.Popen[bytes]]:
    """Start one process per client, ``argv_for(host, output_path)``, logging to
    ``<name>-<i>.log``."""
    return [
        start_process(spec, logs, host, f"{name}-{i}", argv_for(host, out))
        for i, (host, out) in enumerate(zip(spec.topo.clients, spec.outputs, strict=True))
    ]


def wait_all(procs: Sequence[subprocess.Popen[bytes]], deadline: float) -> float | None:
    """Wait until every process exited; return the monotonic time the last one did, or
    ``None`` if the deadline passed first."""
    pending = list(procs)
    last = time.monotonic()
    while pending:
        for proc in list(pending):
            if proc.poll() is not None:
                pending.remove(proc)
                last = time.monotonic()
        if not pending:
            break
        if time.monotonic() > deadline:
            return None
        time.sleep(0.005)
    return last


def stop_processes(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """Terminate the processes still running; kill those that do not exit within 3 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=3)


def wait_tcp_from(topo: Topology, host: Host, addr: str, port: int, timeout_s: float) -> bool:
    """Poll from ``host`` until ``addr:port`` accepts TCP connections."""
    code = (
        "import socket,sys,time\n"
        f"end=time.monotonic()+{timeout_s}\n"
        "while time.monotonic()<end:\n"
        "  try:\n"
        f"    socket.create_connection(({addr!r},{port}),timeout=1).close(); sys.exit(0)\n"
        "  except OSError: time.sleep(0.05)\n"
        "sys.exit(1)\n"
    )
    proc = subprocess.run(
        topo.ns_argv(host, [sys.executable, "-c", code]), timeout=timeout_s + 5, check=False
    )
    return proc.returncode == 0


def failed_exits(names: Sequence[str], procs: Sequence[subprocess.Popen[bytes]]) -> str:
    """``exit name=code,...`` of the processes that exited non-zero, else ``""``."""
    bad = [f"{n}={p.returncode}" for n, p in zip(names, procs, strict=True) if p.returncode]
    return ("exit " + ",".join(bad)) if bad else ""


def sha256_of(path: Path) -> str | None:
    """The file's SHA-256 (hex), or None if it cannot be read."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def make_source(path: Path, size_bytes: int) -> str:
    """Write ``size_bytes`` of random data to ``path`` and return its SHA-256."""
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        left = size_bytes
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            fh.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def prepare_netns(prog: str, prefix: str) -> bool:
    """Check that namespaces can be built (else say why and return False), remove stale
    ones of ``prefix`` and turn SIGTERM (e.g. from `timeout` or make) into SystemExit, so
    the Topology context managers still delete their namespaces and stop their processes."""
    available, reason = netns_available()
    if not available:
        print(f"{prog}: cannot run: {reason}", file=sys.stderr)
        return False
    cleanup_stale(prefix)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    return True
