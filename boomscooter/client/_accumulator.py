"""The producer's bookkeeping, sans-I/O: batching, the in-flight window, retries.

Theory of operation. Records arrive one by one (:meth:`Accumulator.append`) and collect in
the *open* batch until it is full (``max_batch_records``, or ``max_batch_bytes`` of the
encoded batch: the exact size is tracked as records arrive, header and per-record columns
included) or its linger deadline passes (:meth:`Accumulator.close_due`). A closed batch
gets the next ``batch_sequence`` (1, 2, …), is encoded once (the leader restamps base
seqno, epoch and CRC, so the placeholders 1 and 0 are used) and joins the *queue*. The
shell takes queued batches with :meth:`Accumulator.next_to_send` while the *window* (sent,
unresolved batches) holds fewer than ``max_in_flight``; it reports each completed write
(:meth:`Accumulator.on_written`: a batch at ack level NONE is resolved then, to ``None``)
and each response (:meth:`Accumulator.on_ack`, :meth:`Accumulator.on_rejection`).
Responses are matched by sequence and may arrive in any order.

Backpressure: :attr:`Accumulator.accepting` is false while a closed batch waits for room
in the window; the shell's ``send`` waits then, so memory stays bounded by about
``max_in_flight + 2`` batches.

Retries are idempotent: a broken stream (:meth:`Accumulator.on_disconnect`) puts every
unresolved batch back at the front of the queue, in sequence order, to be sent again
with the same sequence (the leader answers a duplicate with the original seqnos). From
the first failure, ``retry_timeout_s`` bounds how long batches may wait for a working
stream; :meth:`Accumulator.expire` then fails them all with ``ServerUnavailableError``.
The deadline is cleared by the next acknowledgement (proof the stream works).

A rejected batch (:meth:`Accumulator.on_rejection`, given the already translated client
error) either ends (non-retriable errors, ``ExpectedSeqnoError``), or asks the shell to
reconnect (retriable errors) or to follow the leader (``NotLeaderError`` naming one).

The core never looks at the clock: every method that needs the time takes ``now`` (seconds
on a monotonic clock). Handles (the shell's futures) are opaque to it; it hands them back
in :class:`Completion` values for the shell to resolve.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from boomscooter.errors import (
    BoomscooterError,
    ClientError,
    ConfigError,
    ExpectedSeqnoError,
    NotLeaderError,
    RequestError,
    ServerUnavailableError,
)
from boomscooter.storage.batch import (
    HEADER_BYTES,
    MAX_CHANNEL_BYTES,
    RECORD_OVERHEAD_BYTES,
    U64_MAX,
    Entry,
    encode_batch,
)

H = TypeVar("H")

# Extra bytes per record when a batch has a channel column / a key column.
CHANNEL_COLUMN_BYTES = 2
KEY_COLUMN_BYTES = 4

# Flags returned by Accumulator.append.
OPENED = 1  # the record opened a new batch: arm its linger timer
CLOSED = 2  # a batch was closed and queued: wake the sender


class AckLevel(enum.Enum):
    """When the leader acknowledges a batch (``ProduceRequest.ack_level``)."""

    NONE = "none"
    LEADER = "leader"
    QUORUM = "quorum"

    @classmethod
    def parse(cls, value: str | AckLevel) -> AckLevel:
        if isinstance(value, AckLevel):
            return value
        try:
            return cls(value.lower())
        except (ValueError, AttributeError):
            raise ConfigError(f"acks must be none, leader or quorum, not {value!r}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class ProducerSettings:
    """The producer's tunables, checked once."""

    ack_level: AckLevel = AckLevel.LEADER
    linger_s: float = 0.002
    max_batch_records: int = 10_000
    max_batch_bytes: int = 1 << 20
    max_in_flight: int = 16
    retry_timeout_s: float = 30.0
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    leader_timeout_s: float = 2.0  # batches unanswered and no keepalive: the leader is lost

    def __post_init__(self) -> None:
        if not self.linger_s >= 0:
            raise ConfigError(f"linger must be >= 0, not {self.linger_s}")
        if self.max_batch_records < 1:
            raise ConfigError(f"max_batch_records must be >= 1, not {self.max_batch_records}")
        minimum = HEADER_BYTES + RECORD_OVERHEAD_BYTES
        if not minimum <= self.max_batch_bytes <= 0xFFFFFFFF:
            raise ConfigError(
                f"max_batch_bytes must be in {minimum}..{0xFFFFFFFF}, not {self.max_batch_bytes}"
            )
        if self.max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be >= 1, not {self.max_in_flight}")
        if not self.retry_timeout_s >= 0:
            raise ConfigError(f"retry_timeout_s must be >= 0, not {self.retry_timeout_s}")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ConfigError("backoff must satisfy 0 < initial <= max")
        if not self.leader_timeout_s >= 1.0:
            raise ConfigError(f"leader_timeout_s must be >= 1, not {self.leader_timeout_s}")


