"""Opening a data directory: classify its files, check every segment, repair what is safe.

The rules (also in the storage specification):

1. Leftover ``*.tmp`` files of interrupted atomic writes are deleted. Files that are not
   ours are left alone with a warning. Index files whose segment is gone are deleted.
2. Segments must continue each other: each base seqno is the previous segment's next seqno.
3. The active (last) segment: an unfinished header (crash while creating it) is rewritten;
   a torn or zeroed tail — a bad batch after which no valid batch follows — is truncated
   with a ``segment.truncated`` warning naming the file and offset. The bytes cut off are
   kept first, in ``<segment file>.<offset>.broken`` beside it (as etcd's WAL repair keeps
   what it cuts): an operator can still look at them; nothing reads them again.
4. Anything else — a bad header, a gap, a bad batch in a sealed segment, or a bad batch in
   the active segment followed by valid ones — raises :class:`CorruptLogError`. With
   ``repair=True`` (the operator's explicit choice) the log is truncated there instead:
   the damaged segment is cut at the damage (the cut bytes kept in a ``.broken`` file) and
   every later segment is deleted.
5. Sealed segments' indexes are compared with the log (or, with ``verify_sealed=False``,
   checked for consistency and against the segment's tail) and rebuilt when they differ.
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass

from boomscooter.errors import CorruptLogError, LogLockedError
from boomscooter.storage.api import LogConfig, RecoveryAction, RecoveryKind
from boomscooter.storage.index import IndexFiles, IndexMismatch, SegmentIndex, load_index
from boomscooter.storage.segment import (
    BROKEN_SUFFIX,
    INDEX_SUFFIX,
    LOCK_FILE,
    LOG_SUFFIX,
    SEGMENT_HEADER_BYTES,
    TIME_INDEX_SUFFIX,
    TMP_SUFFIX,
    check_segment_header,
    copy_range,
    encode_segment_header,
    fd_reader,
    file_name,
    fsync_dir,
    is_unfinished_header,
    parse_file_name,
    pread_all,
    pwrite_all,
    scan_segment,
)
from bootcast.logs import get_logger

log = get_logger("boomscooter.storage")


@dataclass(slots=True, kw_only=True)
class SegmentState:
    """A checked segment: its file, and its index (the facts recovery established)."""

    base_seqno: int
    path: str
    index: SegmentIndex


NODE_FILE_PREFIXES = (".", "producers.journal", "node.json")


def lock_directory(directory: str) -> int:
    """Take the writer's ``flock`` on ``boomscooter.lock``; returns its descriptor."""
    fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise LogLockedError(f"{directory} is locked by another process") from None
        raise
    return fd


def create_segment(directory: str, base_seqno: int, *, sync: bool) -> int:
    """Create ``<base>.log`` atomically (header to a temp file, fsync, rename, fsync the
    directory) and return a read-write descriptor on it."""
    final = os.path.join(directory, file_name(base_seqno))
    temp = final + TMP_SUFFIX
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pwrite_all(fd, encode_segment_header(base_seqno), 0)
        if sync:
            os.fdatasync(fd)
        os.rename(temp, final)
        if sync:
            fsync_dir(directory)
    except BaseException:
        os.close(fd)
        raise
    return fd


def rewrite_segment(
    directory: str, base_seqno: int, fd: int, keep_bytes: int, tail: bytes | memoryview
) -> int:
    """Replace ``<base>.log`` (open as ``fd``) by its first ``keep_bytes`` followed by
    ``tail``, atomically: the new content goes to ``<base>.log.tmp``, is fdatasynced and
    renamed over the segment; the caller fsyncs the directory. A crash leaves the old file
    or the new one, never a mix (a leftover temp file is deleted on open). Returns a
    read-write descriptor on the new file."""
    final = os.path.join(directory, file_name(base_seqno))
    temp = final + TMP_SUFFIX
    out = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        copy_range(fd, out, keep_bytes)
        pwrite_all(out, tail, keep_bytes)
        os.fdatasync(out)  # under every policy: the file it replaces may have been durable
        os.rename(temp, final)
    except BaseException:
        os.close(out)
        raise
    return out


def keep_broken(directory: str, path: str, fd: int, offset: int) -> str | None:
    """Copy the bytes of ``path`` (open as ``fd``) from ``offset`` to its end into
    ``<path>.<offset>.broken`` (temp file, fsync, rename, directory fsync) before they are
    cut off; returns that file's path (None when there is nothing to keep)."""
    size = os.fstat(fd).st_size
    if size <= offset:
        return None
    final = f"{path}.{offset}{BROKEN_SUFFIX}"
    temp = final + TMP_SUFFIX
    out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pwrite_all(out, pread_all(fd, size - offset, offset), 0)
        os.fsync(out)
    finally:
        os.close(out)
    os.rename(temp, final)
    fsync_dir(directory)
    log.warning("segment.broken_kept", path=final, offset=offset, bytes=size - offset)
    return final


