"""Segment files: naming, the segment header, and walking the batches inside one.

A segment file is a 32-byte header followed by batches back to back (layout in the storage
specification, :mod:`boomscooter.storage`). This module knows how to name and recognise
the files of a data directory, how to write and check a header, and how to walk batches
through a ``read_at(position, size) -> bytes`` callable, which lets the writer
(:mod:`~boomscooter.storage.log`) and the read-only follower
(:mod:`~boomscooter.storage.reader`) share one implementation of "what is a valid batch
here", and lets tests feed it plain bytes.

Damage classification (the recovery rule): a batch that fails its checks at ``offset`` is
a *torn tail* when no valid batch continuing the log can be found anywhere after it (the
usual case: the last write was cut short, or its sectors never reached the disk and read
back as zeros); otherwise it is *mid-file corruption*. Only the log decides what to do with
either: it truncates a torn tail of the active segment and refuses everything else.
"""

from __future__ import annotations

import errno
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from boomscooter.errors import BatchDecodeError, CorruptLogError
from boomscooter.storage.batch import (
    BATCH_MAGIC,
    BATCH_VERSION,
    HEADER_BYTES,
    Batch,
    BatchHeader,
    batch_crc,
    crc32c,
    decode_header,
)
from boomscooter.storage.index import SegmentIndex

SEGMENT_MAGIC = b"BOOMSEG\n"
SEGMENT_VERSION = 1
SEGMENT_HEADER = struct.Struct("<8sHHIQQ")  # magic, version, reserved, crc, base, reserved
SEGMENT_HEADER_BYTES = SEGMENT_HEADER.size  # 32
LOG_SUFFIX = ".log"
INDEX_SUFFIX = ".index"
TIME_INDEX_SUFFIX = ".timeindex"
TMP_SUFFIX = ".tmp"
BROKEN_SUFFIX = ".broken"  # bytes recovery cut off a segment, kept for the operator
LOCK_FILE = "boomscooter.lock"
_NAME = re.compile(r"^(\d{20})(\.log|\.index|\.timeindex)(\.tmp)?$")
_MAGIC_PAIR = bytes((BATCH_MAGIC, BATCH_VERSION))
READ_CHUNK_BYTES = 1 << 20

ReadAt = Callable[[int, int], bytes]


def file_name(base_seqno: int, suffix: str = LOG_SUFFIX) -> str:
    """``00000000000000000001.log``: the base seqno, zero-padded to 20 digits (u64)."""
    return f"{base_seqno:020d}{suffix}"


@dataclass(frozen=True, slots=True, kw_only=True)
class FileName:
    base_seqno: int
    suffix: str
    temporary: bool


def parse_file_name(name: str) -> FileName | None:
    """What a directory entry is to the log, or None for a file that is not ours."""
    match = _NAME.match(name)
    if match is None:
        return None
    return FileName(
        base_seqno=int(match.group(1)), suffix=match.group(2), temporary=bool(match.group(3))
    )


def encode_segment_header(base_seqno: int) -> bytes:
    head = SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, 0, 0, base_seqno, 0)
    crc = crc32c(head[16:], crc32c(head[:12]))
    return SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, 0, crc, base_seqno, 0)


def check_segment_header(data: bytes, base_seqno: int) -> str | None:
    """None when ``data`` starts with a good header for ``base_seqno``, else the reason."""
    if len(data) < SEGMENT_HEADER_BYTES:
        return f"short segment header ({len(data)} bytes)"
    magic, version, reserved, crc, base, reserved2 = SEGMENT_HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC:
        return "not a boomscooter segment (bad magic)"
    if version != SEGMENT_VERSION:
        return f"unsupported segment version {version}"
    if crc != crc32c(data[16:SEGMENT_HEADER_BYTES], crc32c(data[:12])) or reserved or reserved2:
        return "segment header CRC32C mismatch"
    if base != base_seqno:
        return f"segment header says base seqno {base}, file name says {base_seqno}"
    return None


def is_unfinished_header(data: bytes, base_seqno: int) -> bool:
    """A header whose creation was cut short: empty, zeros, or a prefix of the real one."""
    if len(data) > SEGMENT_HEADER_BYTES:
        return False
    return data.count(0) == len(data) or encode_segment_header(base_seqno).startswith(data)


@dataclass(frozen=True, slots=True, kw_only=True)
class Damage:
    """The first bad batch of a segment: where, why, and whether it looks like a torn tail."""

    offset: int
    reason: str
    torn: bool


