"""The one wrapper the tests run a ``boomscooter`` node process with.

:class:`NodeProcess` starts ``python -m boomscooter.cli --log-json leader|replica …`` (on
loopback, or inside a network namespace through ``spawn``), returns its ``*.started`` event
and collects its JSON log from stderr in a thread, so the pipe never fills. It can be
stopped and started again: every event is tagged with the ``incarnation`` (1, 2, …) of the
process that logged it. A line that is not JSON (a traceback, a warning) is kept as
``{"event": "raw", "text": …}`` for the failure report. Stopping sends one signal and
waits :data:`~support.waiting.PATIENCE_S`, then SIGKILLs.

:class:`Node` is a node on loopback described by its options (data directory, role, port,
group): it builds the command line at each start, so a test can change the options between
restarts, and has the asyncio face the in-loop tests use (``await node.start()``).
:func:`cluster` kills every node of a test on the way out, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from support.net import free_port, random_group
from support.waiting import PATIENCE_S, eventually

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
CLI = [sys.executable, "-m", "boomscooter.cli"]

Spawn = Callable[..., "subprocess.Popen[bytes]"]
"""Starts an argv like :class:`subprocess.Popen` (``Topology.run`` bound to a host fits)."""
Event = dict[str, Any]


def parse_event(raw: bytes) -> Event:
    text = raw.decode(errors="replace").rstrip("\n")
    if text.startswith("{"):
        with contextlib.suppress(ValueError):
            event = json.loads(text)
            if isinstance(event, dict):
                return event
    return {"event": "raw", "text": text}


class NodeProcess:
    """One ``boomscooter --log-json …`` process at a time, and the log of all of them."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str] | Callable[[], list[str]] = (),
        *,
        spawn: Spawn = subprocess.Popen,
    ) -> None:
        self.name = name
        self._command = argv
        self.spawn = spawn
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: list[Event] = []
        self.started: Event = {}
        self.starts = 0
        self.returncode: int | None = None
        self._drain: threading.Thread | None = None
        self._signalled = False

    def argv(self) -> list[str]:
        """The command line of the next start."""
        return self._command() if callable(self._command) else list(self._command)

    @property
    def address(self) -> str:
        """The gRPC address the running (or last) process bound."""
        return str(self.started["listen"])

    def start(self, timeout_s: float = PATIENCE_S) -> Event:
        """Start the process; return its ``leader.started`` / ``replica.started`` event."""
        assert self.proc is None, f"{self.name} is running"
        self.proc = self.spawn(
            self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=ENV, cwd=REPO,
        )  # fmt: skip
        self.starts += 1
        self.started, self._signalled = {}, False
        assert self.proc.stderr is not None
        found = threading.Event()
        self._drain = threading.Thread(
            target=self._collect, args=(self.proc.stderr, self.starts, found),
            name=f"log {self.name}", daemon=True,
        )  # fmt: skip
        self._drain.start()
        if not found.wait(timeout_s) or not self.started:
            code = self.proc.poll()
            raise AssertionError(f"{self.name} did not start (exit {code}):\n{self.tail()}")
        return self.started

    def _collect(self, stream: IO[bytes], incarnation: int, found: threading.Event) -> None:
        for raw in stream:
            event = parse_event(raw)
            event["incarnation"] = incarnation
            self.log.append(event)
            if str(event["event"]).endswith(".started") and not found.is_set():
                self.started = event
                found.set()
        found.set()  # the process ended (before it started, if ``started`` is empty)

    def send_signal(self, signum: int = signal.SIGTERM) -> None:
        """Send ``signum`` to the running process (after a stopping signal, a later
        :meth:`stop` only waits)."""
        if self.proc is not None and self.proc.poll() is None:
            self._signalled |= signum not in (signal.SIGSTOP, signal.SIGCONT)
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout_s: float = PATIENCE_S) -> int | None:
        """Stop the process (SIGKILL if it has not ended within ``timeout_s``); its exit
        code, or the last one when it is not running (None: never started)."""
        proc = self.proc
        if proc is None:
            return self.returncode
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
            self._drain = None
        if proc.stderr is not None:
            proc.stderr.close()
        self.proc, self.returncode = None, proc.returncode
        return proc.returncode

    def events(self, name: str, incarnation: int | None = None) -> list[Event]:
        """The events called ``name`` (of one incarnation, or of all)."""
        return [
            e
            for e in list(self.log)
            if e.get("event") == name and incarnation in (None, e["incarnation"])
        ]

    def wait_for(
        self,
        name: str,
        predicate: Callable[[list[Event]], bool],
        timeout_s: float = PATIENCE_S,
    ) -> list[Event]:
        """Wait (blocking) until ``predicate(self.events(name))`` holds; those events."""
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

    def tail(self, lines: int = 30) -> str:
        return "\n".join(json.dumps(e) for e in list(self.log)[-lines:])


@dataclass(eq=False)
class Node:
    """A node on 127.0.0.1 described by its options, run by a :class:`NodeProcess`; the
    command line is built at each start (``--log-json``, ``--heartbeat-ms 50``)."""

    name: str
    data_dir: Path
    command: str  # "leader" or "replica"
    options: list[str]
    port: int = field(default_factory=free_port)  # 0: any (see ``address``)
    group: str = field(default_factory=random_group)
    leader: str | None = None  # --leader of a replica
    process: NodeProcess = field(init=False)

    def __post_init__(self) -> None:
        self.process = NodeProcess(self.name, self.argv)

    def argv(self) -> list[str]:
        argv = [*CLI, "--log-json", self.command, "--data-dir", str(self.data_dir),
                "--listen", f"127.0.0.1:{self.port}", "--group", self.group,
                "--interface", "127.0.0.1", "--heartbeat-ms", "50", *self.options]  # fmt: skip
        if self.command == "replica":
            assert self.leader is not None
            argv += ["--leader", self.leader]
        return argv

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}" if self.port else self.process.address

    @property
    def log(self) -> list[Event]:
        return self.process.log

    @property
    def starts(self) -> int:
        return self.process.starts

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.process.proc

    async def start(self) -> Event:
        """Start the process; return its ``leader.started`` / ``replica.started`` event."""
        return await asyncio.to_thread(self.process.start)

    async def stop(self, signum: int = signal.SIGTERM) -> int | None:
        return await asyncio.to_thread(self.process.stop, signum)

    async def kill(self) -> None:
        """SIGKILL (no clean stop: what the node had not fsynced may be gone)."""
        assert await self.stop(signal.SIGKILL) == -signal.SIGKILL

    async def pause(self) -> None:
        """SIGSTOP: the process is frozen, its connections stay open."""
        self.process.send_signal(signal.SIGSTOP)

    async def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def events(self, name: str, incarnation: int | None = None) -> list[Event]:
        return self.process.events(name, incarnation)

    async def wait_event(self, name: str, incarnation: int | None = None) -> None:
        where = self.starts if incarnation is None else incarnation
        await eventually(lambda: bool(self.events(name, where)), f"{self.name}: {name}")

    def stderr_tail(self, lines: int = 30) -> str:
        return self.process.tail(lines)


@contextlib.contextmanager
def cluster(*nodes: Node) -> Iterator[tuple[Node, ...]]:
    """Every process of ``nodes`` is killed on the way out, whatever happened."""
    try:
        yield nodes
    finally:
        for node in nodes:
            node.process.stop(signal.SIGKILL)
