"""The log's multicast stream: wire format, encoder and receiver (sans-I/O).

The leader multicasts every stored batch once, as bootcast pages; replicas and subscribers
reassemble them, deliver batches in seqno order and ask their shell to repair losses with
a gRPC ``Fetch``. This docstring is the wire specification.

Wire format
-----------
A datagram is a bootcast page (:mod:`bootcast.page`): four big-endian u32 words — payload
``size``, page ``index`` (the encoder's own page sequence number from 1, wrapping from
0xFFFFFFFF to 1; informational), ``cast_id`` = the leader epoch, CRC32C of the payload —
then the payload, then the bootcast trailer ``BC 01 00 00`` (receivers ignore any bytes
after the payload). The payload is a 32-byte big-endian stream header and a fragment::

     0  1  magic         0xB7
     1  1  version       1
     2  1  kind          1 = BATCH_FRAGMENT, 2 = HEARTBEAT
     3  1  flags         0 (a receiver drops a page with unknown flags)
     4  8  seqno         fragment: the batch's base_seqno; heartbeat: the leader's last seqno
    12  8  commit_seqno  the leader's commit point when the page was sent
    20  4  record_count  fragment: records in the batch (>= 1); heartbeat: 0
    24  4  offset        fragment: where these bytes start in the batch; heartbeat: 0
    28  4  total_bytes   fragment: the batch's length (>= 48); heartbeat: 0
    32     fragment bytes (>= 1, within total_bytes); none in a heartbeat

A batch (the storage format of :mod:`boomscooter.storage`, byte for byte) goes out as
``ceil(length / (PAGESIZE - 32))`` consecutive pages with ascending offsets, all of one
epoch (the batch's own ``epoch`` field is never above it). Every fragment names its
batch's seqno range, so any one page tells a receiver which seqnos exist.

Theory of operation
-------------------
:class:`StreamEncoder` checks a batch's header, cuts it into pages and numbers them;
``heartbeat`` makes the page an idle leader sends periodically. :class:`StreamReceiver`
keeps ``next_seqno`` (first seqno not yet delivered) and reassembles fragments by
``(base_seqno, offset)``, dropping duplicates. A complete batch is validated in full
(storage CRC32C and framing, and agreement with its pages), then delivered if it starts
at ``next_seqno`` — followed by every buffered batch that now continues the log — or
buffered. Buffered bytes are bounded: data furthest ahead is evicted first (the batch at
``next_seqno`` always fits) and, once anything was refused, repair goes one hole at a
time, in order, so fetched batches are delivered rather than refused again.

Gaps are decided by evidence and time. Every page moves the *known end* (a fragment's
batch end, a heartbeat's last seqno + 1, the commit seqno + 1). A seqno known for
``reorder_window_s`` that is neither delivered, buffered nor in a batch whose first
fragment came less than ``reorder_window_s`` ago is missing: :class:`Gap` asks the
shell to Fetch it — a mid-stream discontinuity, tail loss behind a heartbeat and lost
fragments alike. A range is asked again only after ``repair_timeout_s``. Fetched batches
enter through ``repaired`` under the same ordering and dedupe rules, so a late multicast
copy and a fetched one are delivered once. ``next_deadline`` says when to call ``poll``.

Pages of an older epoch are dropped; the first page (or fetched batch) of a newer one
yields :class:`EpochChanged` and is dropped: the shell re-handshakes and starts a new
receiver. Malformed or foreign datagrams never raise: they are counted by :class:`Drop`
reason in ``drops``. A receiver started inside a batch delivers that whole batch first
(records before its ``next_seqno`` included); each later batch starts at the previous
``last_seqno + 1``.
"""

from __future__ import annotations

import enum
import heapq
import struct
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import NamedTuple

from boomscooter.errors import BatchDecodeError, ConfigError, LocalProtocolError
from boomscooter.storage.batch import HEADER_BYTES as BATCH_HEADER_BYTES
from boomscooter.storage.batch import U32_MAX, U64_MAX, Batch, decode_header
from bootcast import page as bpage

STREAM_HEADER = struct.Struct("!BBBBQQIII")
STREAM_HEADER_BYTES = STREAM_HEADER.size  # 32
STREAM_MAGIC = 0xB7
STREAM_VERSION = 1
MIN_PAGE_SIZE = STREAM_HEADER_BYTES + 32
DEFAULT_PAGE_SIZE = 1400  # bootcast's default: one page per Ethernet frame
DEFAULT_MAX_BATCH_BYTES = 64 << 20
DEFAULT_MAX_BUFFERED_BYTES = 64 << 20


