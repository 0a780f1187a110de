"""The output file of a fetch: a temporary file beside the destination, written in coalesced
runs, hashed while pages arrive, synced in the background, and published by rename only
once verified (data on disk first, so a power cut never leaves a torn file under the name).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sys
import tempfile
import threading

from .errors import ConfigError, FetchError

_UMASK = os.umask(0o022)  # read once (setting it is process-wide), then put back
os.umask(_UMASK)


class PrefixHash:
    """SHA-256 of the file's held prefix, advanced while pages arrive.

    Pages mostly arrive in order, so hashing the held prefix as it grows (read back from
    the page cache in large pieces, a few times per tick of the receive loop) overlaps the
    digest with waiting for the network instead of reading the whole file again at the
    end, and costs no Python work per page.
    """

    def __init__(self, fd: int, page_size: int) -> None:
        self.fd = fd
        self.page_size = page_size
        self.digest = hashlib.sha256()
        self.next_index = 1

    def catch_up(self, have: bytearray, pages: int, limit_bytes: int = 4 << 20) -> None:
        """Hash the run of held pages that follows the prefix (one read, bounded)."""
        if self.next_index > pages or not have[self.next_index]:
            return
        end = have.find(0, self.next_index, pages + 1)
        end = pages + 1 if end < 0 else end
        count = min(end - self.next_index, max(1, limit_bytes // self.page_size))
        offset = (self.next_index - 1) * self.page_size
        self.digest.update(os.pread(self.fd, count * self.page_size, offset))
        self.next_index += count

    def finish(self, size: int) -> str:
        offset = (self.next_index - 1) * self.page_size
        while offset < size:
            chunk = os.pread(self.fd, min(4 * 1024 * 1024, size - offset), offset)
            if not chunk:
                break
            self.digest.update(chunk)
            offset += len(chunk)
        return self.digest.hexdigest()


def temp_for(destination: str) -> tuple[int, str]:
    if destination == "-":
        return tempfile.mkstemp(prefix="bootcast-", suffix=".part")
    parent, name = os.path.split(destination)
    parent = parent or "."
    if not os.path.isdir(parent):
        raise ConfigError(f"no such directory: {parent}")
    return tempfile.mkstemp(prefix=f".{name}.", suffix=".bootcast-part", dir=parent)


def finish(fd: int, temp: str, destination: str) -> None:
    """Publish the verified file. Its data reaches the disk before it gets its name
    (fdatasync, then rename), so even a power cut never leaves a partial file under the
    final name; the rename itself is not forced to disk (as with cp or wget): after a cut
    the file may be missing, never torn."""
    if destination == "-":
        os.lseek(fd, 0, os.SEEK_SET)
        with os.fdopen(os.dup(fd), "rb") as src:
            shutil.copyfileobj(src, sys.stdout.buffer, 1024 * 1024)
        sys.stdout.buffer.flush()
        os.unlink(temp)
        return
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.fdatasync(fd)
    os.replace(temp, destination)


class _BackgroundSync:
    """Writes dirty pages back as the transfer goes (``fdatasync`` in a thread: it blocks),
    so the final one before the rename has little left to do."""

    SYNC_EVERY = 1024 * 1024  # the final fdatasync of eight clients at once: ~0.1 s, not 0.4

    def __init__(self, fd: int, destination: str) -> None:
        self.fd = fd
        self.destination = destination
        self.unsynced = 0
        self._syncer: threading.Thread | None = None
        self.sync_error: OSError | None = None

    def sync_if_due(self) -> None:
        if self.unsynced >= self.SYNC_EVERY and (
            self._syncer is None or not self._syncer.is_alive()
        ):
            self.unsynced = 0
            self._syncer = threading.Thread(target=self._sync, name="bootcast-sync", daemon=True)
            self._syncer.start()

    def _sync(self) -> None:
        try:
            os.fdatasync(self.fd)  # writes back pages dirtied through a mapping too
        except OSError as exc:
            # Linux reports a writeback error once per file: keep it for the verdict.
            self.sync_error = exc

    def wait_synced(self) -> None:
        if self._syncer is not None:
            self._syncer.join()
        self._closed()
        if self.sync_error is not None:
            raise FetchError(
                f"cannot write {self.destination}: {self.sync_error.strerror}"
            ) from None

    def _closed(self) -> None:
        """Release what the writer holds once the last background sync ended."""


class MappedWriter(_BackgroundSync):
    """Writes pages into a shared mapping of the (preallocated) output file: a page is a
    memory copy, not a syscall (at 20 % loss, runs of consecutive pages are short, and a
    ``pwrite`` per run cost more than the pages). Space is reserved up front with
    ``posix_fallocate``, so a full disk is a clear error at the start, never a SIGBUS in
    the middle."""

    def __init__(self, fd: int, destination: str, size: int) -> None:
        import mmap

        super().__init__(fd, destination)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise FetchError(
                    f"cannot write {destination}: not enough space for {size} bytes"
                ) from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise FetchError(f"cannot write {destination}: {exc.strerror}") from None
        self.map = mmap.mmap(fd, size)

    def write(self, offset: int, payload: memoryview) -> None:
        n = len(payload)
        self.map[offset : offset + n] = payload
        self.unsynced += n

    def read(self, offset: int, length: int) -> bytes:
        return self.map[offset : offset + length]

    def flush(self) -> None:
        """Nothing to do: the mapping is the page cache."""

    def _closed(self) -> None:
        self.map.close()


class Writer(_BackgroundSync):
    """Coalesces runs of consecutive pages into one ``pwrite`` (pages mostly arrive in
    order, and a syscall per 1400-byte page costs more than the page). For files of unknown
    size (a spec server sends no SIZE=), which cannot be mapped up front."""

    LIMIT = 256 * 1024

    def __init__(self, fd: int, destination: str) -> None:
        super().__init__(fd, destination)
        self.start = 0
        self.buffer = bytearray()

    def read(self, offset: int, length: int) -> bytes:
        self.flush()
        return os.pread(self.fd, length, offset)

    def write(self, offset: int, payload: memoryview) -> None:
        if self.buffer and offset != self.start + len(self.buffer):
            self.flush()
        if not self.buffer:
            self.start = offset
        self.buffer += payload
        if len(self.buffer) >= self.LIMIT:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        try:
            view = memoryview(self.buffer)
            done = 0
            while done < len(view):  # a short write (NFS, FUSE, a full disk) is not an error
                n = os.pwrite(self.fd, view[done:], self.start + done)
                if n == 0:
                    raise OSError(errno.ENOSPC, "no space left on device")
                done += n
        except OSError as exc:
            raise FetchError(f"cannot write {self.destination}: {exc.strerror}") from None
        self.unsynced += len(self.buffer)
        self.buffer = bytearray()
