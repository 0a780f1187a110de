"""One cast's lifecycle and page scheduling (sans-I/O).

A cast multicasts one file as pages to everyone who joined it. The shell (``server.py``)
asks :meth:`CastCore.next_page` for the next page to send whenever the pacer allows, and
carries out what it gets; every method takes ``now`` (seconds, monotonic) from the shell.

Scheduling, in priority order:

1. **Repairs.** Pages listed in NACKs (``nack.py``) wait in one FIFO queue. A page already
   queued is not queued again (aggregation: 50 clients missing page 7 cause one resend), and
   a NACK for a page sent less than ``suppress_s`` ago (80 ms: the time a page spends queued
   and on a LAN's wire, plus a report's delay) is ignored (suppression: that NACK
   most likely crossed the resend on the wire; a client still lacking the page asks again).
2. **The carousel.** Pages 1..PAGES in order, wrapping around: the original protocol, and
   all that a spec-only client (one that never NACKs) relies on. When only NACK-capable
   clients are joined, it skips a page already sent (as a repair) since the latest join:
   every client got that transmission or will ask for the page. The carousel runs while a
   spec-only client is joined, or while a NACK-capable client has not yet seen one full
   pass since it joined (late joiners get the pass from where they came in). A carousel send
   of a queued page satisfies that repair too.
   Clients that joined with parity (``parity.py``) are repaired per block instead: a
   block's need (the most pages any one client still lacks there) is answered with fresh
   parity symbols, one symbol repairing a different lost page at every client; symbols
   queued or sent within ``suppress_s`` count against later reports of that block. A client
   lacking a whole block gets the pages themselves (no encoding work for the same cost).
   While the carousel runs, pages (and blocks) it has not sent yet are not repaired: it
   brings them, and a client asking for everything early must not turn the file into
   repairs that crowd the carousel out.
3. **Speculative repeats.** While clients are still asking (a NACK within ``speculate_s``),
   each recent repair is repeated once, ``suppress_s`` after it went out: the link would
   idle between rounds of repair anyway, and a receiver that lost a repair then needs no
   new round.
4. Otherwise the cast is **paused**: every client that is still joined is NACK-capable, has
   seen a full pass and gets the rest by asking.

Lifecycle (a table, as in h11): ``RUNNING`` until the last client leaves, or until
``idle_loops`` full carousel iterations pass without a join, leave or NACK report. While
paused, each ``loop_s`` seconds (the time one full pass takes at the configured rate, at
least 1 s) counts as one iteration, so a client that vanished without leaving never keeps a
cast alive; and an iteration never counts for less than ``loop_s`` of wall time, so the
fast wraps of a tiny file cannot end its cast before a client had time to bind the group.
"""

from __future__ import annotations

import enum
from array import array
from collections import deque
from dataclasses import dataclass

from .errors import LocalProtocolError
from .nack import NackReport
from .parity import BLOCK_PAGES, SYMBOLS, block_of, block_span
from .ranges import Range


class CastState(enum.Enum):
    RUNNING = "running"
    STOPPED = "stopped"


class CastEvent(enum.Enum):
    JOIN = "join"
    LEAVE = "leave"
    LAST_LEAVE = "last_leave"
    NACK = "nack"
    IDLE = "idle"
    SHUTDOWN = "shutdown"


_TRANSITIONS: dict[tuple[CastState, CastEvent], CastState] = {
    (CastState.RUNNING, CastEvent.JOIN): CastState.RUNNING,
    (CastState.RUNNING, CastEvent.LEAVE): CastState.RUNNING,
    (CastState.RUNNING, CastEvent.NACK): CastState.RUNNING,
    (CastState.RUNNING, CastEvent.LAST_LEAVE): CastState.STOPPED,
    (CastState.RUNNING, CastEvent.IDLE): CastState.STOPPED,
    (CastState.RUNNING, CastEvent.SHUTDOWN): CastState.STOPPED,
    (CastState.STOPPED, CastEvent.SHUTDOWN): CastState.STOPPED,
}


class StopReason(enum.Enum):
    LAST_LEAVE = "last_leave"
    IDLE = "idle"
    SHUTDOWN = "shutdown"


@dataclass(slots=True)
class _Client:
    nack_capable: bool
    joined_at_slot: int  # carousel sends counted when the client joined
    last_seen: float
    parity: bool = False


