"""The receiving side of the log stream (sans-I/O): reassembles batches from pages and
delivers them in seqno order exactly once, reporting gaps to repair (see
:mod:`boomscooter.stream`)."""

from __future__ import annotations

import heapq
from collections import Counter, deque
from dataclasses import dataclass, field

from boomscooter.errors import BatchDecodeError
from boomscooter.storage.batch import HEADER_BYTES as BATCH_HEADER_BYTES
from boomscooter.storage.batch import U32_MAX, U64_MAX, Batch
from boomscooter.stream.codec import (
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BUFFERED_BYTES,
    Drop,
    Kind,
    StreamDropError,
    StreamHeader,
    check_range,
    decode_page,
)


@dataclass(frozen=True, slots=True)
class BatchReceived:
    """The next batch of the log, validated. ``batch.data`` is the exact stored bytes."""

    batch: Batch
    repaired: bool = False

    @property
    def data(self) -> bytes:
        return bytes(self.batch.data)

    @property
    def base_seqno(self) -> int:
        return self.batch.base_seqno

    @property
    def last_seqno(self) -> int:
        return self.batch.last_seqno


@dataclass(frozen=True, slots=True)
class CommitAdvanced:
    commit_seqno: int


@dataclass(frozen=True, slots=True)
class Gap:
    """Seqnos ``from_seqno`` … ``to_seqno`` (inclusive) are missing: Fetch them."""

    from_seqno: int
    to_seqno: int


@dataclass(frozen=True, slots=True)
class EpochChanged:
    """A page of a newer epoch arrived: re-handshake and start a new receiver."""

    epoch: int


Event = BatchReceived | CommitAdvanced | Gap | EpochChanged


@dataclass(slots=True)
class _Partial:
    record_count: int
    total_bytes: int
    first_seen: float
    fragments: dict[int, bytes] = field(default_factory=dict)
    received_bytes: int = 0


