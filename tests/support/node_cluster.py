"""In-process clusters for the replication tests: nodes as :class:`Node` objects on
the test's event loop (the ``cluster`` fixture, in conftest.py, starts them on one multicast
group and stops them at the end)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from boomscooter.node.runtime import Node
from boomscooter.storage import FsyncMode, FsyncPolicy

ALWAYS = FsyncPolicy(mode=FsyncMode.ALWAYS)
Start = Callable[..., Awaitable[Node]]