@dataclass(frozen=True, slots=True)
class NackOutcome:
    queued: int
    aggregated: int  # already waiting in the queue
    suppressed: int  # sent within the suppression window


@dataclass(frozen=True, slots=True)
class NextPage:
    index: int  # the page; for a parity symbol, the block (0-based)
    repair: bool
    speculative: bool = False  # a repeat of a recent repair nobody asked for again yet
    symbol: int | None = None  # a parity symbol's number (parity.py), else None
    carousel_done: bool = False  # a repair sent while the carousel is paused


class CastCore:
    def __init__(
        self,
        *,
        cast_id: int,
        pages: int,
        idle_loops: int,
        loop_s: float,
        now: float,
        suppress_s: float = 0.08,
        speculate_s: float = 0.3,
        block_pages: int = BLOCK_PAGES,
    ) -> None:
        if pages < 0:
            raise LocalProtocolError("pages must be ≥ 0")
        if idle_loops < 1:
            raise LocalProtocolError("idle_loops must be ≥ 1")
        self.cast_id = cast_id
        self.pages = pages
        self.idle_loops = idle_loops
        self.loop_s = max(loop_s, 1.0)
        self.suppress_s = suppress_s
        self.state = CastState.RUNNING
        self.stop_reason: StopReason | None = None
        self._clients: dict[str, _Client] = {}
        self._spec_clients = 0
        self._carousel_pos = 1
        self._carousel_sent = 0
        self._carousel_until = 0
        self._repair_queue: deque[int] = deque()
        self._recent_repairs: deque[tuple[int, float]] = deque(maxlen=4096)
        self._last_nack = -1e9
        self._latest_join = now
        self.speculate_s = speculate_s
        self.retry_at: float | None = None
        self._queued = bytearray(pages + 1)
        self._last_sent = array("d", bytes(8 * (pages + 1)))
        self._sent_ever = bytearray(pages + 1)
        self._wraps_idle = 0
        self._paused_since: float | None = None
        self._paused_idle_s = 0.0
        self._started = now
        self._last_activity = now
        self.block_pages = block_pages
        self._parity_next: dict[int, int] = {}  # block → next unused symbol number
        self._parity_pending: dict[int, int] = {}  # block → symbols queued, not yet sent
        self._parity_queue: deque[int] = deque()  # blocks with pending symbols, FIFO
        self._parity_sent: dict[int, list[float]] = {}  # block → recent send times
        self._recent_parity: deque[tuple[int, float]] = deque(maxlen=4096)

    # -- clients ---------------------------------------------------------------------------

    @property
    def clients(self) -> int:
        return len(self._clients)

    @property
    def repair_backlog(self) -> int:
        return len(self._repair_queue)

    def has_client(self, token: str) -> bool:
        return token in self._clients

    def _event(self, event: CastEvent) -> None:
        try:
            self.state = _TRANSITIONS[(self.state, event)]
        except KeyError:
            raise LocalProtocolError(f"{event.value} in state {self.state.value}") from None

    def _activity(self, now: float) -> None:
        self._last_activity = now
        self._wraps_idle = 0
        self._paused_idle_s = 0.0
        if self._paused_since is not None:
            self._paused_since = now

    def join(self, token: str, now: float, *, nack_capable: bool, parity: bool = False) -> None:
        if token in self._clients:
            raise LocalProtocolError("duplicate token")
        self._event(CastEvent.JOIN)
        self._clients[token] = _Client(
            nack_capable, self._carousel_sent, now, parity=parity and nack_capable
        )
        self._latest_join = now
        if nack_capable:
            self._carousel_until = max(self._carousel_until, self._carousel_sent + self.pages)
        else:
            self._spec_clients += 1
        self._activity(now)

    def leave(self, token: str, now: float) -> bool:
        """Remove a client. Unknown tokens change nothing and return False."""
        client = self._clients.get(token)
        if client is None or self.state is not CastState.RUNNING:
            return False
        del self._clients[token]
        if not client.nack_capable:
            self._spec_clients -= 1
        self._carousel_until = max(
            (c.joined_at_slot + self.pages for c in self._clients.values() if c.nack_capable),
            default=0,
        )
        self._activity(now)
        if not self._clients:
            self._event(CastEvent.LAST_LEAVE)
            self.stop_reason = StopReason.LAST_LEAVE
        else:
            self._event(CastEvent.LEAVE)
        return True

    def nack(self, token: str, report: NackReport, now: float) -> NackOutcome | None:
        """Take a client's report. Unknown tokens change nothing and return None."""
        client = self._clients.get(token)
        if client is None or self.state is not CastState.RUNNING:
            return None
        self._event(CastEvent.NACK)
        client.last_seen = now
        if report.missing:
            self._last_nack = now
        self._activity(now)
        if client.parity:
            return self._parity_nack(report.missing, now)
        counts = [0, 0, 0]
        for first, last in report.missing:
            self._queue_pages(first, last, now, counts)
        return NackOutcome(*counts)

    def _queue_pages(self, first: int, last: int, now: float, counts: list[int]) -> None:
        """Queue pages first..last for resending; counts += (queued, aggregated, suppressed)."""
        # Clients re-ask for what they still lack; most of it is already queued, so count
        # that at C speed and visit only the pages that are not.
        horizon = now - self.suppress_s
        queued_map, sent_ever, last_sent = self._queued, self._sent_ever, self._last_sent
        end = last + 1
        counts[1] += queued_map.count(1, first, end)
        index = queued_map.find(0, first, end)
        carousel = self._carousel_active()
        while index >= 0:
            if not sent_ever[index] and carousel:
                # Never sent yet: the running carousel brings it (a client that asks for
                # everything early, e.g. after a slow start, must not turn the whole file
                # into repairs that crowd the carousel out for everyone).
                counts[2] += 1
            elif sent_ever[index] and last_sent[index] > horizon:
                counts[2] += 1
            else:
                queued_map[index] = 1
                self._repair_queue.append(index)
                counts[0] += 1
            index = queued_map.find(0, index + 1, end)

    def _parity_nack(self, missing: list[Range], now: float) -> NackOutcome:
        """A parity client's report: per block, the symbols it still needs."""
        counts = [0, 0, 0]
        needs: dict[int, int] = {}
        bp = self.block_pages
        for first, last in missing:
            block = block_of(first, bp)
            while True:
                start = block * bp + 1
                lo, hi = max(first, start), min(last, start + bp - 1)
                needs[block] = needs.get(block, 0) + hi - lo + 1
                if hi >= last:
                    break
                block += 1
        horizon = now - self.suppress_s
        carousel = self._carousel_active()
        for block, need in needs.items():
            start, k = block_span(block, self.pages, bp)
            if carousel and self._sent_ever.find(0, start, start + k) >= 0:
                counts[2] += need  # not all sent yet: the carousel comes first (as above)
                continue
            if need >= k:
                # The whole block: the pages themselves cost the same and encode nothing.
                self._queue_pages(start, start + k - 1, now, counts)
                continue
            sent = self._parity_sent.get(block)
            if sent:
                sent[:] = [t for t in sent if t > horizon]
            in_flight = self._parity_pending.get(block, 0) + (len(sent) if sent else 0)
            more = need - in_flight
            counts[2] += min(need, in_flight)
            if more <= 0:
                continue
            nxt = self._parity_next.get(block, k) + self._parity_pending.get(block, 0)
            if nxt + more > SYMBOLS:
                # Out of parity symbols (a block lost >200 times over): resend its pages.
                self._queue_pages(start, start + k - 1, now, counts)
                continue
            if not self._parity_pending.get(block):
                self._parity_queue.append(block)
            self._parity_pending[block] = self._parity_pending.get(block, 0) + more
            counts[0] += more
        return NackOutcome(*counts)

    # -- sending ---------------------------------------------------------------------------

    def _carousel_active(self) -> bool:
        return self.pages > 0 and (
            self._spec_clients > 0 or self._carousel_sent < self._carousel_until
        )

    def next_page(self, now: float) -> NextPage | None:
        """The page to send now, or None when the cast is paused or stopped."""
        if self.state is not CastState.RUNNING:
            return None
        page: NextPage | None = None
        while self._repair_queue:
            index = self._repair_queue.popleft()
            if self._queued[index]:
                self._queued[index] = 0
                page = NextPage(index, True, carousel_done=not self._carousel_active())
                break
        if page is None and self._parity_queue:
            page = self._next_parity()
        while page is None and self._carousel_active():
            index = self._carousel_pos
            self._queued[index] = 0  # the carousel send satisfies a queued repair
            self._carousel_sent += 1
            self._carousel_pos = index + 1
            if self._carousel_pos > self.pages:
                self._carousel_pos = 1
                self._wraps_idle += 1
            if (
                self._spec_clients == 0
                and self._sent_ever[index]
                and self._last_sent[index] > self._latest_join
            ):
                # Every client now joined was there when this page went out (as a repair,
                # ahead of the carousel): those that lost it ask for it again.
                continue
            page = NextPage(index, False)
        if page is None:
            page = self._speculate(now)
        if page is None:
            if self._paused_since is None:
                self._paused_since = now
            return None
        if self._paused_since is not None:
            self._paused_idle_s += now - self._paused_since
            self._paused_since = None
        if page.symbol is not None:
            self._parity_sent.setdefault(page.index, []).append(now)
            if not page.speculative and self.speculate_s > 0:
                self._recent_parity.append((page.index, now))
            return page
        self._last_sent[page.index] = now
        self._sent_ever[page.index] = 1
        if page.repair and not page.speculative and self.speculate_s > 0:
            self._recent_repairs.append((page.index, now))
        return page

    def _take_symbol(self, block: int) -> int | None:
        _, k = block_span(block, self.pages, self.block_pages)
        number = self._parity_next.get(block, k)
        if number >= SYMBOLS:
            return None
        self._parity_next[block] = number + 1
        return number

    def _next_parity(self) -> NextPage | None:
        """The next queued parity symbol (a block's symbols go out back to back)."""
        while self._parity_queue:
            block = self._parity_queue[0]
            pending = self._parity_pending.get(block, 0)
            number = self._take_symbol(block) if pending else None
            if number is None or pending <= 1:
                self._parity_queue.popleft()
                self._parity_pending.pop(block, None)
            else:
                self._parity_pending[block] = pending - 1
            if number is not None:
                return NextPage(
                    block, True, symbol=number, carousel_done=not self._carousel_active()
                )
        return None

    def _speculate(self, now: float) -> NextPage | None:
        """While clients are still asking (a NACK within ``speculate_s``) and nothing else
        is due, repeat each recent repair once, ``suppress_s`` after it went out: the link
        would idle between rounds of repair anyway, and a receiver that lost the repair
        then needs no further round."""
        self.retry_at = None
        if now - self._last_nack > self.speculate_s:
            self._recent_repairs.clear()
            self._recent_parity.clear()
            return None
        while self._recent_parity:
            block, sent_at = self._recent_parity[0]
            sent = self._parity_sent.get(block)
            if not sent or sent[-1] != sent_at or now - sent_at > self.speculate_s:
                self._recent_parity.popleft()  # more went out meanwhile, or too old
                continue
            if sent_at > now - self.suppress_s:
                self.retry_at = sent_at + self.suppress_s
                break
            self._recent_parity.popleft()
            number = self._take_symbol(block)
            if number is not None:
                return NextPage(block, True, speculative=True, symbol=number, carousel_done=True)
        while self._recent_repairs:
            index, sent_at = self._recent_repairs[0]
            if self._last_sent[index] != sent_at or now - sent_at > self.speculate_s:
                self._recent_repairs.popleft()  # sent again meanwhile, or too old
                continue
            if sent_at > now - self.suppress_s:
                self.retry_at = sent_at + self.suppress_s
                return None
            self._recent_repairs.popleft()
            return NextPage(index, True, speculative=True, carousel_done=True)
        return None

    @property
    def paused(self) -> bool:
        return self._paused_since is not None

    def idle_loops_elapsed(self, now: float) -> float:
        paused = self._paused_idle_s
        if self._paused_since is not None:
            paused += now - self._paused_since
        loops = self._wraps_idle + paused / self.loop_s
        # An iteration counts for at least loop_s (≥ 1 s) of wall time: a tiny file wraps
        # in microseconds, but a client binds the group only a round trip after its join.
        return min(loops, (now - self._last_activity) / self.loop_s)

    def poll(self, now: float) -> CastState:
        """Check the idle rule; returns the (possibly new) state."""
        if self.state is CastState.RUNNING and self.idle_loops_elapsed(now) >= self.idle_loops:
            self._event(CastEvent.IDLE)
            self.stop_reason = StopReason.IDLE
        return self.state

    def idle_deadline(self, now: float) -> float:
        """When, if nothing happens and the cast stays paused, the idle rule fires."""
        remaining = self.idle_loops - self.idle_loops_elapsed(now)
        return now + max(0.0, remaining) * self.loop_s

    def shutdown(self) -> None:
        if self.stop_reason is None:
            self.stop_reason = StopReason.SHUTDOWN
        self._event(CastEvent.SHUTDOWN)