class ProduceResult(NamedTuple):
    """Where the leader put a batch: seqnos ``base_seqno .. base_seqno + record_count - 1``."""

    base_seqno: int
    record_count: int
    epoch: int
    duplicate: bool
    commit_seqno: int = 0


class Ack(NamedTuple):
    """A ``ProduceAck`` as a domain value (converted at the rpc edge)."""

    batch_sequence: int
    base_seqno: int
    record_count: int
    epoch: int
    commit_seqno: int
    duplicate: bool


class OutBatch(Generic[H]):
    """A closed batch: its sequence, encoded bytes and the handles waiting for it.

    ``handles`` are the per-record handles of :meth:`Accumulator.append` (resolved to the
    record's seqno); ``batch_handle`` is the one handle of an explicit batch
    (:meth:`Accumulator.add_batch`, resolved to a :class:`ProduceResult`)."""

    __slots__ = (
        "batch_handle",
        "data",
        "expected_first_seqno",
        "handles",
        "record_count",
        "sends",
        "sequence",
    )

    def __init__(
        self,
        sequence: int,
        data: bytes,
        record_count: int,
        handles: list[H],
        batch_handle: H | None,
        expected_first_seqno: int | None,
    ) -> None:
        self.sequence = sequence
        self.data = data
        self.record_count = record_count
        self.handles = handles
        self.batch_handle = batch_handle
        self.expected_first_seqno = expected_first_seqno
        self.sends = 0  # how often it was handed to a stream (> 1: a retry)

    def __repr__(self) -> str:
        return f"OutBatch(sequence={self.sequence}, records={self.record_count})"


class Completion(NamedTuple, Generic[H]):
    """A batch is resolved: with ``result`` (``None`` at ack level NONE) or ``error``."""

    batch: OutBatch[H]
    result: ProduceResult | None
    error: ClientError | None


class Reconnect(NamedTuple):
    """The stream cannot go on (a retriable rejection): reconnect, to ``address`` if set."""

    address: str | None
    error: ClientError


class _Open(Generic[H]):
    """The batch being filled; sizes are of its encoded form."""

    __slots__ = (
        "count",
        "deadline",
        "entries",
        "handles",
        "has_channels",
        "has_keys",
        "per_record",
        "size",
    )

    def __init__(self, deadline: float) -> None:
        self.entries: list[Entry] = []
        self.handles: list[H] = []
        self.count = 0
        self.size = HEADER_BYTES  # of the batch encoded now
        self.per_record = RECORD_OVERHEAD_BYTES  # fixed column bytes per record now
        self.has_channels = False
        self.has_keys = False
        self.deadline = deadline


def _channel_bytes(channel: str) -> int:
    return len(channel) if channel.isascii() else len(channel.encode("utf-8"))


def entry_size(entry: Entry) -> int:
    """The bytes ``entry`` adds to a batch whose columns it alone decides (no other record
    has a channel or key); ``HEADER_BYTES + entry_size(e)`` is a one-record batch."""
    size = RECORD_OVERHEAD_BYTES + len(entry.payload)
    if entry.channel is not None:
        size += CHANNEL_COLUMN_BYTES + _channel_bytes(entry.channel)
    if entry.key is not None:
        size += KEY_COLUMN_BYTES + len(entry.key)
    return size


def check_entry(entry: Entry, max_batch_bytes: int) -> None:
    """Raise :class:`RequestError` for an entry that can never be sent (wrong types, a field
    out of range, larger than a batch may be) — before it joins a batch, so a bad record
    never fails its neighbours."""
    ts, payload, channel, key = entry
    if type(payload) is not bytes:
        raise RequestError(f"payload must be bytes, not {type(payload).__name__}")
    if type(ts) is not int or not 0 <= ts <= U64_MAX:
        raise RequestError(f"timestamp_ms must be an int in 0..2**64-1, not {ts!r}")
    if channel is not None:
        if type(channel) is not str:
            raise RequestError(f"channel must be str or None, not {type(channel).__name__}")
        if _channel_bytes(channel) > MAX_CHANNEL_BYTES:
            raise RequestError(f"channel longer than {MAX_CHANNEL_BYTES} bytes")
    if key is not None and type(key) is not bytes:
        raise RequestError(f"key must be bytes or None, not {type(key).__name__}")
    size = HEADER_BYTES + entry_size(entry)
    if size > max_batch_bytes:
        raise RequestError(
            f"record of {size} encoded bytes (batch header included) exceeds "
            f"max_batch_bytes={max_batch_bytes}",
            code="RESOURCE_EXHAUSTED",
        )