class Kind(enum.IntEnum):
    BATCH_FRAGMENT = 1
    HEARTBEAT = 2


class Drop(enum.Enum):
    """Why the receiver did not use a datagram (or a repaired batch)."""

    SHORT = "short"  # fewer bytes than a page header
    TRUNCATED = "truncated"  # page header says more payload than arrived
    OVERSIZED = "oversized"  # page larger than the configured page size
    BAD_INDEX = "bad_index"  # page index 0
    BAD_CRC = "bad_crc"  # payload does not match the page CRC32C
    BAD_HEADER = "bad_header"  # not a stream header (magic, version, kind, fields)
    OLD_EPOCH = "old_epoch"
    NEW_EPOCH = "new_epoch"
    STALE = "stale"  # a batch below next_seqno (already delivered)
    DUPLICATE = "duplicate"  # a fragment or batch already held
    INCONSISTENT = "inconsistent"  # contradicts pages already held for the same batch
    BAD_BATCH = "bad_batch"  # reassembled bytes are not a valid batch matching its pages
    TOO_LARGE = "too_large"  # batch above max_batch_bytes
    BUFFER_FULL = "buffer_full"  # out-of-order data beyond max_buffered_bytes
    EVICTED = "evicted"  # a buffered batch or partial dropped to make room for an earlier one


class StreamEncodeError(LocalProtocolError, ValueError):
    """The encoder was handed something it must not send (a malformed or oversize batch,
    a batch of a newer epoch, a seqno going backwards, a value out of range)."""


