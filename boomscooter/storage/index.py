"""A segment's sparse offset and time index (sans-I/O): built in memory, saved when sealed.

The index is *derived*: everything in it can be recomputed by walking the segment's batch
headers, so it is never trusted over the log. While a segment is active its index lives
only in memory (one entry per ``interval_bytes`` of log, at batch starts); when the segment
is sealed both index files are written once (temp file, rename). On open each saved index
is compared with what the log says and rebuilt when it is missing, damaged or stale.

Offset lookup: the last entry whose seqno is at or below the target gives the position to
start walking batch headers from. Time lookup: each time entry stores the largest record
timestamp of everything *before* its position, a non-decreasing key even when timestamps
are not; the last entry whose key is below ``t`` is a position before which no record
reaches ``t``, so the walk for "first record at or after ``t``" starts there.

File layout (little-endian) is in the storage specification: a 56-byte header carrying the
segment's base and next seqno, the log file size it describes, the segment's largest
timestamp, the entry count and a CRC32C over header and entries; then the entries.
"""

from __future__ import annotations

import struct
from array import array
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import NamedTuple

from boomscooter.storage.batch import BatchHeader, crc32c

INDEX_MAGIC = b"BOOMIDX\n"
TIME_INDEX_MAGIC = b"BOOMTIX\n"
INDEX_VERSION = 1
INDEX_HEADER = struct.Struct("<8sHHIQQQQII")
INDEX_HEADER_BYTES = INDEX_HEADER.size  # 56
OFFSET_ENTRY = struct.Struct("<II")  # relative seqno, position
TIME_ENTRY = struct.Struct("<QII")  # max timestamp before position, relative seqno, position


class IndexHeader(NamedTuple):
    magic: bytes
    version: int
    reserved: int
    interval_bytes: int
    base_seqno: int
    next_seqno: int
    segment_bytes: int
    max_timestamp_ms: int
    entry_count: int
    crc: int


