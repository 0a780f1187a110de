"""How the tests wait: on a condition, with a generous overall bound — never on a short
deadline or a fixed sleep.

CI runs the suite on two cores shared with every node, producer and subscriber a test starts;
a loaded host can hold a process off the CPU for a second or more. So:

- a wait for something that will happen (a record delivered, a replica in sync, a cast
  stopped) polls its condition, or awaits its event, for up to ``PATIENCE_S``: on a healthy
  run it returns as soon as the condition holds, and the bound only decides how long a broken
  run takes to fail;
- a check that something does *not* happen (no second resend, no datagram after the last
  leave) watches for a quiet period, ``QUIET_S`` unless the test's point is a particular
  window, and only after the positive path it could race has been awaited to its end (so a
  late positive message cannot be taken for the unwanted one).

``tests/test_suite_hygiene.py`` keeps new short deadlines and bare sleeps out of the tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

PATIENCE_S = 60.0
"""The bound on a wait for a condition that will hold: long enough for any loaded host."""

QUIET_S = 0.5
"""How long a negative check watches for something that must not happen."""

POLL_S = 0.02


async def eventually(
    predicate: Callable[[], object],
    what: str,
    *,
    timeout_s: float = PATIENCE_S,
    interval_s: float = POLL_S,
) -> None:
    """Return once ``predicate()`` is true; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(interval_s)


def eventually_blocking(
    predicate: Callable[[], object],
    what: str,
    *,
    timeout_s: float = PATIENCE_S,
    interval_s: float = 0.05,
) -> None:
    """:func:`eventually` for tests without an event loop."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(interval_s)


async def within(awaitable: Awaitable[T], what: str, *, timeout_s: float = PATIENCE_S) -> T:
    """Await ``awaitable``; fail naming ``what`` if it takes longer than ``timeout_s``."""
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except TimeoutError:
        raise AssertionError(f"not within {timeout_s} s: {what}") from None


async def stays_quiet(awaitable: Awaitable[object], what: str, *, quiet_s: float = QUIET_S) -> None:
    """Fail if ``awaitable`` completes within ``quiet_s`` (it is cancelled afterwards)."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait([task], timeout=quiet_s)
    finally:
        task.cancel()
    if done:
        raise AssertionError(f"{what}: {task.result()!r}")


async def still_pending(
    future: asyncio.Future[Any], what: str, *, quiet_s: float = QUIET_S
) -> None:
    """Fail if ``future`` is done, or gets done within ``quiet_s`` (it is left running)."""
    done, _ = await asyncio.wait([future], timeout=quiet_s)
    if done:
        raise AssertionError(f"{what}: done too soon")