class StreamDropError(Exception):
    """A datagram is not a valid stream page; ``reason`` says why (receivers count it)."""

    def __init__(self, reason: Drop, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason


class StreamHeader(NamedTuple):
    """The 32-byte stream header (magic, version and flags are implied)."""

    kind: Kind
    seqno: int
    commit_seqno: int
    record_count: int = 0
    offset: int = 0
    total_bytes: int = 0

    def pack(self) -> bytes:
        try:
            return STREAM_HEADER.pack(
                STREAM_MAGIC, STREAM_VERSION, self.kind, 0, self.seqno, self.commit_seqno,
                self.record_count, self.offset, self.total_bytes,
            )  # fmt: skip
        except struct.error as exc:
            raise StreamEncodeError(f"stream header field out of range: {exc}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamPage:
    """A decoded datagram. ``fragment`` is a view into it (no copy)."""

    page_index: int
    epoch: int
    header: StreamHeader
    fragment: memoryview


def encode_page(
    page_index: int, epoch: int, header: StreamHeader, fragment: bytes | memoryview = b""
) -> bytes:
    """One datagram: bootcast page header, stream header, fragment, bootcast trailer."""
    payload = b"".join((header.pack(), fragment))
    try:
        return bpage.encode(page_index, epoch, payload)
    except ValueError as exc:
        raise StreamEncodeError(str(exc)) from None


def decode_page(
    data: bytes | bytearray | memoryview, *, page_size_bytes: int | None = None
) -> StreamPage:
    """Decode and check one datagram; raise :class:`StreamDropError` with the reason."""
    try:
        page = bpage.decode(data, page_size=page_size_bytes)
    except bpage.PageError as exc:
        try:
            reason = Drop(exc.reason.value)
        except ValueError:
            reason = Drop.BAD_HEADER
        raise StreamDropError(reason, str(exc)) from None
    payload = page.payload
    if len(payload) < STREAM_HEADER_BYTES:
        raise StreamDropError(Drop.BAD_HEADER, f"{len(payload)}-byte payload")
    magic, version, kind, flags, seqno, commit, count, offset, total = STREAM_HEADER.unpack_from(
        payload
    )
    if magic != STREAM_MAGIC or version != STREAM_VERSION or flags:
        raise StreamDropError(Drop.BAD_HEADER, f"magic {magic:#x} version {version} flags {flags}")
    fragment = payload[STREAM_HEADER_BYTES:]
    if kind == Kind.HEARTBEAT:
        if count or offset or total or len(fragment):
            raise StreamDropError(Drop.BAD_HEADER, "heartbeat with fragment fields")
    elif kind == Kind.BATCH_FRAGMENT:
        if (
            count < 1
            or seqno < 1
            or seqno + count - 1 > U64_MAX
            or total < BATCH_HEADER_BYTES
            or not 1 <= len(fragment) <= total - offset
        ):
            raise StreamDropError(Drop.BAD_HEADER, f"fragment {seqno}+{count} @{offset}/{total}")
    else:
        raise StreamDropError(Drop.BAD_HEADER, f"kind {kind}")
    header = StreamHeader(Kind(kind), seqno, commit, count, offset, total)
    return StreamPage(page_index=page.index, epoch=page.cast_id, header=header, fragment=fragment)


def _check(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name} {value} not in [{low}, {high}]")


class StreamEncoder:
    """Cuts batches into numbered pages of one epoch and makes heartbeats."""

    def __init__(
        self,
        epoch: int,
        page_size_bytes: int = DEFAULT_PAGE_SIZE,
        *,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        first_page_index: int = 1,
    ) -> None:
        _check("epoch", epoch, 0, U32_MAX)
        _check("page_size_bytes", page_size_bytes, MIN_PAGE_SIZE, bpage.MAX_PAGE_SIZE)
        _check("max_batch_bytes", max_batch_bytes, BATCH_HEADER_BYTES, U32_MAX)
        _check("first_page_index", first_page_index, 1, U32_MAX)
        self.epoch = epoch
        self.page_size_bytes = page_size_bytes
        self.max_batch_bytes = max_batch_bytes
        self.next_page_index = first_page_index
        self.next_seqno = 0  # one past the last batch sent (batches never go backwards)

    def _index(self) -> int:
        index = self.next_page_index
        self.next_page_index = 1 if index == U32_MAX else index + 1
        return index

    def batch(
        self, encoded_batch: bytes | bytearray | memoryview, commit_seqno: int
    ) -> list[bytes]:
        """The datagrams that carry one stored batch, in order."""
        view = memoryview(encoded_batch).cast("B")
        if len(view) > self.max_batch_bytes:
            raise StreamEncodeError(f"batch of {len(view)} bytes > {self.max_batch_bytes}")
        try:
            header = decode_header(view)
        except BatchDecodeError as exc:
            raise StreamEncodeError(f"not a batch: {exc}") from None
        if header.length != len(view):
            raise StreamEncodeError(f"batch header says {header.length} bytes, {len(view)} given")
        if header.epoch > self.epoch:
            raise StreamEncodeError(f"batch of epoch {header.epoch} in a stream of {self.epoch}")
        if header.base_seqno < self.next_seqno:
            raise StreamEncodeError(
                f"batch at {header.base_seqno} goes back before {self.next_seqno}"
            )
        if not 0 <= commit_seqno <= U64_MAX:
            raise StreamEncodeError(f"commit seqno out of range: {commit_seqno}")
        step = self.page_size_bytes - STREAM_HEADER_BYTES
        head = StreamHeader(
            Kind.BATCH_FRAGMENT,
            header.base_seqno,
            commit_seqno,
            header.record_count,
            0,
            header.length,
        )
        pages = [
            encode_page(self._index(), self.epoch, head._replace(offset=at), view[at : at + step])
            for at in range(0, header.length, step)
        ]
        self.next_seqno = header.next_seqno
        return pages

    def heartbeat(self, last_seqno: int, commit_seqno: int) -> bytes:
        """The idle page: the leader's last and commit seqno (0 for an empty log)."""
        if not 0 <= commit_seqno <= last_seqno <= U64_MAX:
            raise StreamEncodeError(f"need 0 <= commit {commit_seqno} <= last {last_seqno}")
        head = StreamHeader(Kind.HEARTBEAT, last_seqno, commit_seqno)
        return encode_page(self._index(), self.epoch, head)


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
        _check("epoch", epoch, 0, U32_MAX)
        _check("next_seqno", next_seqno, 1, U64_MAX)
        _check("reorder_window_s", reorder_window_s, 0, 3600)
        _check("repair_timeout_s", repair_timeout_s, 1e-3, 3600)
        _check("max_batch_bytes", max_batch_bytes, BATCH_HEADER_BYTES, U32_MAX)
        _check("max_buffered_bytes", max_buffered_bytes, 0, U64_MAX)
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
