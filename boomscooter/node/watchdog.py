"""The event-loop watchdog: a thread that notices when a node's event loop is blocked, and
says where.

Everything a node does runs on one event loop; a call that blocks it (a lock taken forever,
a disk that stops answering in a synchronous call, a busy loop in a bug) stops the node
answering anyone — gRPC, the stream, its timers, SIGTERM. From inside, such a hang leaves no
trace. So the loop touches a heartbeat every ``interval_s`` and a daemon thread checks it as
often: once the heartbeat is older than ``bound_s``, the thread logs ``node.loop_blocked``
(once per stall) with the stack of the loop's thread where it is stuck, and
``node.loop_unblocked`` with the stall's length when the loop beats again. ``stalls``
counts them (the node's ``loop_stalls`` counter in Status).
"""

from __future__ import annotations

import asyncio
import faulthandler
import tempfile
import threading
import time

from bootcast.logs import get_logger

log = get_logger("boomscooter.watchdog")

BOUND_S = 1.0  # a loop blocked this long is logged (a loaded 2-core host stays well below)
INTERVAL_S = 0.1


class LoopWatchdog:
    """Watches the running loop it was started on (see the module docstring)."""

    def __init__(self, *, bound_s: float = BOUND_S, interval_s: float = INTERVAL_S) -> None:
        self.bound_s = bound_s
        self.interval_s = interval_s
        self.stalls = 0
        self._beat_at = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._timer: asyncio.TimerHandle | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start watching the running loop (call on it)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._beat()
        self._thread = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _beat(self) -> None:
        self._beat_at = time.monotonic()
        assert self._loop is not None
        self._timer = self._loop.call_later(self.interval_s, self._beat)

    def _watch(self) -> None:
        blocked_since: float | None = None
        while not self._stop.wait(self.interval_s):
            beat_at = self._beat_at
            lag = time.monotonic() - beat_at
            if blocked_since is None and lag > self.bound_s:
                blocked_since = beat_at
                self.stalls += 1
                log.warning("node.loop_blocked", blocked_s=round(lag, 3), stack=self._stack())
            elif blocked_since is not None and beat_at > blocked_since:
                log.warning("node.loop_unblocked", blocked_s=round(beat_at - blocked_since, 3))
                blocked_since = None

    def _stack(self) -> list[str]:
        """Where the loop's thread is now (faulthandler's dump of that thread, innermost
        call first)."""
        with tempfile.TemporaryFile("w+") as dump:
            faulthandler.dump_traceback(dump, all_threads=True)
            dump.seek(0)
            lines = dump.read().splitlines()
        wanted = f"{self._loop_thread:#018x}"
        stack: list[str] = []
        for line in lines:
            if line.startswith(("Thread 0x", "Current thread 0x")):
                if stack:
                    break
                if wanted in line:
                    stack.append(line)
            elif stack and line.strip():
                stack.append(line.strip())
        return stack
