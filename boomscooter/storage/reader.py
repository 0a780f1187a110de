"""LogReader: read a data directory directly, read-only, while another process writes it.

This is what a subscriber in *notifications* mode uses: it shares a filesystem with a
leader or replica, learns ``(segment file, size)`` pairs from the ``Notifications`` RPC,
and reads the bytes itself. The reader never writes, never takes the directory lock and
never trusts more than it checks: each segment header and every batch's CRC32C are
verified before a batch is handed out.

How far it reads. Without notifications, the directory is listed before each read; a
segment with a successor is sealed and read to its end, the newest up to its size. Once
:meth:`notify` has been called, the latest ``(file, size)`` announced is the committed end
of the log and the reader never reads beyond it: segments before that file are read to
their end, that file up to that size, later files not at all. (The writer announces only
committed bytes, in order; a later announcement replaces an earlier one, so a smaller one
— ``truncate_after`` — lowers the limit.) A batch that runs past the limit is simply not
complete yet — it is not an error. Start positions in sealed segments come from their saved
offset index when one is present and consistent, else from walking batch headers.

The writer may drop uncommitted records with ``truncate_after``: it cuts a file, replaces
it by a shortened copy, or deletes it. Before each read the reader checks that the file
it reads is still the one it opened and that the last batch it returned is still in the
log; if it is, the reader finds its place again in the current file, and if it is not —
records it returned are gone — it raises :class:`LogTruncatedError` (so does an
announcement of less than was already read) instead of serving stale bytes.

A reader that falls behind retention gets :class:`SeqnoOutOfRangeError` when the segment
it needs next is gone (descriptors already open keep working: POSIX unlink semantics).
"""

from __future__ import annotations

import os
from bisect import bisect_right
from typing import NamedTuple

from boomscooter.errors import CorruptLogError, LogTruncatedError, SeqnoOutOfRangeError
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


class _Served(NamedTuple):
    """The last batch the reader returned: where it is and its first 8 bytes (length and
    CRC32C), to tell whether it is still in the log."""

    base: int
    position: int
    end: int
    head: bytes


