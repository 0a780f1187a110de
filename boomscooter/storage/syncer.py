"""The ``interval`` fsync policy's background thread (see :class:`IntervalSyncer`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from boomscooter.errors import LogClosedError, StorageIOError


class IntervalSyncer:
    """Calls ``sync`` soon after :meth:`dirty` (the first unsynced append), but at most once
    per ``period_s``: a trickle of appends becomes durable within about one fdatasync, a
    flood costs one fdatasync per period. ``pending`` says whether anything is unsynced.
    Stops for good when ``sync`` reports the log closed or failed."""

    def __init__(
        self, period_s: float, sync: Callable[[], None], pending: Callable[[], bool]
    ) -> None:
        self.period_s = period_s
        self._sync = sync
        self._pending = pending
        self._stop = threading.Event()
        self._dirty = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="boomscooter-fsync", daemon=True)
        self._thread.start()

    def dirty(self) -> None:
        self._dirty.set()

    def stop(self, *, wait: bool = True) -> None:
        self._stop.set()
        self._dirty.set()
        if wait:
            self._thread.join()

    def _loop(self) -> None:
        last_sync = -self.period_s
        while True:
            self._dirty.wait()
            if self._stop.is_set():
                return
            wait_s = last_sync + self.period_s - time.monotonic()
            if wait_s > 0 and self._stop.wait(wait_s):
                return
            self._dirty.clear()
            if self._stop.is_set():  # a stop whose wake-up the clear just took (not lost)
                return
            last_sync = time.monotonic()
            if not self._pending():
                continue
            try:
                self._sync()
            except (LogClosedError, StorageIOError):
                return