def index_paths(directory: str, base_seqno: int) -> tuple[str, str]:
    return (
        os.path.join(directory, file_name(base_seqno, INDEX_SUFFIX)),
        os.path.join(directory, file_name(base_seqno, TIME_INDEX_SUFFIX)),
    )


def write_index_files(directory: str, base_seqno: int, index: SegmentIndex) -> None:
    """Save a sealed segment's index (temp file and rename; not fsynced: it is derived, and
    a damaged one is rebuilt on open)."""
    files = index.encode()
    for path, data in zip(
        index_paths(directory, base_seqno), (files.offsets, files.times), strict=True
    ):
        with open(path + TMP_SUFFIX, "wb") as f:
            f.write(data)
        os.rename(path + TMP_SUFFIX, path)


def remove_index_files(directory: str, base_seqno: int) -> bool:
    removed = False
    for path in index_paths(directory, base_seqno):
        try:
            os.unlink(path)
            removed = True
        except FileNotFoundError:
            pass
    return removed


def read_index_files(directory: str, base_seqno: int) -> IndexFiles | None:
    offsets_path, times_path = index_paths(directory, base_seqno)
    try:
        with open(offsets_path, "rb") as f:
            offsets = f.read()
        with open(times_path, "rb") as f:
            times = f.read()
    except FileNotFoundError:
        return None
    return IndexFiles(offsets=offsets, times=times)


