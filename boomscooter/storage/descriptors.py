"""Read-only descriptors of sealed segments, kept open for reads (an LRU)."""

from __future__ import annotations

import os
from collections import OrderedDict


class DescriptorCache:
    """At most ``limit`` open descriptors by segment base seqno; the least recently used
    is closed first. Not thread-safe: the log calls it under its lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._fds: OrderedDict[int, int] = OrderedDict()

    def put(self, base: int, fd: int) -> None:
        """Keep ``fd`` (now owned by the cache) for the segment at ``base``."""
        self._fds[base] = fd
        while len(self._fds) > self.limit:
            _base, old = self._fds.popitem(last=False)
            os.close(old)

    def get(self, base: int, path: str) -> int:
        """The segment's descriptor, opened read-only if not cached."""
        fd = self._fds.get(base)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self.put(base, fd)
        else:
            self._fds.move_to_end(base)
        return fd

    def discard(self, base: int) -> None:
        """Close the segment's descriptor, if cached (its file changes or goes)."""
        fd = self._fds.pop(base, None)
        if fd is not None:
            os.close(fd)

    def close_all(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def descriptors(self) -> list[int]:
        return list(self._fds.values())
