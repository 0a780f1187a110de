"""The event loop boomscooter runs on: uvloop's when it is installed (a dependency on
Linux), else asyncio's. gRPC's asyncio stack answers a call in ~0.5 ms on uvloop against
~0.9 ms on asyncio's own loop here, and the log's latency is mostly gRPC's. Applications
using the SDK choose their own loop; the CLI, the demo, the blocking SDK classes (which
run a loop in a thread) and the benchmarks use this one."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop, or asyncio's when uvloop is missing or ``BOOMSCOOTER_LOOP=asyncio``."""
    if os.environ.get("BOOMSCOOTER_LOOP") == "asyncio":
        return asyncio.new_event_loop()
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on :func:`new_event_loop`."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coro)
