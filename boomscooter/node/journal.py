"""The producer journal: the dedupe table survives a leader restart.

``producers.journal`` in the data directory holds one entry per batch appended with a
``producer_id``, written *before* the batch is appended (so a process crash — SIGKILL —
between the two never leaves a stored batch without its entry). Entries of batches that
never reached the log are ignored on load. Little-endian::

     0  4  crc32c       CRC32C of bytes [4, 30 + id_length)
     4  2  id_length    bytes of producer_id (<= 128)
     6  8  batch_sequence
    14  8  base_seqno
    22  4  record_count
    26  4  epoch
    30     producer_id (UTF-8)

A bad entry ends the journal (a torn tail: the file is cut there). The journal is fsynced
at most once a second (off the event loop) and at close: after a *power loss*, a batch
stored in the last second and retried after the restart can be stored twice (a process
crash cannot cause this). It is rewritten compactly (temp file + rename, on a worker thread
while appends wait) on open and whenever it grows past ``compact_bytes``.
"""

from __future__ import annotations

import errno
import os
import struct
import time

from boomscooter.node.core import Appended, DedupeTable
from boomscooter.storage.batch import crc32c
from bootcast.logs import get_logger

JOURNAL_NAME = "producers.journal"
_ENTRY = struct.Struct("<IHQQII")
_SYNC_EVERY_S = 1.0
DEFAULT_COMPACT_BYTES = 16 << 20

log = get_logger("boomscooter.journal")


def encode_entry(producer_id: str, batch_sequence: int, appended: Appended) -> bytes:
    ident = producer_id.encode("utf-8", "surrogatepass")
    body = (
        _ENTRY.pack(
            0,
            len(ident),
            batch_sequence,
            appended.base_seqno,
            appended.record_count,
            appended.epoch,
        )[4:]
        + ident
    )
    return struct.pack("<I", crc32c(body)) + body


def decode_entries(data: bytes) -> tuple[list[tuple[str, int, Appended]], int]:
    """The valid entries and the length of the valid prefix."""
    entries = []
    at = 0
    while at + _ENTRY.size <= len(data):
        crc, id_len, sequence, base, count, epoch = _ENTRY.unpack_from(data, at)
        end = at + _ENTRY.size + id_len
        if end > len(data) or crc32c(data[at + 4 : end]) != crc or count < 1 or base < 1:
            break
        try:
            producer_id = data[at + _ENTRY.size : end].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            break
        entries.append((producer_id, sequence, Appended(base, count, epoch)))
        at = end
    return entries, at


class ProducerJournal:
    """Appends dedupe entries to ``producers.journal`` and loads them into a table."""

    def __init__(self, directory: str, *, compact_bytes: int = DEFAULT_COMPACT_BYTES) -> None:
        self.path = os.path.join(directory, JOURNAL_NAME)
        self.compact_bytes = compact_bytes
        self._fd = -1
        self._size = 0
        self._compact_size = 0
        self._synced_at = 0.0

    def load(self, table: DedupeTable, *, last_seqno: int) -> int:
        """Fill ``table`` with the entries of batches the log holds (``<= last_seqno``),
        rewrite the journal compactly, open it for appends; returns the entries loaded."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        entries, valid = decode_entries(data)
        if valid < len(data):
            log.warning(
                "journal.truncated", path=self.path, offset=valid, dropped=len(data) - valid
            )
        loaded = 0
        for producer_id, sequence, appended in entries:
            if appended.last_seqno <= last_seqno:
                table.add(producer_id, sequence, appended)
                loaded += 1
        self.rewrite(table)
        return loaded

    def rewrite(self, table: DedupeTable) -> None:
        """Replace the journal with the table's entries (temp + fsync + rename)."""
        self.replace(self.encoded(table))

    @staticmethod
    def encoded(table: DedupeTable) -> bytes:
        """The table's entries as a compact journal (no I/O: a snapshot taken on the event
        loop, written by :meth:`replace` on a worker thread)."""
        return b"".join(encode_entry(p, s, a) for p, s, a in table.items())

    def replace(self, data: bytes) -> None:
        """Make ``data`` the journal (temp + fsync + rename + directory fsync) and append
        after it from now on. Blocking: the caller runs it off the event loop, and holds off
        :meth:`append` meanwhile (an entry written to the old file would be lost)."""
        temp = self.path + ".tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fdatasync(fd)
        finally:
            os.close(fd)
        os.rename(temp, self.path)
        dir_fd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._size = self._compact_size = len(data)

    def append(self, producer_id: str, batch_sequence: int, appended: Appended) -> None:
        entry = encode_entry(producer_id, batch_sequence, appended)
        try:
            written = os.write(self._fd, entry)
            if written != len(entry):
                raise OSError(errno.ENOSPC, f"short write to {self.path}")
        except OSError:
            os.ftruncate(self._fd, self._size)  # no torn entry in the middle of the file
            raise
        self._size += len(entry)

    def sync_due(self) -> int | None:
        """A duplicate of the journal's descriptor when a sync is due (at most once a
        second), else None: the caller fdatasyncs and closes it off the event loop, where
        an fdatasync that takes tens of milliseconds stalls nobody."""
        now = time.monotonic()
        if self._fd < 0 or now - self._synced_at < _SYNC_EVERY_S:
            return None
        self._synced_at = now
        return os.dup(self._fd)

    @staticmethod
    def sync_fd(fd: int) -> None:
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def undo(self, producer_id: str, batch_sequence: int, appended: Appended) -> None:
        """Take back the last entry (its batch was not appended after all)."""
        self._size -= len(encode_entry(producer_id, batch_sequence, appended))
        os.ftruncate(self._fd, self._size)

    def needs_compaction(self) -> bool:
        """Over ``compact_bytes`` and twice its compact size: a table that is itself large
        is not rewritten on every append."""
        return self._size > max(self.compact_bytes, 2 * self._compact_size)

    def sync(self) -> None:
        if self._fd >= 0:
            os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self.sync()
            finally:
                os.close(self._fd)
                self._fd = -1
