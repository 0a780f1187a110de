"""A served file for the duration of one cast: opened once, read page by page with ``pread``
(a file truncated meanwhile stops the cast with :class:`SourceChanged`, it cannot crash the
server as a mapping would), with its digests from the cache (``digests.py``)."""

from __future__ import annotations

import contextlib
import os
from array import array
from dataclasses import dataclass
from pathlib import Path

from . import page as pagecodec
from .digests import DigestCache, compute_fd, key_of
from .errors import SourceChanged


@dataclass(slots=True)
class FileSource:
    """A file mapped once for the whole cast, with its digest and per-page CRCs."""

    path: Path
    size: int
    page_size: int
    sha256: str
    crcs: array[int]
    _fd: int

    @classmethod
    def open(cls, path: Path, fd: int, page_size: int, cache: DigestCache) -> FileSource:
        """Take ``fd``'s digests from the cache or compute them (in a worker thread)."""
        try:
            st = os.fstat(fd)
            key = key_of(st, page_size)
            found = cache.get(key)
            if found is None:
                found = compute_fd(fd, st.st_size, page_size)
                cache.put(key, found)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, st.st_size, page_size, found.sha256, found.crcs, fd)

    @property
    def pages(self) -> int:
        return pagecodec.page_count(self.size, self.page_size)

    def payload(self, index: int) -> bytes:
        """Page ``index``, read from the file opened at the cast's start (page cache)."""
        offset, length = pagecodec.page_span(index, self.size, self.page_size)
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise SourceChanged(f"{self.path} shrank during the cast (page {index})")
        return data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