class LogReader:
    """Follow the log in ``directory`` from ``from_seqno`` (default: the first available)."""

    def __init__(self, directory: str | os.PathLike[str], *, from_seqno: int | None = None) -> None:
        self.directory = os.fspath(directory)
        self._bases: list[int] = []
        self._committed: tuple[int, int] | None = None  # the latest notification
        self._base: int | None = None
        self._fd: int | None = None
        self._position = 0
        self._next_seqno = from_seqno
        self._served: _Served | None = None
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
        """The writer says the log's committed end is ``size_bytes`` into ``segment_file``
        (earlier segments are committed whole). From now on the reader reads no further."""
        parsed = parse_file_name(os.path.basename(segment_file))
        if parsed is None or parsed.suffix != LOG_SUFFIX or parsed.temporary:
            raise ValueError(f"not a segment file name: {segment_file!r}")
        self._committed = (parsed.base_seqno, size_bytes)
        if parsed.base_seqno not in self._bases:
            self.refresh()

    def read_batches(self, *, max_bytes: int = DEFAULT_READ_BYTES) -> list[Batch]:
        """Complete batches from :attr:`next_seqno` on, about ``max_bytes`` of them (at least
        one when one is available); advances past them. The first may start before
        :attr:`next_seqno` when the reader was positioned inside a batch. Raises
        :class:`LogTruncatedError` when records it returned earlier were dropped."""
        out: list[Batch] = []
        taken = 0
        while True:
            if self._fd is not None:
                self._check_current()
            if self._fd is None and not self._open_next():
                return out
            assert self._fd is not None and self._base is not None
            fd, base = self._fd, self._base
            end, complete = self._extent(fd, base)
            assert self._next_seqno is not None
            batches, position = read_batches(
                fd_reader(fd),
                path=self._path(base),
                position=self._position,
                end=end,
                from_seqno=self._next_seqno,
                to_seqno=None,
                max_bytes=max_bytes,
                taken_bytes=taken,
                partial_ok=not complete,
            )
            self._position = position
            if batches:
                last = batches[-1]
                self._next_seqno = max(self._next_seqno, last.next_seqno)
                start = position - last.header.length
                self._served = _Served(base, start, position, bytes(last.data[:8]))
                out += batches
                taken += sum(b.header.length for b in batches)
            if position < end or not complete:
                return out
            successor = self._successor(base)
            if successor != self._next_seqno:
                if successor is not None and not os.path.exists(self._path(base)):
                    raise SeqnoOutOfRangeError(
                        f"seqno {self._next_seqno} is gone: retention deleted its segment, "
                        f"the log now starts at {self._bases[0]}"
                    )
                raise CorruptLogError(
                    f"{self._path(base)} ends before seqno {self._next_seqno} but the next "
                    f"segment starts at {successor}",
                    path=self._path(base),
                    offset=position,
                )
            self._close_current()  # complete and exhausted: on to the next segment

    def read(self, *, max_bytes: int = DEFAULT_READ_BYTES) -> list[Record]:
        """Records from :attr:`next_seqno` on (see :meth:`read_batches`)."""
        start = self._next_seqno or 0
        records: list[Record] = []
        for batch in self.read_batches(max_bytes=max_bytes):
            records += batch.records(start)
        return records

    def _path(self, base: int) -> str:
        return os.path.join(self.directory, file_name(base))

    def _extent(self, fd: int, base: int) -> tuple[int, bool]:
        """How far segment ``base`` may be read, and whether that is its end (it is
        complete: the reader moves on to the next segment after it)."""
        if self._committed is None:  # what the directory shows, listed before the size
            self.refresh()  # a roll may have happened, or truncate_after deleted segments
            return os.fstat(fd).st_size, self._successor(base) is not None
        committed = self._committed
        served = self._served
        if served is not None and committed < (served.base, served.end):
            raise self._truncated(
                f"the writer announced {file_name(committed[0])} at {committed[1]} bytes"
            )
        size = os.fstat(fd).st_size
        if base < committed[0]:
            if self._successor(base) is None:
                self.refresh()
            return size, True
        if base == committed[0]:
            return min(size, committed[1]), False
        return self._position, False  # nothing in this segment is committed yet

    def _check_current(self) -> None:
        """Whether the file being read is still the one opened, not cut below the reader's
        position, and still holds the last batch returned. If not, the current file is
        closed (the next read finds its place again by seqno) after checking that the last
        batch returned is still in the log (else :class:`LogTruncatedError`)."""
        assert self._fd is not None and self._base is not None
        base = self._base
        here = os.fstat(self._fd)
        try:
            there = os.stat(self._path(base))
        except FileNotFoundError:
            self.refresh()
            if self._bases and self._bases[0] > base:
                return  # retention deletes the oldest first: the descriptor still reads it
        else:
            served = self._served
            if (
                (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino)
                and here.st_size >= self._position
                and (
                    served is None
                    or served.base != base
                    or pread_all(self._fd, len(served.head), served.position) == served.head
                )
            ):
                return
        self._close_current()
        self._check_served()

    def _check_served(self) -> None:
        served = self._served
        if served is None:
            return
        try:
            fd = os.open(self._path(served.base), os.O_RDONLY)
        except FileNotFoundError:
            self.refresh()
            if self._bases and self._bases[0] > served.base:
                return  # deleted by retention
            raise self._truncated(f"{file_name(served.base)} was deleted") from None
        try:
            head = pread_all(fd, len(served.head), served.position)
        finally:
            os.close(fd)
        if head != served.head:
            raise self._truncated(f"{file_name(served.base)} was cut or rewritten")

    def _truncated(self, what: str) -> LogTruncatedError:
        returned = (self._next_seqno or 1) - 1
        return LogTruncatedError(
            f"{self.directory}: {what}, but this reader already returned records up to seqno "
            f"{returned}: the writer dropped records that were not committed "
            "(truncate_after); open a new reader at the committed position"
        )

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
        served = self._served
        if served is not None and served.base == base and served.end <= os.fstat(fd).st_size:
            self._position = served.end  # back to where this reader was in this segment
        else:
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
