"""The leader's bookkeeping (sans-I/O): producer deduplication and the commit rule.

:class:`DedupeTable` makes producer retries idempotent. A producer names itself
(``producer_id``) and numbers its batches (``batch_sequence``, +1 per new batch, the same
number when it sends a batch again). The table remembers, per producer, what the last
``window`` sequences were stored as; a batch whose sequence is remembered is answered with
the original seqnos and not appended again. A sequence below the remembered window is
refused (:class:`DedupeWindowError`): it may have been stored, and appending it again could
duplicate it. The window must be at least the producer's in-flight window (the SDK's default
is 16 batches; the table keeps 1024).

:class:`CommitTracker` is the commit rule: the commit seqno is the highest seqno held by
``min_insync`` copies, the leader's included — and never above the leader's own held seqno,
so everything committed survives a restart of the leader. It never goes backwards.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from boomscooter.errors import BoomscooterError, ConfigError

DEFAULT_DEDUPE_WINDOW = 1024
DEFAULT_MAX_PRODUCERS = 65_536
MAX_PRODUCER_ID_BYTES = 128


class DedupeWindowError(BoomscooterError):
    """A batch's sequence is older than the dedupe window: it cannot be told apart from a
    batch already stored, so it is refused rather than risk storing it twice."""

    grpc_status = "FAILED_PRECONDITION"


@dataclass(frozen=True, slots=True)
class Appended:
    """Where a batch went: its seqnos ``base_seqno`` … ``base_seqno + record_count - 1``."""

    base_seqno: int
    record_count: int
    epoch: int

    @property
    def last_seqno(self) -> int:
        return self.base_seqno + self.record_count - 1


@dataclass(frozen=True, slots=True)
class StreamSession:
    """The multicast stream a node's subscribers (and replicas) receive: the leader's."""

    group: str
    port: int
    cast_id: int
    page_size_bytes: int
    epoch: int
    interface_hint: str
    heartbeat_ms: int
    source_port: int


class _Producer:
    __slots__ = ("highest", "order", "stored")

    def __init__(self) -> None:
        self.highest = 0
        self.stored: dict[int, Appended] = {}
        self.order: list[int] = []  # min-heap of the stored sequences (may hold stale ones)


class DedupeTable:
    """Per producer, the last ``window`` batch sequences and where they were stored."""

    def __init__(
        self, *, window: int = DEFAULT_DEDUPE_WINDOW, max_producers: int = DEFAULT_MAX_PRODUCERS
    ) -> None:
        if window < 1 or max_producers < 1:
            raise ConfigError("dedupe window and producer count must be positive")
        self.window = window
        self.max_producers = max_producers
        self._producers: OrderedDict[str, _Producer] = OrderedDict()

    def __len__(self) -> int:
        return len(self._producers)

    @staticmethod
    def check_id(producer_id: str) -> None:
        if len(producer_id.encode("utf-8", "surrogatepass")) > MAX_PRODUCER_ID_BYTES:
            raise ConfigError(f"producer_id longer than {MAX_PRODUCER_ID_BYTES} bytes")

    def lookup(self, producer_id: str, batch_sequence: int) -> Appended | None:
        """The earlier outcome of this batch, or None when it is new. Raises
        :class:`DedupeWindowError` for a sequence too old to decide."""
        producer = self._producers.get(producer_id)
        if producer is None:
            return None
        self._producers.move_to_end(producer_id)
        found = producer.stored.get(batch_sequence)
        if found is not None:
            return found
        if batch_sequence <= producer.highest - self.window:
            raise DedupeWindowError(
                f"batch_sequence {batch_sequence} of producer {producer_id!r} is older than "
                f"the dedupe window (latest {producer.highest}, window {self.window})"
            )
        return None

    def holds(self, producer_id: str, batch_sequence: int) -> bool:
        producer = self._producers.get(producer_id)
        return producer is not None and batch_sequence in producer.stored

    def add(self, producer_id: str, batch_sequence: int, appended: Appended) -> None:
        producer = self._producers.get(producer_id)
        if producer is None:
            producer = self._producers[producer_id] = _Producer()
            while len(self._producers) > self.max_producers:
                self._producers.popitem(last=False)
        else:
            self._producers.move_to_end(producer_id)
        if batch_sequence not in producer.stored:
            heapq.heappush(producer.order, batch_sequence)
        producer.stored[batch_sequence] = appended
        producer.highest = max(producer.highest, batch_sequence)
        floor = producer.highest - self.window
        stored, order = producer.stored, producer.order
        # Evict by sequence, lowest first (not by arrival: retries arrive out of order).
        while order and (order[0] <= floor or len(stored) > self.window):
            stored.pop(heapq.heappop(order), None)

    def forget_after(self, seqno: int) -> None:
        """Drop every entry for records after ``seqno`` (the log was truncated there)."""
        for producer in self._producers.values():
            for sequence in [s for s, a in producer.stored.items() if a.last_seqno > seqno]:
                del producer.stored[sequence]
            producer.order = sorted(producer.stored)

    def items(self) -> Iterator[tuple[str, int, Appended]]:
        for producer_id, producer in self._producers.items():
            for sequence, appended in producer.stored.items():
                yield producer_id, sequence, appended

    def recent(self, per_producer: int) -> Iterator[tuple[str, int, Appended]]:
        """Each producer's ``per_producer`` highest sequences (what a retry can resend)."""
        for producer_id, producer in self._producers.items():
            for sequence in sorted(producer.stored)[-per_producer:]:
                yield producer_id, sequence, producer.stored[sequence]


LEADER_COPY = ""


class CommitTracker:
    """The commit seqno: the highest seqno held by ``min_insync`` copies.

    ``held`` maps each copy (``""`` is the leader) to the highest seqno it holds (durably,
    as its fsync policy defines it). Copies that are not in sync are simply absent.
    """

    def __init__(self, min_insync: int, *, commit_seqno: int = 0) -> None:
        if min_insync < 1:
            raise ConfigError(f"--min-insync must be at least 1, got {min_insync}")
        self.min_insync = min_insync
        self.commit_seqno = commit_seqno
        self._held: dict[str, int] = {}

    def held(self, copy: str, seqno: int) -> bool:
        """Record that ``copy`` holds everything up to ``seqno``; True if commit advanced."""
        if seqno <= self._held.get(copy, -1):
            return False
        self._held[copy] = seqno
        return self._recompute()

    def remove(self, copy: str) -> None:
        self._held.pop(copy, None)

    def copies(self) -> int:
        return len(self._held)

    def _recompute(self) -> bool:
        if len(self._held) < self.min_insync:
            return False
        candidate = sorted(self._held.values(), reverse=True)[self.min_insync - 1]
        # Never past the leader's own durable copy: a leader restarting after a power loss
        # keeps everything committed, and replicas reconciling with it truncate nothing
        # that was acknowledged (found by the replication simulation).
        candidate = min(candidate, self._held.get(LEADER_COPY, 0))
        if candidate > self.commit_seqno:
            self.commit_seqno = candidate
            return True
        return False