def _subtract(ranges: list[tuple[int, int]], cuts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Half-open ``ranges`` minus ``cuts`` (cuts sorted by start; may overlap)."""
    out = []
    for start, end in ranges:
        for cut_start, cut_end in cuts:
            if cut_end <= start:
                continue
            if cut_start >= end:
                break
            if cut_start > start:
                out.append((start, cut_start))
            start = max(start, cut_end)
        if start < end:
            out.append((start, end))
    return out


class StreamReceiver:
    """Reassembles one epoch's stream into batches delivered in seqno order (see module)."""

    def __init__(
        self,
        epoch: int,
        next_seqno: int,
        *,
        page_size_bytes: int | None = None,
        reorder_window_s: float = 0.05,
        repair_timeout_s: float = 1.0,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
    ) -> None:
        check_range("epoch", epoch, 0, U32_MAX)
        check_range("next_seqno", next_seqno, 1, U64_MAX)
        check_range("reorder_window_s", reorder_window_s, 0, 3600)
        check_range("repair_timeout_s", repair_timeout_s, 1e-3, 3600)
        check_range("max_batch_bytes", max_batch_bytes, BATCH_HEADER_BYTES, U32_MAX)
        check_range("max_buffered_bytes", max_buffered_bytes, 0, U64_MAX)
        self.epoch = epoch
        self.next_seqno = next_seqno
        self.commit_seqno = 0
        self.page_size_bytes = page_size_bytes
        self.reorder_window_s = reorder_window_s
        self.repair_timeout_s = repair_timeout_s
        self.max_batch_bytes = max_batch_bytes
        self.max_buffered_bytes = max_buffered_bytes
        self.drops: Counter[Drop] = Counter()
        self.buffered_bytes = 0
        self._ready: dict[int, Batch] = {}  # complete batches beyond next_seqno, by base
        self._partial: dict[int, _Partial] = {}  # by base seqno
        self._low: list[int] = []  # min-heap of buffered bases (entries may be gone)
        self._bases: list[int] = []  # the same as a max-heap (of -base)
        self._newest_epoch = epoch
        self._delivered_any = False
        self._known_end = next_seqno  # one past the highest seqno known to exist
        self._overdue_end = next_seqno  # seqnos below it were known a reorder window ago
        self._marks: deque[tuple[float, int]] = deque()  # (when, known end) not yet overdue
        self._partial_marks: deque[tuple[float, int]] = deque()  # (first seen, base)
        self._requested: list[tuple[int, int, float]] = []  # [start, end) asked for, when
        self._overflowed = False  # data was refused or evicted for room: repair in order
        self._recheck = False  # a delivery while overflowed: look for the next hole at once

    # -- inputs ---------------------------------------------------------------------------

    def datagram(self, data: bytes | bytearray | memoryview, now: float) -> list[Event]:
        """Feed one received datagram. Never raises on bad bytes."""
        try:
            page = decode_page(data, page_size_bytes=self.page_size_bytes)
        except StreamDropError as exc:
            self.drops[exc.reason] += 1
            return []
        events: list[Event] = []
        if page.epoch != self.epoch:
            self._other_epoch(page.epoch, events)
            return events
        head = page.header
        if head.kind == Kind.HEARTBEAT:
            self._learn(head.seqno + 1, now)
        else:
            self._fragment(head, page.fragment, now, events)
        if head.commit_seqno > self.commit_seqno:
            self.commit_seqno = head.commit_seqno
            self._learn(head.commit_seqno + 1, now)
            events.append(CommitAdvanced(head.commit_seqno))
        deadline = self.next_deadline()
        if deadline is not None and now >= deadline:
            self._find_gaps(now, events)
        return events

    def repaired(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed one batch obtained by Fetch. Invalid or unneeded batches are counted."""
        try:
            batch = Batch.from_bytes(data)
        except BatchDecodeError:
            self.drops[Drop.BAD_BATCH] += 1
            return []
        events: list[Event] = []
        if batch.epoch > self.epoch:
            self._other_epoch(batch.epoch, events)
            return events
        self._learn(batch.next_seqno, None)
        self._accept(batch, events, repaired=True)
        return events

    def poll(self, now: float) -> list[Event]:
        """Time-based decisions: gaps whose reorder window passed, repairs that timed out."""
        events: list[Event] = []
        self._find_gaps(now, events)
        return events

    def next_deadline(self) -> float | None:
        """When :meth:`poll` next has something to decide (None: nothing pending)."""
        if self._recheck:
            return float("-inf")
        times = []
        if self._marks:
            times.append(self._marks[0][0] + self.reorder_window_s)
        if self._partial_marks:
            times.append(self._partial_marks[0][0] + self.reorder_window_s)
        if self._requested:
            times.append(self._requested[0][2] + self.repair_timeout_s)
        return min(times) if times else None

    # -- internals ------------------------------------------------------------------------

    def _other_epoch(self, epoch: int, events: list[Event]) -> None:
        if epoch < self.epoch:
            self.drops[Drop.OLD_EPOCH] += 1
            return
        self.drops[Drop.NEW_EPOCH] += 1
        if epoch > self._newest_epoch:
            self._newest_epoch = epoch
            events.append(EpochChanged(epoch))

    def _learn(self, end: int, now: float | None) -> None:
        if end > self._known_end:
            self._known_end = end
            if now is None:  # a repaired batch: its seqnos are already being fetched
                self._overdue_end = max(self._overdue_end, end)
            else:
                self._marks.append((now, end))

    def _fragment(
        self, head: StreamHeader, fragment: memoryview, now: float, ev: list[Event]
    ) -> None:
        base, end = head.seqno, head.seqno + head.record_count
        self._learn(end, now)
        if end <= self.next_seqno or (self._delivered_any and base < self.next_seqno):
            self.drops[Drop.STALE] += 1
            return
        if base in self._ready:
            self.drops[Drop.DUPLICATE] += 1
            return
        if head.total_bytes > self.max_batch_bytes:
            self.drops[Drop.TOO_LARGE] += 1
            return
        partial = self._partial.get(base)
        if partial is not None:
            if (partial.record_count, partial.total_bytes) != (head.record_count, head.total_bytes):
                self.drops[Drop.INCONSISTENT] += 1
                return
            held = partial.fragments.get(head.offset)
            if held is not None:
                self.drops[Drop.DUPLICATE if held == fragment else Drop.INCONSISTENT] += 1
                return
        if not self._make_room(base, len(fragment)):
            return
        if partial is None:
            partial = self._partial[base] = _Partial(head.record_count, head.total_bytes, now)
            self._push(base)
            self._partial_marks.append((now, base))
        partial.fragments[head.offset] = bytes(fragment)
        partial.received_bytes += len(fragment)
        self.buffered_bytes += len(fragment)
        if partial.received_bytes >= partial.total_bytes:
            self._complete(base, ev)

    def _complete(self, base: int, events: list[Event]) -> None:
        partial = self._partial.pop(base)
        self.buffered_bytes -= partial.received_bytes
        # Overlapping fragments (a sender that cut the batch two ways) fail the batch CRC.
        data = b"".join([partial.fragments[offset] for offset in sorted(partial.fragments)])
        try:
            batch = Batch.from_bytes(data)
        except BatchDecodeError:
            self.drops[Drop.BAD_BATCH] += 1
            return
        if (
            batch.base_seqno != base
            or batch.record_count != partial.record_count
            or batch.epoch > self.epoch
        ):
            self.drops[Drop.BAD_BATCH] += 1
            return
        self._accept(batch, events, repaired=False)

    def _accept(self, batch: Batch, events: list[Event], *, repaired: bool) -> None:
        base = batch.base_seqno
        if batch.next_seqno <= self.next_seqno or (self._delivered_any and base < self.next_seqno):
            self.drops[Drop.STALE] += 1
            return
        if base > self.next_seqno:
            if base in self._ready:
                self.drops[Drop.DUPLICATE] += 1
            elif self._make_room(base, len(batch.data)):
                self._ready[base] = batch
                self.buffered_bytes += len(batch.data)
                self._push(base)
            return
        events.append(BatchReceived(batch, repaired))
        self.next_seqno = batch.next_seqno
        self._delivered_any = True
        while (ready := self._ready.pop(self.next_seqno, None)) is not None:
            self.buffered_bytes -= len(ready.data)
            events.append(BatchReceived(ready, False))
            self.next_seqno = ready.next_seqno
        self._prune()
        if self._overflowed:  # the next hole can be asked for now
            self._recheck = True
            self._overflowed = self.buffered_bytes > self.max_buffered_bytes // 2

    def _push(self, base: int) -> None:
        heapq.heappush(self._low, base)
        heapq.heappush(self._bases, -base)

    def _make_room(self, base: int, size_bytes: int) -> bool:
        """Evict buffered data beyond ``base`` (furthest first) until ``size_bytes`` fit:
        the seqnos nearest ``next_seqno`` are the ones delivered next."""
        if base <= self.next_seqno:
            return True
        while self.buffered_bytes + size_bytes > self.max_buffered_bytes:
            while self._bases and not (
                -self._bases[0] in self._ready or -self._bases[0] in self._partial
            ):
                heapq.heappop(self._bases)
            if not self._bases or -self._bases[0] <= base:
                self.drops[Drop.BUFFER_FULL] += 1
                self._overflowed = True
                return False
            self.drops[Drop.EVICTED] += 1
            self._overflowed = True
            self._forget(-heapq.heappop(self._bases))
        return True

    def _prune(self) -> None:
        """Forget buffered entries the delivered range made useless (superseded partials,
        or data inconsistent with what was delivered)."""
        while self._low and self._low[0] < self.next_seqno:
            self._forget(heapq.heappop(self._low))

    def _forget(self, base: int) -> None:
        if (batch := self._ready.pop(base, None)) is not None:
            self.buffered_bytes -= len(batch.data)
        if (partial := self._partial.pop(base, None)) is not None:
            self.buffered_bytes -= partial.received_bytes

    def _find_gaps(self, now: float, events: list[Event]) -> None:
        self._recheck = False
        seen_before = now - self.reorder_window_s
        while self._marks and self._marks[0][0] <= seen_before:
            self._overdue_end = max(self._overdue_end, self._marks.popleft()[1])
        while self._partial_marks and self._partial_marks[0][0] <= seen_before:
            self._partial_marks.popleft()
        asked_after = now - self.repair_timeout_s
        next_seqno = self.next_seqno
        self._requested = [r for r in self._requested if r[2] > asked_after and r[1] > next_seqno]
        end = self._overdue_end
        if end <= next_seqno:
            return
        covered = [(b, batch.next_seqno) for b, batch in self._ready.items() if b < end]
        covered += [
            (b, b + p.record_count)
            for b, p in self._partial.items()
            if b < end and p.first_seen > seen_before
        ]
        covered.sort()
        holes = _subtract([(next_seqno, end)], covered)
        if self._overflowed:  # what arrives beyond the first hole would not fit: one at a time
            holes = holes[:1]
        for start, stop in _subtract(holes, sorted(r[:2] for r in self._requested)):
            events.append(Gap(start, stop - 1))
            self._requested.append((start, stop, now))