class Recovery:
    """One open of a data directory. ``run()`` returns the checked segments in order."""

    def __init__(self, directory: str, config: LogConfig, *, repair: bool) -> None:
        self.directory = directory
        self.config = config
        self.repair = repair
        self.actions: list[RecoveryAction] = []

    def _act(
        self, kind: RecoveryKind, path: str, offset: int | None = None, reason: str = ""
    ) -> None:
        self.actions.append(RecoveryAction(kind=kind, path=path, offset=offset, reason=reason))

    def run(self) -> list[SegmentState]:
        bases = self._classify()
        segments: list[SegmentState] = []
        for i, base in enumerate(bases):
            last = i == len(bases) - 1
            path = os.path.join(self.directory, file_name(base))
            expected = segments[-1].index.next_seqno if segments else base
            if base != expected:
                reason = f"segment starts at seqno {base}, the previous one ends at {expected - 1}"
                self._corrupt(path, 0, reason)
                self._drop_from(bases[i:], path, 0, reason)
                break
            state = self._check_segment(path, base, last=last)
            if state is None:  # repaired away: this segment and all later ones are gone
                self._drop_from(bases[i:], path, 0, "damaged segment header")
                break
            segments.append(state)
            if state.index.end < os.path.getsize(path):  # repaired inside: later ones go
                self._drop_from(bases[i + 1 :], path, state.index.end, "truncated by repair")
                self._truncate(path, state.index.end)
                break
        if not segments:
            base = bases[0] if bases else 1
            os.close(create_segment(self.directory, base, sync=True))
            path = os.path.join(self.directory, file_name(base))
            index = SegmentIndex(
                base_seqno=base,
                start=SEGMENT_HEADER_BYTES,
                interval_bytes=self.config.index_interval_bytes,
            )
            segments.append(SegmentState(base_seqno=base, path=path, index=index))
        for state in segments[:-1]:
            self._check_saved_index(state)
        active = segments[-1]
        if remove_index_files(self.directory, active.base_seqno):
            self._act(RecoveryKind.INDEX_REMOVED, active.path, reason="active segment")
        for state in segments:
            fd = os.open(state.path, os.O_RDONLY)
            try:
                os.fdatasync(fd)  # bytes that survived a process crash may be in cache only
            finally:
                os.close(fd)
        return segments

    def _classify(self) -> list[int]:
        bases: list[int] = []
        indexes: list[tuple[int, str]] = []
        for name in sorted(os.listdir(self.directory)):
            if name == LOCK_FILE or name.startswith(NODE_FILE_PREFIXES):
                continue  # the node's own files (journal, node state, catch-up temp files)
            if name.endswith(BROKEN_SUFFIX):
                continue  # bytes an earlier recovery cut off, kept for the operator
            path = os.path.join(self.directory, name)
            parsed = parse_file_name(name)
            if parsed is None or not os.path.isfile(path):
                self._act(RecoveryKind.STRAY_IGNORED, path, reason="not a log file")
                log.warning("log.stray_file", path=path)
            elif parsed.temporary:
                os.unlink(path)
                self._act(RecoveryKind.TEMP_REMOVED, path, reason="interrupted write")
                log.info("log.temp_removed", path=path)
            elif parsed.suffix == LOG_SUFFIX:
                bases.append(parsed.base_seqno)
            else:
                indexes.append((parsed.base_seqno, path))
        known = set(bases)
        for base, path in indexes:
            if base not in known:
                os.unlink(path)
                self._act(RecoveryKind.INDEX_REMOVED, path, reason="no such segment")
                log.info("index.removed", path=path, reason="no such segment")
        return sorted(bases)

    def _check_segment(self, path: str, base: int, *, last: bool) -> SegmentState | None:
        index = SegmentIndex(
            base_seqno=base,
            start=SEGMENT_HEADER_BYTES,
            interval_bytes=self.config.index_interval_bytes,
        )
        state = SegmentState(base_seqno=base, path=path, index=index)
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            head = pread_all(fd, SEGMENT_HEADER_BYTES, 0)
            problem = check_segment_header(head, base)
            if problem is not None:
                if last and size <= SEGMENT_HEADER_BYTES and is_unfinished_header(head, base):
                    self._rewrite_header(path, base, problem)
                    return state
                self._corrupt(path, 0, problem)
                return None
            if not last and not self.config.verify_sealed:
                saved = self._load_saved_index(fd, path, base, size)
                if saved is not None:
                    state.index = saved
                    return state
            damage = scan_segment(fd_reader(fd), size=size, index=index, verify=True)
        finally:
            os.close(fd)
        if damage is not None:
            if last and damage.torn:
                self._truncate(path, damage.offset)
                lost = size - damage.offset
                self._act(RecoveryKind.TRUNCATED, path, damage.offset, damage.reason)
                log.warning(
                    "segment.truncated",
                    path=path,
                    offset=damage.offset,
                    lost_bytes=lost,
                    reason=f"torn tail: {damage.reason}",
                )
                return state
            where = "in a sealed segment" if not last else "and valid batches follow it"
            self._corrupt(path, damage.offset, f"{damage.reason} ({where})")
            self._act(RecoveryKind.REPAIRED, path, damage.offset, damage.reason)
            return state  # index.end < size: run() truncates and drops later segments
        if not last and index.batch_count == 0:
            self._corrupt(path, SEGMENT_HEADER_BYTES, "sealed segment holds no batch")
            self._act(RecoveryKind.REPAIRED, path, SEGMENT_HEADER_BYTES, "empty sealed segment")
            return None
        return state

    def _load_saved_index(self, fd: int, path: str, base: int, size: int) -> SegmentIndex | None:
        """The fast path: trust a consistent saved index after walking the segment's tail
        from its last entry (headers only) to the end of the file."""
        files = read_index_files(self.directory, base)
        if files is None:
            return None
        try:
            index = load_index(
                files,
                base_seqno=base,
                segment_bytes=size,
                interval_bytes=self.config.index_interval_bytes,
                start=SEGMENT_HEADER_BYTES,
            )
        except IndexMismatch:
            return None
        tail = SegmentIndex(base_seqno=base, start=index.positions[-1], interval_bytes=1 << 62)
        tail.next_seqno = index.seqnos[-1]
        damage = scan_segment(fd_reader(fd), size=size, index=tail, verify=False)
        if damage is not None or tail.next_seqno != index.next_seqno:
            return None
        return index

    def _check_saved_index(self, state: SegmentState) -> None:
        files = read_index_files(self.directory, state.base_seqno)
        if files is not None and state.index.matches(files):
            return
        if files is None:
            reason = "missing"
        else:
            try:
                load_index(
                    files,
                    base_seqno=state.base_seqno,
                    segment_bytes=state.index.end,
                    interval_bytes=self.config.index_interval_bytes,
                    start=SEGMENT_HEADER_BYTES,
                )
                reason = "stale: does not match the log"
            except IndexMismatch as exc:
                reason = str(exc)
        write_index_files(self.directory, state.base_seqno, state.index)
        self._act(RecoveryKind.INDEX_REBUILT, state.path, reason=reason)
        log.warning("index.rebuilt", path=state.path, reason=reason)

    def _rewrite_header(self, path: str, base: int, problem: str) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            os.ftruncate(fd, 0)
            pwrite_all(fd, encode_segment_header(base), 0)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        self._act(RecoveryKind.HEADER_REWRITTEN, path, 0, problem)
        log.warning("segment.header_rewritten", path=path, reason=problem)

    def _truncate(self, path: str, offset: int) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            keep_broken(self.directory, path, fd, offset)
            os.ftruncate(fd, offset)
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def _corrupt(self, path: str, offset: int, reason: str) -> None:
        """Refuse, unless the operator asked for repair (then the caller truncates)."""
        if not self.repair:
            raise CorruptLogError(
                f"{path}: corrupt at offset {offset}: {reason}; refusing to open. "
                "Opening with repair=True truncates the log at this point and drops "
                "everything after it.",
                path=path,
                offset=offset,
            )
        log.warning("log.repaired", path=path, offset=offset, reason=reason)

    def _drop_from(self, bases: list[int], path: str, offset: int, reason: str) -> None:
        """Delete the segments ``bases`` (a repair dropping the log after ``path``)."""
        for base in bases:
            victim = os.path.join(self.directory, file_name(base))
            if victim == path and offset > 0:
                continue
            remove_index_files(self.directory, base)
            os.unlink(victim)
            self._act(RecoveryKind.SEGMENT_DELETED, victim, reason=reason)
            log.warning("segment.deleted", path=victim, reason=reason)
        fsync_dir(self.directory)
