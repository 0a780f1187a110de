"""In-process clusters for the replication tests: nodes as :class:`LeaderNode` objects on
the test's event loop (the ``cluster`` fixture, in conftest.py, starts them on one multicast
group and stops them at the end)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from boomscooter.node.leader import LeaderNode
from boomscooter.storage import FsyncMode, FsyncPolicy

ALWAYS = FsyncPolicy(mode=FsyncMode.ALWAYS)
Start = Callable[..., Awaitable[LeaderNode]]


async def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 (polling node state in a test)
            await asyncio.sleep(0.02)
    assert predicate(), what