def scan_segment(read_at: ReadAt, *, size: int, index: SegmentIndex, verify: bool) -> Damage | None:
    """Walk batches from ``index.end`` to ``size``, adding each good one to ``index``.

    With ``verify`` every batch's CRC32C is checked, otherwise only headers and seqno
    continuity. Returns the first damage, or None when the walk ends exactly at ``size``.
    """
    pos = index.end
    expected = index.next_seqno
    buf = b""
    buf_pos = pos
    while pos < size:
        off = pos - buf_pos
        if off + HEADER_BYTES > len(buf):
            buf, buf_pos, off = read_at(pos, min(READ_CHUNK_BYTES, size - pos)), pos, 0
            if len(buf) < HEADER_BYTES:
                return _damage(read_at, pos, size, expected, "partial batch header")
        try:
            header = decode_header(buf, off)
        except BatchDecodeError as exc:
            return _damage(read_at, pos, size, expected, str(exc))
        if header.base_seqno != expected:
            reason = f"batch base seqno {header.base_seqno}, expected {expected}"
            return _damage(read_at, pos, size, expected, reason)
        if pos + header.length > size:
            reason = f"batch of {header.length} bytes runs past the end of the file"
            return _damage(read_at, pos, size, expected, reason)
        if off + header.length > len(buf):
            want = min(max(READ_CHUNK_BYTES, header.length), size - pos)
            buf, buf_pos, off = read_at(pos, want), pos, 0
        if verify and batch_crc(buf, off, header.length) != header.crc:
            return _damage(read_at, pos, size, expected, "batch CRC32C mismatch")
        index.add(pos, header)
        expected = header.next_seqno
        pos += header.length
    return None


def _damage(read_at: ReadAt, offset: int, size: int, expected: int, reason: str) -> Damage:
    return Damage(
        offset=offset, reason=reason, torn=not _valid_batch_after(read_at, offset, size, expected)
    )


def _valid_batch_after(read_at: ReadAt, damaged: int, size: int, min_seqno: int) -> bool:
    """Whether any valid batch with base seqno ≥ ``min_seqno`` starts after ``damaged``:
    candidates are found by their magic and version bytes, then checked in full."""
    pos = damaged + 1
    while pos + HEADER_BYTES <= size:
        chunk = read_at(pos, min(READ_CHUNK_BYTES + HEADER_BYTES, size - pos))
        i = chunk.find(_MAGIC_PAIR, 8)
        while i != -1 and i - 8 < READ_CHUNK_BYTES:
            if _valid_batch_at(read_at, pos + i - 8, size, min_seqno):
                return True
            i = chunk.find(_MAGIC_PAIR, i + 1)
        pos += READ_CHUNK_BYTES
    return False


def _valid_batch_at(read_at: ReadAt, pos: int, size: int, min_seqno: int) -> bool:
    try:
        header = decode_header(read_at(pos, HEADER_BYTES))
    except BatchDecodeError:
        return False
    if header.base_seqno < min_seqno or pos + header.length > size:
        return False
    data = read_at(pos, header.length)
    return len(data) == header.length and batch_crc(data, 0, header.length) == header.crc


def read_batches(
    read_at: ReadAt,
    *,
    path: str,
    position: int,
    end: int,
    from_seqno: int,
    to_seqno: int | None,
    max_bytes: int,
    taken_bytes: int = 0,
    partial_ok: bool = False,
) -> tuple[list[Batch], int]:
    """Complete batches from the batch start ``position`` up to ``end``, their data as
    zero-copy views of the read buffer.

    Batches ending before ``from_seqno`` are skipped; the walk stops at ``end``, at a batch
    starting after ``to_seqno``, or before a batch that would take the total over
    ``max_bytes`` counting ``taken_bytes`` already read elsewhere (the very first batch is
    always taken, so progress is guaranteed). Every
    returned batch's CRC32C is checked. Returns the batches and the position after the last
    batch returned or skipped. Damage raises :class:`CorruptLogError`, except that with
    ``partial_ok`` a batch running past ``end`` just ends the walk (a follower reading a
    file that is still being written).
    """
    batches: list[Batch] = []
    total = taken_bytes
    buf = b""
    view = memoryview(buf)
    buf_pos = position
    pos = position
    chunk = max(max_bytes + HEADER_BYTES, 256 << 10)
    while pos < end:
        off = pos - buf_pos
        if off + HEADER_BYTES > len(buf):
            buf, buf_pos, off = read_at(pos, min(chunk, end - pos)), pos, 0
            view = memoryview(buf)
            if len(buf) < HEADER_BYTES:
                if partial_ok:
                    break
                raise CorruptLogError(
                    f"{path}: partial batch header at offset {pos}", path=path, offset=pos
                )
        header = _header_at(buf, off, path, pos)
        if header.next_seqno <= from_seqno:
            pos += header.length
            continue
        if to_seqno is not None and header.base_seqno > to_seqno:
            break
        if total and total + header.length > max_bytes:
            break
        if pos + header.length > end:
            if partial_ok:
                break
            raise CorruptLogError(
                f"{path}: batch at offset {pos} runs past the end", path=path, offset=pos
            )
        length = header.length
        if off + length > len(buf):
            want = min(max(chunk, length), end - pos)
            buf, buf_pos, off = read_at(pos, want), pos, 0
            view = memoryview(buf)
            if len(buf) < length:
                raise CorruptLogError(
                    f"{path}: batch at offset {pos} runs past the end", path=path, offset=pos
                )
        batches.append(_checked(header, view[off : off + length], path, pos))
        total += length
        pos += length
    return batches, pos