class IndexMismatch(Exception):
    """A saved index file does not describe the segment (internal: it gets rebuilt)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexFiles:
    """The bytes of the two index files of one sealed segment."""

    offsets: bytes
    times: bytes


class SegmentIndex:
    """Sparse index plus the facts about a segment that recovery and retention need:
    end position, next seqno, largest timestamp, batch count."""

    __slots__ = (
        "_last_entry_position",
        "base_seqno",
        "batch_count",
        "end",
        "interval_bytes",
        "max_timestamp_ms",
        "next_seqno",
        "positions",
        "seqnos",
        "times",
    )

    def __init__(self, *, base_seqno: int, start: int, interval_bytes: int) -> None:
        self.base_seqno = base_seqno
        self.interval_bytes = interval_bytes
        self.seqnos = array("Q")
        self.positions = array("Q")
        self.times = array("Q")
        self.end = start
        self.next_seqno = base_seqno
        self.max_timestamp_ms = 0
        self.batch_count = 0
        self._last_entry_position = -interval_bytes

    def add(self, position: int, header: BatchHeader) -> None:
        """Account for the batch ``header`` stored at ``position`` (batches in log order)."""
        if position - self._last_entry_position >= self.interval_bytes:
            self.seqnos.append(header.base_seqno)
            self.positions.append(position)
            self.times.append(self.max_timestamp_ms)
            self._last_entry_position = position
        self.batch_count += 1
        if header.max_timestamp_ms > self.max_timestamp_ms:
            self.max_timestamp_ms = header.max_timestamp_ms
        self.end = position + header.length
        self.next_seqno = header.base_seqno + header.record_count

    def find_seqno(self, seqno: int) -> int:
        """A batch-start position at or before the batch holding ``seqno``."""
        i = bisect_right(self.seqnos, seqno) - 1
        return self.positions[i] if i >= 0 else self.end

    def find_time(self, timestamp_ms: int) -> int:
        """A batch-start position before which no record has a timestamp ≥ ``timestamp_ms``."""
        i = bisect_left(self.times, timestamp_ms) - 1
        return self.positions[max(i, 0)] if self.positions else self.end

    def encode(self) -> IndexFiles:
        count = len(self.seqnos)
        base = self.base_seqno
        rel = [s - base for s in self.seqnos]
        offsets = b"".join(
            OFFSET_ENTRY.pack(r, p) for r, p in zip(rel, self.positions, strict=True)
        )
        times = b"".join(
            TIME_ENTRY.pack(t, r, p)
            for t, r, p in zip(self.times, rel, self.positions, strict=True)
        )
        return IndexFiles(
            offsets=self._with_header(INDEX_MAGIC, count, offsets),
            times=self._with_header(TIME_INDEX_MAGIC, count, times),
        )

    def _with_header(self, magic: bytes, count: int, entries: bytes) -> bytes:
        head = INDEX_HEADER.pack(
            magic,
            INDEX_VERSION,
            0,
            self.interval_bytes,
            self.base_seqno,
            self.next_seqno,
            self.end,
            self.max_timestamp_ms,
            count,
            0,
        )[:-4]
        return b"".join((head, struct.pack("<I", crc32c(entries, crc32c(head))), entries))

    def matches(self, files: IndexFiles) -> bool:
        """Whether saved index files are exactly what this (freshly scanned) index saves."""
        return self.encode() == files


def load_index(
    files: IndexFiles,
    *,
    base_seqno: int,
    segment_bytes: int,
    interval_bytes: int | None,
    start: int,
) -> SegmentIndex:
    """Rebuild a :class:`SegmentIndex` from saved files, checking them against the segment
    they claim to describe (base seqno, file size, interval unless None) and against each
    other."""
    offset_head = _check_file(files.offsets, INDEX_MAGIC, OFFSET_ENTRY.size)
    time_head = _check_file(files.times, TIME_INDEX_MAGIC, TIME_ENTRY.size)
    if offset_head[3:9] != time_head[3:9]:
        raise IndexMismatch("offset and time index disagree")
    interval, base = offset_head.interval_bytes, offset_head.base_seqno
    next_seqno, end = offset_head.next_seqno, offset_head.segment_bytes
    max_ts = offset_head.max_timestamp_ms
    if interval_bytes is None:
        interval_bytes = interval
    if base != base_seqno or end != segment_bytes or interval != interval_bytes:
        raise IndexMismatch(
            f"index describes base {base}, {end} bytes, interval {interval}; segment has "
            f"base {base_seqno}, {segment_bytes} bytes, interval {interval_bytes}"
        )
    if offset_head.entry_count == 0 or next_seqno <= base:
        raise IndexMismatch("index of an empty segment")
    index = SegmentIndex(base_seqno=base, start=start, interval_bytes=interval)
    offsets = OFFSET_ENTRY.iter_unpack(memoryview(files.offsets)[INDEX_HEADER_BYTES:])
    times = TIME_ENTRY.iter_unpack(memoryview(files.times)[INDEX_HEADER_BYTES:])
    prev_seqno, prev_pos, prev_time = -1, -1, -1
    for (rel, pos), (t, trel, tpos) in zip(offsets, times, strict=True):
        seqno = base + rel
        if (rel, pos) != (trel, tpos) or seqno <= prev_seqno or pos <= prev_pos or t < prev_time:
            raise IndexMismatch("index entries out of order")
        if seqno >= next_seqno or pos >= end or t > max_ts:
            raise IndexMismatch("index entry beyond the segment")
        index.seqnos.append(seqno)
        index.positions.append(pos)
        index.times.append(t)
        prev_seqno, prev_pos, prev_time = seqno, pos, t
    if index.seqnos[0] != base or index.positions[0] != start:
        raise IndexMismatch("first index entry is not the first batch")
    index.end = end
    index.next_seqno = next_seqno
    index.max_timestamp_ms = max_ts
    index._last_entry_position = prev_pos
    # Not saved: the batch count (only known to be non-zero).
    index.batch_count = 1
    return index


def _check_file(data: bytes, magic: bytes, entry_bytes: int) -> IndexHeader:
    if len(data) < INDEX_HEADER_BYTES:
        raise IndexMismatch("short index file")
    head = IndexHeader._make(INDEX_HEADER.unpack_from(data))
    if head.magic != magic or head.version != INDEX_VERSION or head.reserved != 0:
        raise IndexMismatch("bad index magic or version")
    if len(data) != INDEX_HEADER_BYTES + head.entry_count * entry_bytes:
        raise IndexMismatch("index file size does not match its entry count")
    view = memoryview(data)
    if crc32c(view[INDEX_HEADER_BYTES:], crc32c(view[: INDEX_HEADER_BYTES - 4])) != head.crc:
        raise IndexMismatch("index CRC32C mismatch")
    return head