class Accumulator(Generic[H]):
    """Batches, window and retries of one producer (see the module docstring)."""

    def __init__(self, settings: ProducerSettings) -> None:
        self.settings = settings
        self._max_records = settings.max_batch_records
        self._max_bytes = settings.max_batch_bytes
        self._linger_s = settings.linger_s
        self._ack_none = settings.ack_level is AckLevel.NONE
        self._open: _Open[H] | None = None
        self._queue: deque[OutBatch[H]] = deque()
        # False while a closed batch waits for room in the window (backpressure): a plain
        # attribute, read once per record.
        self.accepting = True
        self._inflight: dict[int, OutBatch[H]] = {}  # insertion order = sequence order
        self._last_sequence = 0
        self._retry_deadline: float | None = None
        self._backoff_attempts = 0
        self._first_error: ClientError | None = None

    # -- state -------------------------------------------------------------------------

    @property
    def last_sequence(self) -> int:
        """The sequence of the newest closed batch (0: none yet)."""
        return self._last_sequence

    @property
    def open_deadline(self) -> float | None:
        return None if self._open is None else self._open.deadline

    @property
    def retry_deadline(self) -> float | None:
        return self._retry_deadline

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """Nothing open, queued or in flight."""
        return self._open is None and not self._queue and not self._inflight

    def lowest_unresolved(self) -> int | None:
        """The smallest sequence of a closed batch not yet resolved (``None``: all are)."""
        if self._inflight:
            return next(iter(self._inflight))
        if self._queue:
            return self._queue[0].sequence
        return None

    def resolved_through(self, sequence: int) -> bool:
        """Whether every batch up to ``sequence`` is resolved (acknowledged or failed)."""
        lowest = self.lowest_unresolved()
        return lowest is None or lowest > sequence

    def take_first_error(self) -> ClientError | None:
        """The first batch failure since the last call (what ``flush`` raises)."""
        error, self._first_error = self._first_error, None
        return error

    # -- accumulating ------------------------------------------------------------------

    def append(self, entry: Entry, handle: H, now: float) -> int:
        """Add a record (already passed :func:`check_entry`); returns :data:`OPENED` and/or
        :data:`CLOSED` flags. Per-record work is a few additions on the common path (no
        channel, no key, the batch not full)."""
        flags = 0
        ob = self._open
        if ob is None:
            ob = self._open = _Open(now + self._linger_s)
            flags = OPENED
        if entry[2] is None and entry[3] is None:
            size = ob.size + ob.per_record + len(entry[1])
            if size <= self._max_bytes:
                ob.entries.append(entry)
                ob.handles.append(handle)
                ob.size = size
                ob.count += 1
                if ob.count >= self._max_records:
                    self._close_open()
                    flags |= CLOSED
                return flags
            if ob.count == 0:  # check_entry was skipped: refuse rather than send
                self._open = None
                raise RequestError("record exceeds max_batch_bytes", code="RESOURCE_EXHAUSTED")
        elif not self._fits(ob, entry):
            if ob.count == 0:
                self._open = None
                raise RequestError("record exceeds max_batch_bytes", code="RESOURCE_EXHAUSTED")
        else:
            self._add_slow(ob, entry, handle)
            if ob.count >= self._max_records:
                self._close_open()
                flags |= CLOSED
            return flags
        # The open batch is full: close it, and start the next one with this record.
        self._close_open()
        ob = self._open = _Open(now + self._linger_s)
        if not self._fits(ob, entry):
            self._open = None
            raise RequestError("record exceeds max_batch_bytes", code="RESOURCE_EXHAUSTED")
        self._add_slow(ob, entry, handle)
        flags |= CLOSED | OPENED
        if ob.count >= self._max_records:
            self._close_open()
        return flags

    @staticmethod
    def _grown(ob: _Open[H], entry: Entry) -> tuple[int, int, bool, bool]:
        """Size and column bytes of ``ob`` with ``entry`` added (a channel or key column
        appearing costs its bytes for every record already in the batch)."""
        channel, key = entry[2], entry[3]
        has_channels = ob.has_channels or channel is not None
        has_keys = ob.has_keys or key is not None
        per_record = RECORD_OVERHEAD_BYTES
        if has_channels:
            per_record += CHANNEL_COLUMN_BYTES
        if has_keys:
            per_record += KEY_COLUMN_BYTES
        var = len(entry[1])
        if channel is not None:
            var += _channel_bytes(channel)
        if key is not None:
            var += len(key)
        size = ob.size + (per_record - ob.per_record) * ob.count + per_record + var
        return size, per_record, has_channels, has_keys

    def _fits(self, ob: _Open[H], entry: Entry) -> bool:
        return self._grown(ob, entry)[0] <= self._max_bytes

    def _add_slow(self, ob: _Open[H], entry: Entry, handle: H) -> None:
        ob.size, ob.per_record, ob.has_channels, ob.has_keys = self._grown(ob, entry)
        ob.entries.append(entry)
        ob.handles.append(handle)
        ob.count += 1

    def add_batch(
        self,
        entries: Sequence[Entry],
        handle: H,
        *,
        expected_first_seqno: int | None = None,
    ) -> None:
        """Queue ``entries`` as one batch of their own (after the open batch, which is
        closed first to keep the order). Raises :class:`RequestError` when it breaks the
        limits or cannot be encoded."""
        if not entries:
            raise RequestError("a batch holds at least one record")
        if len(entries) > self._max_records:
            raise RequestError(
                f"batch of {len(entries)} records exceeds max_batch_records={self._max_records}",
                code="RESOURCE_EXHAUSTED",
            )
        if expected_first_seqno is not None and not 1 <= expected_first_seqno <= U64_MAX:
            raise RequestError(f"expected_first_seqno {expected_first_seqno} out of range")
        for entry in entries:
            check_entry(entry, self._max_bytes)
        data = self._encode(entries)
        if len(data) > self._max_bytes:
            raise RequestError(
                f"batch of {len(data)} bytes exceeds max_batch_bytes={self._max_bytes}",
                code="RESOURCE_EXHAUSTED",
            )
        if self._open is not None:
            self._close_open()
        self._last_sequence += 1
        self._queue.append(
            OutBatch(self._last_sequence, data, len(entries), [], handle, expected_first_seqno)
        )
        self.accepting = False

    def close_due(self, now: float) -> bool:
        """Close the open batch if its linger deadline has passed; True if one closed."""
        if self._open is not None and now >= self._open.deadline:
            self._close_open()
            return True
        return False

    def close_open(self) -> int:
        """Close the open batch now (``flush``); returns :attr:`last_sequence`."""
        if self._open is not None:
            self._close_open()
        return self._last_sequence

    @staticmethod
    def _encode(entries: Sequence[Entry]) -> bytes:
        try:
            data = encode_batch(entries, base_seqno=1, epoch=0).data
        except BoomscooterError as exc:
            raise RequestError(f"records cannot be encoded: {exc}") from None
        assert isinstance(data, bytes)
        return data

    def _close_open(self) -> None:
        ob = self._open
        assert ob is not None and ob.count > 0
        self._open = None
        data = self._encode(ob.entries)
        self._last_sequence += 1
        self._queue.append(OutBatch(self._last_sequence, data, ob.count, ob.handles, None, None))
        self.accepting = False

    # -- sending -----------------------------------------------------------------------

    def next_to_send(self) -> OutBatch[H] | None:
        """The next batch to write to the stream, if the window has room."""
        if not self._queue or len(self._inflight) >= self.settings.max_in_flight:
            return None
        batch = self._queue.popleft()
        self.accepting = not self._queue
        batch.sends += 1
        self._inflight[batch.sequence] = batch
        return batch

    def on_written(self, batch: OutBatch[H]) -> Completion[H] | None:
        """The stream took ``batch``; at ack level NONE that resolves it (to ``None``)."""
        if self._ack_none and self._inflight.pop(batch.sequence, None) is not None:
            return Completion(batch, None, None)
        return None

    # -- responses ---------------------------------------------------------------------

    def _take(self, sequence: int) -> OutBatch[H] | None:
        batch = self._inflight.pop(sequence, None)
        if batch is None:  # an answer from an old stream for a batch queued again
            for i, queued in enumerate(self._queue):
                if queued.sequence == sequence:
                    del self._queue[i]
                    self.accepting = not self._queue
                    return queued
        return batch

    def on_ack(self, ack: Ack) -> Completion[H] | None:
        """A batch was appended; ``None`` for an unknown (already resolved) sequence."""
        batch = self._take(ack.batch_sequence)
        if batch is None:
            return None
        self._retry_deadline = None
        self._backoff_attempts = 0
        if ack.record_count != batch.record_count:
            error = RequestError(
                f"leader acknowledged {ack.record_count} records of a "
                f"{batch.record_count}-record batch",
                code="INTERNAL",
            )
            self._note_error(error)
            return Completion(batch, None, error)
        result = ProduceResult(
            ack.base_seqno, ack.record_count, ack.epoch, ack.duplicate, ack.commit_seqno
        )
        return Completion(batch, result, None)

    def on_rejection(self, sequence: int, error: ClientError) -> Completion[H] | Reconnect | None:
        """A batch failed in-band. Ends it (:class:`Completion`), or asks for a reconnect
        (:class:`Reconnect`; the shell then calls :meth:`on_disconnect`), or ``None`` for
        an unknown sequence."""
        if isinstance(error, NotLeaderError):
            return Reconnect(error.leader_address or None, error)
        if error.retriable and not isinstance(error, ExpectedSeqnoError):
            return Reconnect(None, error)
        batch = self._take(sequence)
        if batch is None:
            if self._ack_none:  # resolved when written: the next flush reports it
                self._note_error(error)
            return None
        self._note_error(error)
        return Completion(batch, None, error)

    def _note_error(self, error: ClientError) -> None:
        if self._first_error is None:
            self._first_error = error

    # -- failures ----------------------------------------------------------------------

    def on_disconnect(self, now: float) -> None:
        """The stream broke: every unresolved batch goes back to the front of the queue, in
        sequence order, to be sent again; the retry deadline starts if not running."""
        if self._inflight:
            self._queue.extendleft(reversed(self._inflight.values()))
            self._inflight.clear()
            self.accepting = not self._queue
        if self._retry_deadline is None:
            self._retry_deadline = now + self.settings.retry_timeout_s

    def leader_lost(self, now: float, heard_at: float) -> bool:
        """Batches wait for an answer and the leader said nothing — no ack, no keepalive
        (it sends one every 0.5 s) — for ``leader_timeout_s``: frozen, or its host gone
        without a reset. The stream is then given up (its batches are sent again)."""
        return bool(self._inflight) and now - heard_at >= self.settings.leader_timeout_s

    def redirected(self) -> None:
        """The stream was sent to the node a NOT_LEADER answer named (a failover): the
        next session goes at once, not after the backoff the failures built up."""
        self._backoff_attempts = 0

    def backoff_s(self, jitter: float) -> float:
        """The wait before the next reconnect (exponential; ``jitter`` in [0, 1) from the
        shell's RNG spreads many producers apart)."""
        s = self.settings
        delay = min(s.initial_backoff_s * (1 << self._backoff_attempts), s.max_backoff_s)
        self._backoff_attempts = min(self._backoff_attempts + 1, 30)
        return delay * (0.5 + jitter / 2)

    def expire(self, now: float, detail: str = "") -> list[Completion[H]]:
        """Past the retry deadline: fail every unresolved batch (open ones included) with
        :class:`ServerUnavailableError`; the producer stays usable for new records."""
        if self._retry_deadline is None or now < self._retry_deadline:
            return []
        error = ServerUnavailableError(
            f"no working Produce stream for {self.settings.retry_timeout_s:g} s"
            + (f": {detail}" if detail else "")
        )
        return self.fail_all(error)

    def fail_all(self, error: ClientError) -> list[Completion[H]]:
        """Resolve everything unresolved with ``error`` (expiry, close without flush)."""
        if self._open is not None:
            ob, self._open = self._open, None
            self._queue.append(OutBatch(0, b"", ob.count, ob.handles, None, None))
        batches = [*self._inflight.values(), *self._queue]
        self._inflight.clear()
        self._queue.clear()
        self.accepting = True
        self._retry_deadline = None
        if batches:
            self._note_error(error)
        return [Completion(batch, None, error) for batch in batches]


class DefaultChannel:
    """Marker: use the producer's default channel."""


DEFAULT = DefaultChannel()


class Handle(Protocol):
    """What the core's handles are: ``asyncio.Future`` or ``concurrent.futures.Future``."""

    def done(self) -> bool: ...
    def set_result(self, result: Any, /) -> None: ...
    def set_exception(self, exception: BaseException, /) -> None: ...
    def exception(self) -> BaseException | None: ...
