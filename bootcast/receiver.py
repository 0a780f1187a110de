"""Page reassembly, loss detection and NACK generation for one receiver (sans-I/O).

The shell feeds every datagram to :meth:`ReceiverCore.datagram` and writes the accepted
payload at the page's file offset; it calls :meth:`ReceiverCore.poll` a few times per
second and POSTs the :class:`~bootcast.nack.NackReport` it returns.

Loss detection relies on the carousel sending pages in ascending order (wrapping after
PAGES). Pages marked *repair* in the trailer are out of order by design and are not used
for gap detection. The *passed region* is the stretch of the carousel this receiver has
seen go by since its first page: a page missing inside it was lost, a page outside it may
simply not have been sent yet (a late joiner), so only the former is NACKed. When nothing
arrives for ``idle_s`` (the server pauses the carousel once every NACK client has seen a
full pass; or the tail of the pass was lost) every missing page is NACKed.

New gaps are reported within ``nack_delay_s``; every ``report_interval_s`` a report carries
the loss counters (for the server's pacing) and re-asks for everything still missing in
the passed region, lowest pages first, at most ``MAX_RANGES`` ranges. After a full pass,
when at most ``FAST_SWEEP_PAGES`` are missing, it re-asks every ``fast_sweep_s`` instead, so
the last rounds of repair follow each other without the link going idle.

With parity (``parity.py``; ``block_pages`` given), the shell also feeds parity datagrams
to :meth:`ReceiverCore.parity`. A block whose held pages and parity symbols reach its page
count is listed in :attr:`ReceiverCore.decodable`; the shell reads the block's held pages
back, and :meth:`ReceiverCore.rebuild` decodes and returns the missing ones to write. A
report then lists, per block, only as many missing pages as symbols are still needed.
"""

from __future__ import annotations

from array import array
from collections import Counter, deque
from dataclasses import dataclass

from crc32c import crc32c as _c_crc32c

from . import parity as _parity
from .nack import MAX_RANGES, NackReport
from .page import (
    FLAG_CAROUSEL_DONE,
    FLAG_REPAIR,
    HEADER,
    HEADER_BYTES,
    TRAILER_BYTES,
    TRAILER_MAGIC,
    TRAILER_VERSION,
    DropReason,
)
from .ranges import Range, missing_ranges

_HEADER = HEADER
_crc32c = _c_crc32c  # the C function itself: this runs once per datagram


@dataclass(slots=True)
class Accepted:
    """A page to write. Not frozen: one is made per datagram, and a frozen dataclass's
    ``__init__`` costs three times as much."""

    index: int
    offset: int
    payload: memoryview


