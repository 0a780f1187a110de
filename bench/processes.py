"""The server processes of the benches: started at one nice level, killed when the bench
dies, stopped in ``finally``; and the loopback helpers their runners use to start them.

* :data:`SERVER_NICE`: the niceness of every server in every bench (the file peers' servers
  in their namespaces as much as the log servers on loopback).
* :class:`ServerProcess`: a server on this host, at :data:`SERVER_NICE`, logging to a file,
  in its own session (Ctrl-C reaches the bench, which stops the server last), SIGKILLed by
  the kernel if the bench dies (:func:`die_with_parent`, even when the bench is SIGKILLed).
* :func:`free_port`, :func:`wait_tcp`: pick a free 127.0.0.1 port, wait until a server
  listens on it (or exits, or the time is up).
* :func:`data_dir`, :func:`remove`: a server's fresh data directory, and its removal.
* :func:`exit_on_sigterm`: a SIGTERM handler (``timeout``, make) that raises
  :class:`SystemExit`, so the benches' ``finally`` blocks stop what they started.
"""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import IO

HOST = "127.0.0.1"
# Every host here shares the machine's cores; a real server has its own. Each peer's server
# (nginx, udp-sender, uftp, bootcast serve) runs at this niceness so that N busy clients do
# not starve it of the CPU its own machine would give it. The same for every peer.
SERVER_NICE = -5
CLUSTER_START_TIMEOUT_S = 60.0
"""How long the nodes of a replicated cluster may take to listen, and its replicas to be in
sync (:mod:`bench.replication_bench`)."""


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


def die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the bench dies (even by SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class ServerProcess:
    """A server started at :data:`SERVER_NICE` (as every server in the benches), logging to
    ``log``, killed if the bench dies, and stopped by :meth:`stop`."""

    def __init__(self, argv: Sequence[str], log: Path) -> None:
        self.log = log
        self._fh: IO[bytes] = log.open("wb")
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            ["nice", "-n", str(SERVER_NICE), *argv],
            stdin=subprocess.DEVNULL,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the bench, which stops the server last
            preexec_fn=die_with_parent,
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


def exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """A SIGTERM handler: raise :class:`SystemExit` (128 + signal), so that ``finally``
    blocks and context managers stop servers and delete namespaces."""
    raise SystemExit(128 + signum)
