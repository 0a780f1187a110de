"""SegmentedLog: the on-disk :class:`~boomscooter.storage.api.Log`.

Theory of operation. The log is a directory of segment files named by base seqno; the
last one is *active* (appended to), the others are *sealed* (immutable until retention
deletes them or ``truncate_after`` cuts into a diverged tail). Each segment's sparse index
lives in memory; sealed segments also have it on disk (see :mod:`.index`).

Appends encode (or, for ``append_batch``, validate) one batch and write it with a single
``pwrite`` at the active segment's end; the in-memory end moves only after the write (and,
under ``always``, its fdatasync) succeeded, so readers in this process never see a partial
or failed batch. A failed write or fsync is cut back off the file (``ftruncate``); a failed
fsync also poisons the log (the page cache can no longer be trusted): further appends raise
:class:`LogClosedError` until it is reopened. Roll by age uses the injectable wall clock
from the active segment's first append (after a restart: the file's modification time).

fsync policy: ``always`` fdatasyncs before the append returns; ``interval`` runs a
background thread that fdatasyncs a duplicate of the active descriptor at most every
``interval_ms`` while there are unsynced appends (``durable_seqno`` says how far it got);
``never`` syncs nothing on the append path. Rolling fdatasyncs the sealed segment (except
under ``never``), saves its index, then creates the next segment atomically (header to a
temp file, fsync, rename, directory fsync). ``sync()`` and ``close()`` always fsync.

Thread safety: every public method takes the log's (reentrant) lock, so appends, reads from
worker threads (a leader serves Fetch and Subscribe from threads), rolls, retention and
``close`` exclude each other; the interval syncer takes it only to pick what to sync and
fdatasyncs duplicates of the descriptors outside it. Sealed segments are read through a
small LRU of read-only descriptors.
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

from boomscooter.errors import (
    BatchEncodeError,
    LogClosedError,
    SeqnoOutOfRangeError,
    StorageIOError,
)
from boomscooter.storage import api
from boomscooter.storage.api import (
    DEFAULT_READ_BYTES,
    FsyncMode,
    LogConfig,
    RecoveryReport,
    check_continues,
    should_roll,
)
from boomscooter.storage.batch import Batch, Entry, Record, encode_batch
from boomscooter.storage.descriptors import DescriptorCache
from boomscooter.storage.index import SegmentIndex
from boomscooter.storage.recovery import (
    Recovery,
    SegmentState,
    create_segment,
    lock_directory,
    remove_index_files,
    rewrite_segment,
    write_index_files,
)
from boomscooter.storage.segment import (
    SEGMENT_HEADER_BYTES,
    fd_reader,
    file_name,
    fsync_dir,
    make_dirs_durable,
    pwrite_all,
    read_batches,
    scan_segment,
    segment_file_batches,
    seqno_at_time,
)
from boomscooter.storage.syncer import IntervalSyncer
from bootcast.logs import get_logger

log = get_logger("boomscooter.storage")


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class SegmentedLog:
    """A log stored as segment files in one directory. Create with :meth:`open`."""

    def __init__(
        self,
        directory: str,
        config: LogConfig,
        segments: list[SegmentState],
        report: RecoveryReport,
        lock_fd: int,
        clock_ms: Callable[[], int],
    ) -> None:
        self.directory = directory
        self.config = config
        self.recovery = report
        self._segments = segments
        self._bases = [s.base_seqno for s in segments]
        self._lock_fd = lock_fd
        self._clock_ms = clock_ms
        # Reentrant: truncation reads batches under it. Reads take it too — they share the
        # cache of open descriptors with each other and with rolls, retention and close.
        self._lock = threading.RLock()
        self._read_fds = DescriptorCache(config.max_open_segments)
        self._active_fd = os.open(segments[-1].path, os.O_RDWR)
        self._active_since_ms = self._since_from_file(segments[-1], self._active_fd)
        self._next_seqno = segments[-1].index.next_seqno
        self._total_bytes = sum(s.index.end for s in segments)
        self._durable_seqno = self._next_seqno - 1  # recovery fsynced every segment
        self._generation = 0  # bumped by truncate_after: an in-flight sync is then stale
        self._tail: tuple[int, int] | None = None  # (last seqno, its batch's epoch), cached
        self._closed = False
        self._failed: BaseException | None = None
        # Called with the new durable seqno whenever the interval syncer (or ``sync``)
        # advances it, from that thread: a leader wakes its commit rule with it.
        self.on_durable: Callable[[int], None] | None = None
        self._syncer: IntervalSyncer | None = None
        if config.fsync.mode is FsyncMode.INTERVAL:
            self._syncer = IntervalSyncer(
                config.fsync.interval_ms / 1000,
                self.sync,
                lambda: self._next_seqno - 1 > self._durable_seqno,
            )

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        config: LogConfig | None = None,
        *,
        repair: bool = False,
        clock_ms: Callable[[], int] | None = None,
    ) -> SegmentedLog:
        """Open (creating if needed) the log in ``directory`` and recover it.

        ``repair=True`` is the operator's explicit option to truncate the log at the first
        corruption instead of refusing to open. ``clock_ms`` (wall clock, ms) drives roll
        and retention by age; tests pass a fake one.
        """
        config = config or LogConfig()
        path = os.fspath(directory)
        make_dirs_durable(path)
        lock_fd = lock_directory(path)
        try:
            started = time.monotonic()
            recovery = Recovery(path, config, repair=repair)
            segments = recovery.run()
            report = RecoveryReport(actions=tuple(recovery.actions))
            self = cls(path, config, segments, report, lock_fd, clock_ms or _wall_clock_ms)
        except BaseException:
            os.close(lock_fd)
            raise
        log.info(
            "log.recovered",
            path=path,
            segments=len(segments),
            first_seqno=self.first_seqno,
            last_seqno=self.last_seqno,
            actions=len(report.actions),
            elapsed_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return self

    # -- state -------------------------------------------------------------------------

    @property
    def first_seqno(self) -> int:
        return self._bases[0]

    @property
    def last_seqno(self) -> int:
        return self._next_seqno - 1

    @property
    def next_seqno(self) -> int:
        return self._next_seqno

    @property
    def durable_seqno(self) -> int:
        return self._durable_seqno

    @property
    def total_bytes(self) -> int:
        return self._total_bytes

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    @property
    def last_epoch(self) -> int:
        """The epoch of the last stored batch (0 when the log is empty): how up to date the
        log is. Cached by last seqno: a replica reports it with every ack."""
        with self._lock:
            last = self._next_seqno - 1
            tail = self._tail
            if tail is not None and tail[0] == last:
                return tail[1]
            epoch = 0
            if last >= self.first_seqno:
                segment = self._segments[bisect_right(self._bases, last) - 1]
                epoch = self._batch_holding(segment, last)[0].epoch
            self._tail = (last, epoch)
            return epoch

    def active_segment(self) -> tuple[str, int]:
        """``(file name, size)`` of the active segment."""
        segment = self._segments[-1]
        return os.path.basename(segment.path), segment.index.end

    def segment_files(self) -> list[tuple[str, int]]:
        """``(file name, size)`` of every segment, oldest first (what notifications carry)."""
        return [(os.path.basename(s.path), s.index.end) for s in self._segments]

    def end_of(self, seqno: int) -> tuple[str, int]:
        """``(file name, offset)`` just past the batch holding the stored ``seqno``."""
        with self._lock:
            self._check_open()
            if not self.first_seqno <= seqno < self._next_seqno:
                raise SeqnoOutOfRangeError(f"seqno {seqno} is not stored")
            segment = self._segments[bisect_right(self._bases, seqno) - 1]
            batch, start = self._batch_holding(segment, seqno)
            return os.path.basename(segment.path), start + batch.header.length

    def _check_open(self) -> None:
        if self._closed:
            raise LogClosedError(f"log {self.directory} is closed")
        if self._failed is not None:
            raise LogClosedError(
                f"log {self.directory} failed earlier ({self._failed}); it refuses writes "
                "until it is closed and opened again"
            )

    def _since_from_file(self, segment: SegmentState, fd: int) -> int | None:
        """When a segment holding batches was first appended to, as far as its file tells
        after a restart: its modification time (the last write, so never too early)."""
        if segment.index.next_seqno == segment.base_seqno or self.config.segment_ms is None:
            return None
        return min(os.fstat(fd).st_mtime_ns // 1_000_000, self._clock_ms())

    # -- appends -----------------------------------------------------------------------

    def append(self, entries: Sequence[Entry], *, epoch: int) -> Batch:
        with self._lock:
            self._check_open()
            batch = encode_batch(entries, base_seqno=self._next_seqno, epoch=epoch)
            self._store_locked(batch)
        return batch

    def append_batch(self, data: bytes | bytearray | memoryview | Batch) -> Batch:
        batch = data if isinstance(data, Batch) else Batch.from_bytes(data)
        with self._lock:
            self._check_open()
            check_continues(batch, self._next_seqno)
            self._store_locked(batch)
        return batch

    def _store_locked(self, batch: Batch) -> None:
        header = batch.header
        config = self.config
        if header.length > config.max_batch_bytes:
            raise BatchEncodeError(
                f"batch of {header.length} bytes exceeds max_batch_bytes {config.max_batch_bytes}"
            )
        index = self._segments[-1].index
        now_ms = self._clock_ms() if config.segment_ms is not None else 0
        if index.batch_count and should_roll(
            config,
            active_bytes=index.end,
            active_batches=index.batch_count,
            active_since_ms=self._active_since_ms,
            batch_bytes=header.length,
            now_ms=now_ms,
        ):
            self._roll_locked()
            index = self._segments[-1].index
        position = index.end
        try:
            if os.pwrite(self._active_fd, batch.data, position) != header.length:
                pwrite_all(self._active_fd, batch.data, position)  # rare: rewrite it whole
        except OSError as exc:
            self._undo_write(position, exc)
        always = config.fsync.mode is FsyncMode.ALWAYS
        if always:
            try:
                os.fdatasync(self._active_fd)
            except OSError as exc:
                self._undo_write(position, exc, poison=True)
        # Only now is the batch part of the log (readers, next seqno, reopen after close).
        if index.batch_count == 0:
            self._active_since_ms = now_ms if config.segment_ms is not None else None
        index.add(position, header)
        self._total_bytes += header.length
        self._next_seqno = header.next_seqno
        self._tail = (header.next_seqno - 1, header.epoch)
        if always:
            self._durable_seqno = header.next_seqno - 1
        elif self._syncer is not None:
            self._syncer.dirty()

    def _undo_write(self, position: int, exc: OSError, *, poison: bool = False) -> NoReturn:
        """Cut a failed write's bytes off so the file ends on a batch boundary. After a
        failed fsync (``poison``) the log also refuses further writes: the kernel may have
        dropped dirty pages of earlier appends, so the page cache no longer tells the truth."""
        try:
            os.ftruncate(self._active_fd, position)
        except OSError as again:
            self._fail(again)
        if poison:
            self._fail(exc)
        raise StorageIOError(f"append to {self._segments[-1].path} failed: {exc}") from exc

    def _fail(self, exc: OSError) -> NoReturn:
        self._failed = exc
        log.error("log.failed", path=self.directory, error=str(exc))
        raise StorageIOError(f"log {self.directory}: {exc}") from exc

    # -- rolling, retention, truncation ------------------------------------------------

    def roll(self) -> None:
        with self._lock:
            self._check_open()
            if self._segments[-1].index.batch_count:
                self._roll_locked()

    def _roll_locked(self) -> None:
        sealed = self._segments[-1]
        sync = self.config.fsync.mode is not FsyncMode.NEVER
        try:
            if sync:
                os.fdatasync(self._active_fd)
                self._durable_seqno = self._next_seqno - 1
            write_index_files(self.directory, sealed.base_seqno, sealed.index)
            fd = create_segment(self.directory, self._next_seqno, sync=sync)
        except OSError as exc:
            self._fail(exc)
        self._read_fds.put(sealed.base_seqno, self._active_fd)
        self._active_fd = fd
        path = os.path.join(self.directory, file_name(self._next_seqno))
        index = SegmentIndex(
            base_seqno=self._next_seqno,
            start=SEGMENT_HEADER_BYTES,
            interval_bytes=self.config.index_interval_bytes,
        )
        self._segments.append(SegmentState(base_seqno=self._next_seqno, path=path, index=index))
        self._bases.append(self._next_seqno)
        self._active_since_ms = None  # set by the first append
        self._total_bytes += SEGMENT_HEADER_BYTES
        log.info(
            "segment.rolled",
            path=sealed.path,
            size_bytes=sealed.index.end,
            next_seqno=self._next_seqno,
        )

    def apply_retention(self, now_ms: int | None = None) -> int:
        with self._lock:
            self._check_open()
            now = self._clock_ms() if now_ms is None else now_ms
            sealed = [(s.index.end, s.index.max_timestamp_ms) for s in self._segments[:-1]]
            count = api.retention_count(self.config, sealed, self._total_bytes, now)
            for _ in range(count):
                victim = self._segments.pop(0)
                self._bases.pop(0)
                self._drop_files(victim)
                log.info(
                    "retention.deleted",
                    path=victim.path,
                    size_bytes=victim.index.end,
                    first_seqno=victim.base_seqno,
                    last_seqno=victim.index.next_seqno - 1,
                )
            if count and self.config.fsync.mode is not FsyncMode.NEVER:
                fsync_dir(self.directory)
            return count

    def _drop_files(self, segment: SegmentState) -> None:
        self._read_fds.discard(segment.base_seqno)
        remove_index_files(self.directory, segment.base_seqno)
        os.unlink(segment.path)
        self._total_bytes -= segment.index.end

    def truncate_after(self, seqno: int) -> None:
        with self._lock:
            self._check_open()
            if seqno >= self.last_seqno:
                return
            if seqno < self.first_seqno - 1:
                raise SeqnoOutOfRangeError(
                    f"cannot truncate after {seqno}: the log starts at {self.first_seqno}"
                )
            try:
                self._truncate_locked(seqno)
            except OSError as exc:
                self._fail(exc)

    def _truncate_locked(self, seqno: int) -> None:
        """Crash safety: later segments are deleted newest first, the directory fsynced after
        each (a crash leaves a shorter log, never a gap); then the remaining segment is cut
        at a batch boundary with ``ftruncate``, or — when the cut falls inside a batch —
        replaced by a copy ending in the shortened batch (temp file, fdatasync, rename). At
        every instant the files hold the old log, the new one, or a log in between that
        still holds every kept record."""
        sync = self.config.fsync.mode is not FsyncMode.NEVER
        while len(self._segments) > 1 and self._segments[-1].base_seqno > seqno:
            os.close(self._active_fd)
            self._bases.pop()
            self._drop_files(self._segments.pop())
            if sync:
                fsync_dir(self.directory)
            self._active_fd = self._reopen_for_write(self._segments[-1])
            self._active_since_ms = self._since_from_file(self._segments[-1], self._active_fd)
        segment = self._segments[-1]
        cut = SEGMENT_HEADER_BYTES
        shortened: Batch | None = None
        if seqno >= segment.base_seqno:
            batch, start = self._batch_holding(segment, seqno)
            cut = start + batch.header.length
            if batch.last_seqno != seqno:
                keep = batch.entries()[: seqno - batch.base_seqno + 1]
                shortened = encode_batch(keep, base_seqno=batch.base_seqno, epoch=batch.epoch)
                cut = start
        if shortened is None:
            os.ftruncate(self._active_fd, cut)
            if sync:
                os.fdatasync(self._active_fd)
        else:
            fd = rewrite_segment(
                self.directory, segment.base_seqno, self._active_fd, cut, shortened.data
            )
            os.close(self._active_fd)
            self._active_fd = fd
            if sync:
                fsync_dir(self.directory)
        end = os.fstat(self._active_fd).st_size
        self._total_bytes -= segment.index.end - end
        segment.index = SegmentIndex(
            base_seqno=segment.base_seqno,
            start=SEGMENT_HEADER_BYTES,
            interval_bytes=self.config.index_interval_bytes,
        )
        damage = scan_segment(
            fd_reader(self._active_fd), size=end, index=segment.index, verify=False
        )
        assert damage is None, damage
        if segment.index.batch_count == 0:
            self._active_since_ms = None
        self._next_seqno = segment.index.next_seqno
        self._generation += 1
        self._tail = None
        # Synced: everything left is on disk (sealed segments were synced when sealed).
        durable = self._next_seqno - 1
        self._durable_seqno = durable if sync else min(self._durable_seqno, durable)
        log.info("segment.truncated", path=segment.path, offset=end, reason="truncate_after")

    def rebase(self, first_seqno: int) -> None:
        """Drop every record and start again, empty, at ``first_seqno``: a replica whose log
        ends before its leader's starts (retention deleted the records in between).

        Crash safety: the segments are deleted newest first, the directory fsynced after
        each (a crash leaves a prefix of the old log, or an empty directory: a new log),
        then the empty segment named by ``first_seqno`` is created atomically."""
        if first_seqno < 1:
            raise SeqnoOutOfRangeError(f"a log cannot start at seqno {first_seqno}")
        with self._lock:
            self._check_open()
            try:
                self._rebase_locked(first_seqno)
            except OSError as exc:
                self._fail(exc)
        log.info("log.rebased", path=self.directory, first_seqno=first_seqno)

    def _rebase_locked(self, base: int) -> None:
        sync = self.config.fsync.mode is not FsyncMode.NEVER
        os.close(self._active_fd)
        self._active_fd = -1
        while self._segments:
            self._bases.pop()
            self._drop_files(self._segments.pop())
            if sync:
                fsync_dir(self.directory)
        self._active_fd = create_segment(self.directory, base, sync=True)
        path = os.path.join(self.directory, file_name(base))
        index = SegmentIndex(
            base_seqno=base,
            start=SEGMENT_HEADER_BYTES,
            interval_bytes=self.config.index_interval_bytes,
        )
        self._segments = [SegmentState(base_seqno=base, path=path, index=index)]
        self._bases = [base]
        self._next_seqno = base
        self._total_bytes = SEGMENT_HEADER_BYTES
        self._durable_seqno = base - 1
        self._active_since_ms = None
        self._generation += 1
        self._tail = None

    def import_segment(self, path: str, base_seqno: int) -> int:
        """Append the batches of a segment file copied from another node (its header and
        every batch checked) that continue this log: batches it already holds are skipped,
        and a batch that would leave a gap ends the import. Returns the records appended."""
        records = 0
        with self._lock:
            for batches in segment_file_batches(path, base_seqno):
                for batch in batches:
                    if batch.base_seqno < self._next_seqno:
                        continue
                    if batch.base_seqno > self._next_seqno:
                        return records
                    self.append_batch(batch)
                    records += batch.record_count
        return records

    def _reopen_for_write(self, segment: SegmentState) -> int:
        self._read_fds.discard(segment.base_seqno)
        remove_index_files(self.directory, segment.base_seqno)
        return os.open(segment.path, os.O_RDWR)

    def _batch_holding(self, segment: SegmentState, seqno: int) -> tuple[Batch, int]:
        """The batch holding ``seqno`` and its position."""
        read_at = fd_reader(self._fd_for(segment))
        batches, after = read_batches(
            read_at,
            path=segment.path,
            position=segment.index.find_seqno(seqno),
            end=segment.index.end,
            from_seqno=seqno,
            to_seqno=seqno,
            max_bytes=1,
        )
        return batches[0], after - batches[0].header.length

    # -- reads -------------------------------------------------------------------------

    def _fd_for(self, segment: SegmentState) -> int:
        if segment is self._segments[-1]:
            return self._active_fd
        return self._read_fds.get(segment.base_seqno, segment.path)

    def read_batches(
        self, from_seqno: int, *, to_seqno: int | None = None, max_bytes: int = DEFAULT_READ_BYTES
    ) -> list[Batch]:
        with self._lock:
            return self._read_batches_locked(from_seqno, to_seqno, max_bytes)

    def _read_batches_locked(
        self, from_seqno: int, to_seqno: int | None, max_bytes: int
    ) -> list[Batch]:
        if self._closed:
            raise LogClosedError(f"log {self.directory} is closed")
        api.check_read_start(from_seqno, self.first_seqno)
        if from_seqno >= self._next_seqno or (to_seqno is not None and to_seqno < from_seqno):
            return []
        out: list[Batch] = []
        taken = 0
        seqno = from_seqno
        i = bisect_right(self._bases, seqno) - 1
        while i < len(self._segments):
            segment = self._segments[i]
            fd = self._fd_for(segment)
            end = segment.index.end
            batches, stopped = read_batches(
                fd_reader(fd),
                path=segment.path,
                position=segment.index.find_seqno(seqno),
                end=end,
                from_seqno=seqno,
                to_seqno=to_seqno,
                max_bytes=max_bytes,
                taken_bytes=taken,
            )
            out += batches
            taken += sum(b.header.length for b in batches)
            if stopped < end:
                break
            seqno = segment.index.next_seqno
            i += 1
        return out

    def read(
        self, from_seqno: int, *, to_seqno: int | None = None, max_bytes: int | None = None
    ) -> Iterator[Record]:
        if self._closed:
            raise LogClosedError(f"log {self.directory} is closed")
        api.check_read_start(from_seqno, self.first_seqno)

        def batches(seqno: int, to: int | None, budget: int) -> list[Batch]:
            return self.read_batches(seqno, to_seqno=to, max_bytes=budget)

        return api.iter_records(batches, from_seqno, to_seqno, max_bytes)

    def seqno_for_time(self, timestamp_ms: int) -> int | None:
        with self._lock:
            return self._seqno_for_time_locked(timestamp_ms)

    def _seqno_for_time_locked(self, timestamp_ms: int) -> int | None:
        if self._closed:
            raise LogClosedError(f"log {self.directory} is closed")
        for segment in self._segments:
            index = segment.index
            if index.end == SEGMENT_HEADER_BYTES or index.max_timestamp_ms < timestamp_ms:
                continue
            read_at = fd_reader(self._fd_for(segment))
            seqno = seqno_at_time(
                read_at, path=segment.path, index=index, timestamp_ms=timestamp_ms
            )
            if seqno is not None:
                return seqno
        return None

    # -- durability and shutdown -------------------------------------------------------

    def sync(self) -> None:
        """fdatasync every segment holding unsynced records; advance ``durable_seqno``."""
        with self._lock:
            self._check_open()
            target = self._next_seqno - 1
            if target <= self._durable_seqno:
                return
            generation = self._generation
            fds = [
                os.dup(self._fd_for(s))
                for s in self._segments
                if s.index.next_seqno - 1 > self._durable_seqno
            ]
        try:
            for fd in fds:
                os.fdatasync(fd)
        except OSError as exc:
            with self._lock:
                self._fail(exc)
        finally:
            for fd in fds:
                os.close(fd)
        with self._lock:
            advanced = generation == self._generation and target > self._durable_seqno
            if advanced:
                self._durable_seqno = target
        listener = self.on_durable
        if advanced and listener is not None:
            listener(target)

    def close(self) -> None:
        if self._closed:
            return
        if self._syncer is not None:
            self._syncer.stop()
        try:
            if self._failed is None:
                self.sync()
        finally:
            with self._lock:
                self._closed = True
                if self._active_fd >= 0:  # -1: a rebase failed between its two halves
                    os.close(self._active_fd)
                self._read_fds.close_all()
                os.close(self._lock_fd)

    def __enter__(self) -> SegmentedLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
