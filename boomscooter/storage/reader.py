"""LogReader: read a data directory directly, read-only, while another process writes it.

This is what a subscriber in *notifications* mode uses: it shares a filesystem with a
leader or replica, learns ``(segment file, size)`` pairs from the ``Notifications`` RPC,
and reads the bytes itself. The reader never writes, never takes the directory lock and
never trusts more than it checks: each segment header and every batch's CRC32C are
verified before a batch is handed out.

How far it reads: a segment with a successor in the directory is sealed and read to its
end; the newest segment is read up to the size last announced by :meth:`notify` for it
(never beyond: the writer may announce only committed bytes), or, when nothing was
announced for it, up to its current size. A batch that runs past that limit is simply not
complete yet — it is not an error. When the newest segment is exhausted the directory is
listed again to pick up a roll. Start positions in sealed segments come from their saved
offset index when one is present and consistent, else from walking batch headers.

A reader that falls behind retention gets :class:`SeqnoOutOfRangeError` when the segment
it needs next is gone (descriptors already open keep working: POSIX unlink semantics).
"""

from __future__ import annotations

import os
from bisect import bisect_right

from boomscooter.errors import CorruptLogError, SeqnoOutOfRangeError
from boomscooter.storage.api import DEFAULT_READ_BYTES
from boomscooter.storage.batch import Batch, Record
from boomscooter.storage.index import IndexFiles, IndexMismatch, load_index
from boomscooter.storage.segment import (
    INDEX_SUFFIX,
    LOG_SUFFIX,
    SEGMENT_HEADER_BYTES,
    TIME_INDEX_SUFFIX,
    check_segment_header,
    fd_reader,
    file_name,
    parse_file_name,
    pread_all,
    read_batches,
)