class ReceiverCore:
    FAST_SWEEP_PAGES = 512
    PARITY_SCAN_S = 1.0

    def __init__(
        self,
        *,
        pages: int,
        page_size: int,
        size: int | None,
        cast_id: int | None,
        now: float,
        nack_delay_s: float = 0.03,
        report_interval_s: float = 0.25,
        idle_s: float = 0.3,
        fast_sweep_s: float = 0.05,
        carousel_quiet_s: float = 0.5,
        verify_crc: bool = True,
        first_page_wait_s: float = 1.0,
        block_pages: int | None = None,
        parity_retry_s: float = 0.25,
    ) -> None:
        self.pages = pages
        self.page_size = page_size
        self.size = size
        self.cast_id = cast_id
        self.nack_delay_s = nack_delay_s
        self.report_interval_s = report_interval_s
        self.idle_s = idle_s
        self.fast_sweep_s = fast_sweep_s
        # Size of the last page when SIZE is known; every other page is full.
        self._last_size = None if size is None else size - (pages - 1) * page_size
        self.have = bytearray(pages + 1)
        self.have[0] = 1
        self.held = 0
        self.bytes_held = 0
        self.last_page_size: int | None = None
        self.drops: Counter[DropReason] = Counter()
        self.duplicates = 0
        self.repairs_received = 0
        self.last_progress = now
        self._created = now
        self.first_page_wait_s = first_page_wait_s
        self.verify_crc = verify_crc
        self.last_datagram: float | None = None
        self.last_carousel_at: float | None = None
        self.carousel_quiet_s = carousel_quiet_s
        self.carousel_done = False  # a repair said the server paused the carousel
        self.first_page_at: float | None = None
        self._first_seen: int | None = None
        self._expect: int | None = None
        self._wrapped = False
        self._full_pass = False
        self._new_gaps: list[Range] = []
        self._init_parity(block_pages, parity_retry_s, now)
        self._received = 0
        self._lost = 0
        self._overrun_reported = 0
        self._overrun_total = 0
        self._last_report = now
        self._gap_since: float | None = None

    def _init_parity(self, block_pages: int | None, parity_retry_s: float, now: float) -> None:
        self.block_pages = block_pages
        self._bp = block_pages or 1
        blocks = _parity.block_count(self.pages, block_pages) if block_pages else 0
        self.blocks = blocks
        # Pages held per block, and the parity symbols held for incomplete blocks.
        self._block_held = bytearray(blocks) if block_pages and block_pages < 256 else None
        self._symbols: dict[int, dict[int, bytes]] = {}
        self._asked_at = array("d", bytes(8 * blocks)) if self._block_held is not None else None
        self._asked_need = bytearray(blocks)
        self.parity_retry_s = parity_retry_s
        self._retry: deque[tuple[float, int]] = deque()  # (asked at, block), in ask order
        self._next_scan = now
        self._scanned_all_passed = False
        self.decodable: list[int] = []
        self.parity_received = 0
        self.pages_rebuilt = 0

    @property
    def complete(self) -> bool:
        return self.held == self.pages

    def datagram(self, data: bytes | memoryview, now: float) -> Accepted | None:
        """Check one datagram; return what to write, or None (dropped or duplicate).

        The checks of :func:`bootcast.page.decode`, inlined: this runs once per datagram.
        """
        n = len(data)
        if n < HEADER_BYTES:
            self.drops[DropReason.SHORT] += 1
            return None
        size, index, cast_id, crc = _HEADER.unpack_from(data)
        end = HEADER_BYTES + size
        reason = self._bad_header(size, index, cast_id, n)
        if reason is not None:
            self.drops[reason] += 1
            return None
        flags = (
            data[end + 2]
            if n >= end + TRAILER_BYTES
            and data[end] == TRAILER_MAGIC
            and data[end + 1] == TRAILER_VERSION
            else 0
        )
        repair = bool(flags & FLAG_REPAIR)
        if flags & FLAG_CAROUSEL_DONE and repair:
            self.carousel_done = True
        if self.have[index]:
            self._duplicate(index, repair, now)
            return None
        payload = (
            data[HEADER_BYTES:end]
            if isinstance(data, memoryview)
            else memoryview(data)[HEADER_BYTES:end]
        )
        if self.verify_crc and _crc32c(payload) != crc:
            self.drops[DropReason.BAD_CRC] += 1
            return None
        pages = self.pages
        if size != self.page_size if index < pages else not self._good_last_size(size):
            self.drops[DropReason.BAD_SIZE] += 1
            return None
        self.last_datagram = now
        if self.first_page_at is None:
            self.first_page_at = now
        if repair:
            self.repairs_received += 1
        elif index == self._expect and index != pages and (self._full_pass or not self._wrapped):
            # The common case, in carousel order: nothing to detect.
            self._received += 1
            self._expect = index + 1
            self.last_carousel_at = now
        else:
            self._carousel(index, now)
        self._hold(index, size, now)
        return Accepted(index, (index - 1) * self.page_size, payload)

    def _bad_header(self, size: int, index: int, cast_id: int, n: int) -> DropReason | None:
        if size > self.page_size:
            return DropReason.OVERSIZED
        if n < HEADER_BYTES + size:
            return DropReason.TRUNCATED
        if self.cast_id is not None and cast_id != self.cast_id:
            return DropReason.FOREIGN
        if index == 0 or index > self.pages:
            return DropReason.BAD_INDEX
        return None

    def _good_last_size(self, size: int) -> bool:
        """The last page's size: exactly what SIZE says, else anything but empty."""
        return size == self._last_size if self._last_size is not None else size > 0

    def _duplicate(self, index: int, repair: bool, now: float) -> None:
        """Held already (repairs go to everyone): nothing to verify or write, only the
        carousel order matters."""
        self.duplicates += 1
        self.last_datagram = now
        if repair:
            self.repairs_received += 1
        else:
            self._carousel(index, now)

    def _hold(self, index: int, size: int, now: float) -> None:
        self.have[index] = 1
        self.held += 1
        self.bytes_held += size
        if self._block_held is not None:
            block = (index - 1) // self._bp
            self._block_held[block] += 1
            if block in self._symbols:
                self._check_decodable(block)
        if index == self.pages:
            self.last_page_size = size
        self.last_progress = now

    def _carousel(self, index: int, now: float) -> None:
        self._received += 1
        self.last_carousel_at = now
        if self._first_seen is None:
            self._first_seen = index
        elif self._expect is not None and index < self._expect <= index + min(self.pages // 2, 256):
            # A little behind the stream: reordered on the way (packets of one flow can
            # take different CPUs' queues), not a wrap. It was counted lost in a gap; its
            # NACK, delayed by nack_delay_s, will not be sent now that it is held.
            self._lost = max(0, self._lost - 1)
            return
        elif self._expect is not None and index != self._expect:
            # Pages expect..index-1 (cyclically) went by without reaching us.
            if index > self._expect:
                gaps = [(self._expect, index - 1)]
            else:
                gaps = [(self._expect, self.pages)] if self._expect <= self.pages else []
                if index > 1:
                    gaps.append((1, index - 1))
            for a, b in gaps:
                self._lost += b - a + 1
                self._new_gaps.extend(missing_ranges(self.have, a, b))
            if self._gap_since is None and self._new_gaps:
                self._gap_since = now
        if self._expect is not None and index < self._expect:
            self._wrapped = True
        if self._wrapped and self._first_seen is not None and index >= self._first_seen - 1:
            self._full_pass = True
        if index == self.pages and self._first_seen == 1:
            self._full_pass = True
        if index == self.pages:
            # The next carousel page is 1: from here on the stream has wrapped.
            self._wrapped = True
        self._expect = index + 1 if index < self.pages else 1

    # -- parity ----------------------------------------------------------------------------

    def parity(self, data: bytes | memoryview, now: float) -> None:
        """Take one datagram from the parity port (checked; bad ones are counted)."""
        if self._block_held is None or self.cast_id is None:
            self.drops[DropReason.FOREIGN] += 1
            return
        if len(data) >= HEADER_BYTES:
            # Most symbols are for blocks this receiver completed already (a symbol goes
            # to everyone, but answers the worst receiver's need): skip those unchecked.
            block = _HEADER.unpack_from(data)[1] - 1
            if 0 <= block < self.blocks:
                _, k = _parity.block_span(block, self.pages, self._bp)
                if self._block_held[block] >= k:
                    self.duplicates += 1
                    self.last_datagram = now
                    return
        sym = _parity.decode_datagram(
            data, cast_id=self.cast_id, page_size=self.page_size, blocks=self.blocks
        )
        if sym is None:
            self.drops[DropReason.BAD_PARITY] += 1
            return
        self.last_datagram = now
        _, k = _parity.block_span(sym.block, self.pages, self.block_pages or 1)
        held = self._symbols.get(sym.block)
        if self._block_held[sym.block] >= k or sym.number < k or (held and sym.number in held):
            self.duplicates += 1
            return
        self.parity_received += 1
        if sym.carousel_done:
            self.carousel_done = True
        self.repairs_received += 1
        self._symbols.setdefault(sym.block, {})[sym.number] = sym.data
        self._check_decodable(sym.block)

    def _check_decodable(self, block: int) -> None:
        assert self._block_held is not None and self.block_pages is not None
        _, k = _parity.block_span(block, self.pages, self.block_pages)
        symbols = self._symbols[block]
        if self._block_held[block] >= k:
            del self._symbols[block]  # completed by pages alone
        elif self._block_held[block] + len(symbols) >= k and block not in self.decodable:
            self.decodable.append(block)

    def block_extent(self, block: int) -> tuple[int, int, int]:
        """(first page, byte offset, byte length) of ``block`` in the file."""
        first, k = _parity.block_span(block, self.pages, self._bp)
        offset = (first - 1) * self.page_size
        return first, offset, min(k * self.page_size, self.file_size() - offset)

    def block_pages_held(self, block: int) -> list[int]:
        """The held pages of ``block`` (the shell reads them back for :meth:`rebuild`)."""
        assert self.block_pages is not None
        first, k = _parity.block_span(block, self.pages, self.block_pages)
        return [i for i in range(first, first + k) if self.have[i]]

    def rebuild(self, block: int, held: dict[int, bytes], now: float) -> list[Accepted]:
        """Decode ``block`` from its held pages (index → payload, as read back) and parity;
        mark the missing pages held and return them to write."""
        assert self._block_held is not None and self.block_pages is not None
        if block in self.decodable:
            self.decodable.remove(block)
        symbols = self._symbols.pop(block, {})
        first, k = _parity.block_span(block, self.pages, self.block_pages)
        if self._block_held[block] >= k:
            return []  # completed by pages meanwhile
        page_size = self.page_size
        for index, page in held.items():
            symbols[index - first] = page.ljust(page_size, b"\0")
        if len(symbols) < k:
            return []  # pages vanished meanwhile? cannot happen; ask again rather than fail
        data = _parity.decode_symbols(k, symbols)
        out: list[Accepted] = []
        for offset in range(k):
            index = first + offset
            if self.have[index]:
                continue
            size = page_size if index < self.pages else self._final_size()
            payload = memoryview(data[offset])[:size]
            self.have[index] = 1
            self.held += 1
            self.bytes_held += size
            self._block_held[block] += 1
            self.pages_rebuilt += 1
            if index == self.pages:
                self.last_page_size = size
            out.append(Accepted(index, (index - 1) * page_size, payload))
        if out:
            self.last_progress = now
        return out

    def _final_size(self) -> int:
        # Parity needs SIZE= (the server always sends it with PARITY=).
        assert self._last_size is not None
        return self._last_size

    def _parity_missing(self, spans: list[Range], now: float) -> list[Range]:
        """What to ask for in parity mode, for the pages of ``spans`` (passed pages, or new
        gaps). Per block: leave out as many missing pages as parity symbols are held (the
        server counts pages per block as symbols needed); ask again for a block only when
        its need grew or ``retry_s`` passed since it was asked for: eight clients re-listing
        thousands of gaps four times a second would cost the server more than the repairs.
        Blocks are found with ``bytearray.find``, so complete stretches cost nothing."""
        assert self._asked_at is not None
        have, bp = self.have, self._bp
        out: list[Range] = []
        asked_at, asked_need = self._asked_at, self._asked_need
        retry_s = self._retry_s(now)
        for first, last in spans:
            pos = have.find(0, first, last + 1)
            while pos >= 0 and len(out) < MAX_RANGES:
                block = (pos - 1) // bp
                block_end = min((block + 1) * bp, self.pages)
                hi = min(block_end, last)
                symbols = self._symbols.get(block)
                drop = len(symbols) if symbols else 0
                need = have.count(0, pos, hi + 1) - drop
                if need > 0 and (need > asked_need[block] or now >= asked_at[block] + retry_s):
                    asked_at[block] = now
                    asked_need[block] = min(need, 255)
                    self._retry.append((now, block))
                    for a, z in missing_ranges(have, pos, hi):
                        take = min(drop, z - a + 1)
                        drop -= take
                        if a + take > z:
                            continue
                        if out and out[-1][1] + 1 == a + take:
                            out[-1] = (out[-1][0], z)
                        else:
                            out.append((a + take, z))
                pos = have.find(0, hi + 1, last + 1) if hi < last else -1
        return out[:MAX_RANGES]

    def _parity_spans(self, now: float, due_report: bool) -> list[Range]:
        """Where to look for parity needs: new gaps; on a report, the blocks whose ask is
        older than ``retry_s``; and the whole passed region once per ``PARITY_SCAN_S``
        and when the carousel has gone by entirely (walking thousands of blocks that are
        waiting for their repairs on every report would cost more than the repairs); at
        the end, when few pages are left, on every report (a page lost at the very end of
        the pass shows as no gap)."""
        spans = _merge(self._new_gaps, self.have)
        if not due_report:
            return spans
        all_passed = self._all_passed(now)
        few_left = all_passed and self.pages - self.held <= self.FAST_SWEEP_PAGES
        if now >= self._next_scan or few_left or (all_passed and not self._scanned_all_passed):
            self._next_scan = now + self.PARITY_SCAN_S
            self._scanned_all_passed = all_passed
            # The retry queue stays: blocks asked for moments ago are skipped by the scan
            # and must still be looked at once their retry time is up.
            return self._passed_spans(now)
        retry_s, bp = self._retry_s(now), self._bp
        due: list[Range] = []
        while self._retry and self._retry[0][0] + retry_s <= now:
            _, block = self._retry.popleft()
            start = block * bp + 1
            due.append((start, min(start + bp - 1, self.pages)))
        return _merge(spans + due, self.have)

    def _retry_s(self, now: float) -> float:
        if self.pages - self.held <= self.FAST_SWEEP_PAGES and self._all_passed(now):
            return self.fast_sweep_s
        return self.parity_retry_s

    def overrun(self, total_drops: int) -> None:
        """The socket's cumulative drop counter (SO_MEMINFO), read by the shell."""
        self._overrun_total = total_drops

    def _all_passed(self, now: float) -> bool:
        """Has the carousel gone by everything this receiver will see of it? After a full
        pass; or when a repair says the server paused the carousel (it does once every
        NACK client had its pass); or when nothing arrived for ``idle_s``; or when repairs
        still arrive but the carousel has been quiet for ``carousel_quiet_s`` (a server
        without the flag; long enough that repairs crowding the carousel out for a while
        are not taken for its end)."""
        if self._full_pass or self.carousel_done:
            return True
        if self.first_page_at is None:
            # Nothing yet: a late joiner of a small file may have missed its whole pass.
            # (Later than idle_s: a cast waits up to 0.5 s for a wave of joins to settle,
            # and everything asked for now would come as repairs, outside gap detection.)
            return now - self._created >= self.first_page_wait_s
        assert self.last_datagram is not None
        if now - self.last_datagram >= self.idle_s:
            return True
        quiet_since = self.last_carousel_at or self.first_page_at
        return now - quiet_since >= self.carousel_quiet_s

    def _passed_spans(self, now: float) -> list[Range]:
        """The stretches of pages the carousel has gone by (see ``_all_passed``)."""
        if self._all_passed(now):
            return [(1, self.pages)]
        if self._first_seen is None or self._expect is None:
            return []
        first, last = self._first_seen, self._expect - 1
        if not self._wrapped:
            return [(first, last)] if last >= first else []
        return ([(1, last)] if last >= 1 else []) + [(first, self.pages)]

    def _passed_missing(self, now: float) -> list[Range]:
        out: list[Range] = []
        for first, last in self._passed_spans(now):
            out.extend(missing_ranges(self.have, first, last, limit=MAX_RANGES - len(out)))
        return out[:MAX_RANGES]

    def _report_interval(self, now: float) -> float:
        # Once the carousel has gone by (or gone quiet), what is missing is all that is
        # left: ask again quickly while it is little, so the link does not idle between
        # rounds of repairs; a long list waits for the usual interval (it is still queued).
        if self.pages - self.held <= self.FAST_SWEEP_PAGES and self._all_passed(now):
            return self.fast_sweep_s
        return self.report_interval_s

    def poll(self, now: float, *, nack: bool = True) -> NackReport | None:
        """A report to send now, or None. Reports carry counters even when ``nack`` is off."""
        if self.complete:
            return None
        due_gap = self._gap_since is not None and now - self._gap_since >= self.nack_delay_s
        due_report = now - self._last_report >= self._report_interval(now)
        if not (due_gap or due_report):
            return None
        missing: list[Range] = []
        if nack and self._asked_at is not None:
            spans = self._parity_spans(now, due_report)
            missing = self._parity_missing(spans, now)
        elif nack:
            if due_report:
                missing = self._passed_missing(now)
            else:
                missing = _merge(self._new_gaps, self.have)[:MAX_RANGES]
        self._new_gaps = []
        self._gap_since = None
        report = NackReport(
            missing=missing,
            received=self._received,
            lost=self._lost,
            overrun=max(0, self._overrun_total - self._overrun_reported),
            held=self.held,
        )
        self._received = self._lost = 0
        self._overrun_reported = self._overrun_total
        if due_report:
            self._last_report = now
        return report

    def file_size(self) -> int:
        """The assembled file's size (from SIZE=, else from the last page's size)."""
        if self.size is not None:
            return self.size
        if self.pages == 0:
            return 0
        assert self.last_page_size is not None, "file_size() before the last page arrived"
        return (self.pages - 1) * self.page_size + self.last_page_size


def _merge(ranges: list[Range], have: bytearray) -> list[Range]:
    """Sort and coalesce gap ranges, dropping pages that arrived meanwhile (repairs)."""
    out: list[Range] = []
    for a, b in sorted(ranges):
        for r in missing_ranges(have, a, b):
            if out and r[0] <= out[-1][1] + 1:
                out[-1] = (out[-1][0], max(out[-1][1], r[1]))
            else:
                out.append(r)
    return out
