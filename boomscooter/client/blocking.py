"""The blocking API's one mechanism: an event loop on a background thread that runs an
async SDK object (a :class:`~boomscooter.client.producer.Producer` for
:class:`~boomscooter.client.sync_producer.SyncProducer`, a
:class:`~boomscooter.client.subscriber.Subscriber` inside ``with``) through its public
methods, while the caller's thread blocks on the results."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from boomscooter import loops

T = TypeVar("T")


class BackgroundLoop:
    """An event loop (boomscooter's: uvloop where available) running on a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = loops.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop; block until it returns (or raises)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def call_soon(self, callback: Callable[[], object]) -> None:
        """Schedule ``callback`` on the loop (from any thread)."""
        self.loop.call_soon_threadsafe(callback)

    def cancel_all(self) -> None:
        """Cancel every task on the loop (from any thread)."""

        def cancel() -> None:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()

        with contextlib.suppress(RuntimeError):  # the loop may have stopped already
            self.loop.call_soon_threadsafe(cancel)

    def close(self, timeout_s: float | None = None) -> None:
        """Stop the loop, join its thread, close it."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.loop.close()
