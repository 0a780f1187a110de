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
from . import parity
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
    # Read-ahead: the carousel reads pages in order, one pread per READ_AHEAD pages.
    _chunk: bytes = b""
    _chunk_first: int = 0
    _chunk_pages: int = 0
    _block: tuple[int, list[bytes]] | None = None  # the last block parity was encoded for

    READ_AHEAD = 64

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

    def payload(self, index: int) -> memoryview:
        """Page ``index``, read from the file opened at the cast's start (page cache)."""
        slot = index - self._chunk_first
        if not 0 <= slot < self._chunk_pages:
            self._read_ahead(index)
            slot = 0
        page_size = self.page_size
        return memoryview(self._chunk)[slot * page_size : (slot + 1) * page_size]

    def _read_ahead(self, index: int) -> None:
        count = max(1, min(self.READ_AHEAD, self.pages - index + 1))
        offset = (index - 1) * self.page_size
        length = max(0, min(count * self.page_size, self.size - offset))
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise SourceChanged(f"{self.path} shrank during the cast (page {index})")
        self._chunk, self._chunk_first, self._chunk_pages = data, index, count

    def parity_symbol(self, block: int, number: int, block_pages: int) -> bytes:
        """Parity symbol ``number`` of ``block`` (``parity.py``); the block's pages are
        read once for the symbols of one block that go out back to back."""
        if self._block is None or self._block[0] != block:
            first, k = parity.block_span(block, self.pages, block_pages)
            offset = (first - 1) * self.page_size
            length = min(k * self.page_size, self.size - offset)
            data = os.pread(self._fd, length, offset)
            if len(data) != length:
                raise SourceChanged(f"{self.path} shrank during the cast (block {block})")
            ps = self.page_size
            pages = parity.pad([data[i * ps : (i + 1) * ps] for i in range(k)], ps)
            self._block = (block, pages)
        return parity.encode_symbols(self._block[1], [number])[0]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
