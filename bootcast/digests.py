"""Digests of served files — SHA-256 of the whole file and CRC32C of every page — cached by
file identity, and computed ahead of time for the files under the served directory.

A join must answer with ``SHA256=``, so the first join of a file waits for its digest: a few
seconds for a multi-gigabyte image. The server therefore hashes the files under ``--dir`` in
a background thread when it starts (``prehash``), and remembers digests by
``(device, inode, size, mtime_ns, page size)``: a file replaced or rewritten gets new ones.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from . import page as pagecodec
from .errors import SourceChanged
from .logs import get_logger

log = get_logger("bootcast.digests")

_HASH_CHUNK = 4 * 1024 * 1024
Key = tuple[int, int, int, int, int]


@dataclass(frozen=True, slots=True)
class Digests:
    sha256: str
    crcs: array[int]  # index 0 unused: pages are 1-based


def key_of(st: os.stat_result, page_size: int) -> Key:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, page_size)


def compute(view: memoryview | bytes, page_size: int) -> Digests:
    size = len(view)
    digest = hashlib.sha256()
    for offset in range(0, size, _HASH_CHUNK):
        digest.update(view[offset : offset + _HASH_CHUNK])
    crcs = array("I", [0])
    crc = pagecodec.crc32c
    for offset in range(0, size, page_size):
        crcs.append(crc(view[offset : offset + page_size]))
    return Digests(digest.hexdigest(), crcs)


def compute_fd(fd: int, size: int, page_size: int) -> Digests:
    """Digests of the first ``size`` bytes of ``fd``, read with ``pread`` (not mapped: a
    file truncated meanwhile must be an error, not a SIGBUS that kills the server)."""
    digest = hashlib.sha256()
    crcs = array("I", [0])
    crc = pagecodec.crc32c
    chunk = page_size * max(1, _HASH_CHUNK // page_size)
    for offset in range(0, size, chunk):
        data = os.pread(fd, min(chunk, size - offset), offset)
        if len(data) != min(chunk, size - offset):
            raise SourceChanged(f"file shrank while being read (at byte {offset + len(data)})")
        digest.update(data)
        view = memoryview(data)
        for sub in range(0, len(data), page_size):
            crcs.append(crc(view[sub : sub + page_size]))
    return Digests(digest.hexdigest(), crcs)


class DigestCache:
    def __init__(self, max_entries: int = 1024) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Key, Digests] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Key) -> Digests | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: Key, digests: Digests) -> None:
        with self._lock:
            self._entries[key] = digests
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def prehash(self, root: Path, page_size: int, *, budget_bytes: int) -> int:
        """Hash regular files under ``root`` (symlinks are not followed) until
        ``budget_bytes`` are read; returns how many files were hashed."""
        done = 0
        for directory, dirs, files in os.walk(root, followlinks=False):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(directory, name)
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode) or st.st_size > budget_bytes:
                        continue
                    key = key_of(st, page_size)
                    if self.get(key) is None:
                        self.put(key, compute_fd(fd, st.st_size, page_size))
                        done += 1
                    budget_bytes -= st.st_size
                except (OSError, SourceChanged):
                    continue
                finally:
                    os.close(fd)
                if budget_bytes <= 0:
                    return done
        return done