def _header_at(buf: bytes, off: int, path: str, pos: int) -> BatchHeader:
    try:
        return decode_header(buf, off)
    except BatchDecodeError as exc:
        raise CorruptLogError(f"{path}: offset {pos}: {exc}", path=path, offset=pos) from None


def _checked(header: BatchHeader, data: memoryview, path: str, pos: int) -> Batch:
    """The batch, once its CRC32C (over all but the CRC field itself) matched."""
    if crc32c(data[8:], crc32c(data[:4])) != header.crc:
        raise CorruptLogError(f"{path}: offset {pos}: batch CRC32C mismatch", path=path, offset=pos)
    return Batch(header, data)


def seqno_at_time(
    read_at: ReadAt, *, path: str, index: SegmentIndex, timestamp_ms: int
) -> int | None:
    """The first seqno in a segment whose record timestamp is at or after ``timestamp_ms``
    (the walk starts where the time index says no earlier record reaches it)."""
    position = index.find_time(timestamp_ms)
    while position < index.end:
        batches, position = read_batches(
            read_at,
            path=path,
            position=position,
            end=index.end,
            from_seqno=0,
            to_seqno=None,
            max_bytes=READ_CHUNK_BYTES,
        )
        for batch in batches:
            if batch.header.max_timestamp_ms >= timestamp_ms:
                for record in batch.records():
                    if record.timestamp_ms >= timestamp_ms:
                        return record.seqno
    return None


def segment_file_batches(
    path: str, base_seqno: int, *, max_bytes: int = 4 << 20
) -> Iterator[list[Batch]]:
    """The batches of a whole segment file (a copy of another node's sealed segment), in
    chunks of about ``max_bytes``: its header must be a segment header for ``base_seqno``,
    and every batch is CRC-checked (damage raises :class:`CorruptLogError`)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        problem = check_segment_header(pread_all(fd, SEGMENT_HEADER_BYTES, 0), base_seqno)
        if problem is not None:
            raise CorruptLogError(f"{path}: {problem}", path=path, offset=0)
        position = SEGMENT_HEADER_BYTES
        while position < size:
            batches, position = read_batches(
                fd_reader(fd),
                path=path,
                position=position,
                end=size,
                from_seqno=base_seqno,
                to_seqno=None,
                max_bytes=max_bytes,
            )
            if not batches:
                return
            yield batches
    finally:
        os.close(fd)


def pread_all(fd: int, size: int, position: int) -> bytes:
    """``os.pread`` until ``size`` bytes or end of file (short reads are legal)."""
    data = os.pread(fd, size, position)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, position + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def fd_reader(fd: int) -> ReadAt:
    """A ``read_at`` over a file descriptor."""

    def read_at(position: int, size: int) -> bytes:
        return pread_all(fd, size, position)

    return read_at


def pwrite_all(fd: int, data: bytes | memoryview, position: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, position)
        view = view[written:]
        position += written


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durable(path: str) -> None:
    """``os.makedirs`` whose result survives a power loss: each directory created is made
    durable by fsyncing its parent (top down), so the new data directory is not lost."""
    missing: list[str] = []
    here = os.path.abspath(path)
    while not os.path.isdir(here):
        missing.append(here)
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    if not missing:
        return
    os.makedirs(path, exist_ok=True)
    for created in reversed(missing):
        fsync_dir(os.path.dirname(created))


def copy_range(src: int, dst: int, size: int) -> None:
    """Copy bytes [0, ``size``) of ``src`` to the same place in ``dst`` (in the kernel with
    ``copy_file_range`` where the filesystem allows it, else by ``pread``/``pwrite``)."""
    position = 0
    try:
        while position < size:
            copied = os.copy_file_range(src, dst, size - position, position, position)
            if copied == 0:
                break
            position += copied
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while position < size:
        data = pread_all(src, min(READ_CHUNK_BYTES, size - position), position)
        if not data:
            break
        pwrite_all(dst, data, position)
        position += len(data)
    if position != size:
        raise OSError(errno.EIO, f"copy stopped at {position} of {size} bytes (short source)")
