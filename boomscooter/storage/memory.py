"""MemoryLog: the in-memory :class:`~boomscooter.storage.api.Log`, for simulations and tests.

It keeps the same encoded batches a :class:`~boomscooter.storage.log.SegmentedLog` would
write, grouped into the same segments by the same roll rule, and measures them the same
way, so retention deletes the same segments and every read returns equal batches: the
contract tests hold both to one behaviour. Nothing is ever lost, so ``durable_seqno`` is
always ``last_seqno``.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from boomscooter.errors import BatchEncodeError, LogClosedError, SeqnoOutOfRangeError
from boomscooter.storage import api
from boomscooter.storage.api import DEFAULT_READ_BYTES, LogConfig, check_continues, should_roll
from boomscooter.storage.batch import Batch, Entry, Record, encode_batch
from boomscooter.storage.segment import SEGMENT_HEADER_BYTES, segment_file_batches


@dataclass(slots=True)
class _Segment:
    base_seqno: int
    batches: list[Batch] = field(default_factory=list)
    bases: list[int] = field(default_factory=list)
    size: int = SEGMENT_HEADER_BYTES
    max_timestamp_ms: int = 0
    since_ms: int | None = None  # wall clock at the first append (the age rule)

    def add(self, batch: Batch) -> None:
        self.batches.append(batch)
        self.bases.append(batch.base_seqno)
        self.size += batch.header.length
        self.max_timestamp_ms = max(self.max_timestamp_ms, batch.header.max_timestamp_ms)

    @property
    def next_seqno(self) -> int:
        return self.batches[-1].next_seqno if self.batches else self.base_seqno


class MemoryLog:
    """A log held in memory, segment by segment."""

    def __init__(
        self,
        config: LogConfig | None = None,
        *,
        clock_ms: Callable[[], int] | None = None,
        first_seqno: int = 1,
    ) -> None:
        self.config = config or LogConfig()
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._segments = [_Segment(first_seqno)]
        self._closed = False

    @property
    def first_seqno(self) -> int:
        return self._segments[0].base_seqno

    @property
    def last_seqno(self) -> int:
        return self._segments[-1].next_seqno - 1

    @property
    def next_seqno(self) -> int:
        return self._segments[-1].next_seqno

    @property
    def durable_seqno(self) -> int:
        return self.last_seqno

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    @property
    def last_epoch(self) -> int:
        for segment in reversed(self._segments):
            if segment.batches:
                return segment.batches[-1].epoch
        return 0

    def rebase(self, first_seqno: int) -> None:
        self._check_open()
        if first_seqno < 1:
            raise SeqnoOutOfRangeError(f"a log cannot start at seqno {first_seqno}")
        self._segments = [_Segment(first_seqno)]

    def import_segment(self, path: str, base_seqno: int) -> int:
        self._check_open()
        records = 0
        for batches in segment_file_batches(path, base_seqno):
            for batch in batches:
                if batch.base_seqno < self.next_seqno:
                    continue
                if batch.base_seqno > self.next_seqno:
                    return records
                self.append_batch(bytes(batch.data))  # a copy: these are views of a buffer
                records += batch.record_count
        return records

    def _check_open(self) -> None:
        if self._closed:
            raise LogClosedError("memory log is closed")

    def append(self, entries: Sequence[Entry], *, epoch: int) -> Batch:
        self._check_open()
        batch = encode_batch(entries, base_seqno=self.next_seqno, epoch=epoch)
        self._store(batch)
        return batch

    def append_batch(self, data: bytes | bytearray | memoryview | Batch) -> Batch:
        self._check_open()
        batch = data if isinstance(data, Batch) else Batch.from_bytes(data)
        check_continues(batch, self.next_seqno)
        self._store(batch)
        return batch

    def _store(self, batch: Batch) -> None:
        if batch.header.length > self.config.max_batch_bytes:
            raise BatchEncodeError(
                f"batch of {batch.header.length} bytes exceeds max_batch_bytes "
                f"{self.config.max_batch_bytes}"
            )
        active = self._segments[-1]
        now_ms = self._clock_ms() if self.config.segment_ms is not None else 0
        if active.batches and should_roll(
            self.config,
            active_bytes=active.size,
            active_batches=len(active.batches),
            active_since_ms=active.since_ms,
            batch_bytes=batch.header.length,
            now_ms=now_ms,
        ):
            active = _Segment(self.next_seqno)
            self._segments.append(active)
        if not active.batches:
            active.since_ms = now_ms
        active.add(batch)

    def roll(self) -> None:
        self._check_open()
        if self._segments[-1].batches:
            self._segments.append(_Segment(self.next_seqno))

    def apply_retention(self, now_ms: int | None = None) -> int:
        self._check_open()
        now = self._clock_ms() if now_ms is None else now_ms
        sealed = [(s.size, s.max_timestamp_ms) for s in self._segments[:-1]]
        count = api.retention_count(self.config, sealed, self.total_bytes, now)
        del self._segments[:count]
        return count

    def truncate_after(self, seqno: int) -> None:
        self._check_open()
        if seqno >= self.last_seqno:
            return
        if seqno < self.first_seqno - 1:
            raise SeqnoOutOfRangeError(
                f"cannot truncate after {seqno}: the log starts at {self.first_seqno}"
            )
        while len(self._segments) > 1 and self._segments[-1].base_seqno > seqno:
            self._segments.pop()
        old = self._segments[-1]
        segment = _Segment(old.base_seqno)
        self._segments[-1] = segment
        for batch in old.batches:
            if batch.last_seqno <= seqno:
                segment.add(batch)
            elif batch.base_seqno <= seqno:  # the cut is inside: keep a shortened copy
                keep = batch.entries()[: seqno - batch.base_seqno + 1]
                segment.add(encode_batch(keep, base_seqno=batch.base_seqno, epoch=batch.epoch))
        if segment.batches:
            segment.since_ms = old.since_ms

    def read_batches(
        self, from_seqno: int, *, to_seqno: int | None = None, max_bytes: int = DEFAULT_READ_BYTES
    ) -> list[Batch]:
        self._check_open()
        api.check_read_start(from_seqno, self.first_seqno)
        if from_seqno >= self.next_seqno or (to_seqno is not None and to_seqno < from_seqno):
            return []
        out: list[Batch] = []
        taken = 0
        i = bisect_right([s.base_seqno for s in self._segments], from_seqno) - 1
        for segment in self._segments[i:]:
            j = max(bisect_right(segment.bases, from_seqno) - 1, 0)
            for batch in segment.batches[j:]:
                if to_seqno is not None and batch.base_seqno > to_seqno:
                    return out
                if taken and taken + batch.header.length > max_bytes:
                    return out
                out.append(batch)
                taken += batch.header.length
        return out

    def read(
        self, from_seqno: int, *, to_seqno: int | None = None, max_bytes: int | None = None
    ) -> Iterator[Record]:
        self._check_open()
        api.check_read_start(from_seqno, self.first_seqno)

        def batches(seqno: int, to: int | None, budget: int) -> list[Batch]:
            return self.read_batches(seqno, to_seqno=to, max_bytes=budget)

        return api.iter_records(batches, from_seqno, to_seqno, max_bytes)

    def seqno_for_time(self, timestamp_ms: int) -> int | None:
        self._check_open()
        for segment in self._segments:
            if not segment.batches or segment.max_timestamp_ms < timestamp_ms:
                continue
            for batch in segment.batches:
                if batch.header.max_timestamp_ms >= timestamp_ms:
                    for record in batch.records():
                        if record.timestamp_ms >= timestamp_ms:
                            return record.seqno
        return None

    def sync(self) -> None:
        self._check_open()

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> MemoryLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