class LogReader:
    """Follow the log in ``directory`` from ``from_seqno`` (default: the first available)."""

    def __init__(self, directory: str | os.PathLike[str], *, from_seqno: int | None = None) -> None:
        self.directory = os.fspath(directory)
        self._bases: list[int] = []
        self._limits: dict[int, int] = {}
        self._base: int | None = None
        self._fd: int | None = None
        self._position = 0
        self._next_seqno = from_seqno
        self.refresh()

    @property
    def next_seqno(self) -> int | None:
        """The seqno the next record read will have (None: the log is still empty)."""
        return self._next_seqno

    @property
    def first_seqno(self) -> int | None:
        """The base seqno of the oldest segment file present."""
        return self._bases[0] if self._bases else None

    def refresh(self) -> None:
        """List the directory again (new segments after a roll, deletions by retention)."""
        bases = []
        for name in os.listdir(self.directory):
            parsed = parse_file_name(name)
            if parsed is not None and parsed.suffix == LOG_SUFFIX and not parsed.temporary:
                bases.append(parsed.base_seqno)
        self._bases = sorted(bases)

    def notify(self, segment_file: str, size_bytes: int) -> None:
        """The writer says ``segment_file`` now holds ``size_bytes`` readable bytes."""
        parsed = parse_file_name(os.path.basename(segment_file))
        if parsed is None or parsed.suffix != LOG_SUFFIX:
            raise ValueError(f"not a segment file name: {segment_file!r}")
        base = parsed.base_seqno
        self._limits[base] = max(self._limits.get(base, 0), size_bytes)
        if base not in self._bases:
            self.refresh()

    def read_batches(self, *, max_bytes: int = DEFAULT_READ_BYTES) -> list[Batch]:
        """Complete batches from :attr:`next_seqno` on, about ``max_bytes`` of them (at least
        one when one is available); advances past them. The first may start before
        :attr:`next_seqno` when the reader was positioned inside a batch."""
        out: list[Batch] = []
        taken = 0
        while True:
            if self._fd is None and not self._open_next():
                return out
            assert self._fd is not None and self._base is not None
            fd, base = self._fd, self._base
            path = os.path.join(self.directory, file_name(base))
            size = os.fstat(fd).st_size
            sealed = self._successor(base) is not None
            if not sealed:
                self.refresh()  # a roll may have happened since the last listing
                sealed = self._successor(base) is not None
                size = os.fstat(fd).st_size
            end = size if sealed or base not in self._limits else min(size, self._limits[base])
            assert self._next_seqno is not None
            batches, position = read_batches(
                fd_reader(fd),
                path=path,
                position=self._position,
                end=end,
                from_seqno=self._next_seqno,
                to_seqno=None,
                max_bytes=max_bytes,
                taken_bytes=taken,
                partial_ok=not sealed,
            )
            self._position = position
            if batches:
                self._next_seqno = max(self._next_seqno, batches[-1].next_seqno)
                out += batches
                taken += sum(b.header.length for b in batches)
            if position < end or not sealed:
                return out
            successor = self._successor(base)
            if successor != self._next_seqno:
                raise CorruptLogError(
                    f"{path} ends before seqno {self._next_seqno} but the next segment starts "
                    f"at {successor}",
                    path=path,
                    offset=position,
                )
            self._close_current()  # sealed and exhausted: on to the next segment

    def read(self, *, max_bytes: int = DEFAULT_READ_BYTES) -> list[Record]:
        """Records from :attr:`next_seqno` on (see :meth:`read_batches`)."""
        start = self._next_seqno or 0
        records: list[Record] = []
        for batch in self.read_batches(max_bytes=max_bytes):
            records += batch.records(start)
        return records

    def _successor(self, base: int) -> int | None:
        i = bisect_right(self._bases, base)
        return self._bases[i] if i < len(self._bases) else None

    def _open_next(self) -> bool:
        """Open the segment holding :attr:`next_seqno`; False when there is none yet."""
        if not self._bases:
            self.refresh()
            if not self._bases:
                return False
        if self._next_seqno is None:
            self._next_seqno = self._bases[0]
        seqno = self._next_seqno
        i = bisect_right(self._bases, seqno) - 1
        if i < 0:
            self.refresh()
            i = bisect_right(self._bases, seqno) - 1
            if i < 0:
                raise SeqnoOutOfRangeError(
                    f"seqno {seqno} is gone: the oldest segment starts at {self._bases[0]}"
                )
        base = self._bases[i]
        path = os.path.join(self.directory, file_name(base))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self.refresh()
            first = self._bases[0] if self._bases else seqno
            raise SeqnoOutOfRangeError(
                f"segment {path} holding seqno {seqno} was deleted (retention?); the log "
                f"now starts at {first}"
            ) from None
        problem = check_segment_header(pread_all(fd, SEGMENT_HEADER_BYTES, 0), base)
        if problem is not None:
            os.close(fd)
            raise CorruptLogError(f"{path}: {problem}", path=path, offset=0)
        self._fd, self._base = fd, base
        self._position = self._start_position(base, seqno, os.fstat(fd).st_size)
        return True

    def _start_position(self, base: int, seqno: int, size: int) -> int:
        """A batch start at or before ``seqno`` from the saved index, if it is usable."""
        if seqno == base:
            return SEGMENT_HEADER_BYTES
        try:
            with open(os.path.join(self.directory, file_name(base, INDEX_SUFFIX)), "rb") as f:
                offsets = f.read()
            with open(os.path.join(self.directory, file_name(base, TIME_INDEX_SUFFIX)), "rb") as f:
                times = f.read()
            index = load_index(
                IndexFiles(offsets=offsets, times=times),
                base_seqno=base,
                segment_bytes=size,
                interval_bytes=None,
                start=SEGMENT_HEADER_BYTES,
            )
        except (OSError, IndexMismatch):
            return SEGMENT_HEADER_BYTES
        return index.find_seqno(seqno)

    def _close_current(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = self._base = None

    def close(self) -> None:
        self._close_current()

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
