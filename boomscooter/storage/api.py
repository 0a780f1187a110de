"""The ``Log`` protocol, its configuration, and the rules both implementations share.

:class:`~boomscooter.storage.log.SegmentedLog` (files) and
:class:`~boomscooter.storage.memory.MemoryLog` (simulations) implement :class:`Log` and run
through the same contract tests. To make them agree byte for byte — including which
segments retention deletes — they share the roll and retention rules below and measure a
segment the same way: its 32-byte header plus the encoded batches it holds.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Protocol

from boomscooter.errors import ConfigError, SeqnoGapError, SeqnoOutOfRangeError
from boomscooter.storage.batch import HEADER_BYTES, RECORD_OVERHEAD_BYTES, Batch, Entry, Record
from boomscooter.storage.segment import SEGMENT_HEADER_BYTES

DEFAULT_READ_BYTES = 1 << 20
_MIN_SEGMENT_BYTES = SEGMENT_HEADER_BYTES + HEADER_BYTES + RECORD_OVERHEAD_BYTES
_MAX_SEGMENT_BYTES = 1 << 31


class FsyncMode(enum.Enum):
    ALWAYS = "always"  # fdatasync before append returns
    INTERVAL = "interval"  # a background thread fdatasyncs soon, at most every interval_ms
    NEVER = "never"  # only close() and explicit sync() fsync


@dataclass(frozen=True, slots=True, kw_only=True)
class FsyncPolicy:
    """When appended bytes are forced to stable storage.

    ``always``: each append returns only after ``fdatasync`` (durable seqno = last seqno).
    ``interval``: a background thread syncs soon after an unsynced append, at most once every
    ``interval_ms`` (an acknowledged-on-durable protocol waits for ``durable_seqno``).
    ``never``: no fsync on the append path; segments are not synced when sealed either.
    Under every policy ``sync()`` and ``close()`` fsync what was written.
    """

    mode: FsyncMode = FsyncMode.INTERVAL
    interval_ms: int = 100

    def __post_init__(self) -> None:
        if self.interval_ms <= 0:
            raise ConfigError(f"fsync interval must be positive, got {self.interval_ms} ms")

    @classmethod
    def parse(cls, text: str) -> FsyncPolicy:
        """``always``, ``never``, ``interval`` or ``interval:<ms>`` (the CLI's ``--fsync``)."""
        name, _, ms = text.partition(":")
        try:
            mode = FsyncMode(name)
        except ValueError:
            raise ConfigError(f"fsync policy must be always, interval or never: {text!r}") from None
        if ms and mode is not FsyncMode.INTERVAL:
            raise ConfigError(f"only the interval policy takes a period: {text!r}")
        if not ms:
            return cls(mode=mode)
        try:
            return cls(mode=mode, interval_ms=int(ms))
        except ValueError:
            raise ConfigError(f"bad fsync interval: {text!r}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    """Tuning of a log. Sizes are parameters so tests can roll many small segments."""

    segment_bytes: int = 256 << 20  # roll before a segment would exceed this
    segment_ms: int | None = 7 * 24 * 3600 * 1000  # roll this long (wall clock) after the
    # active segment's first append
    index_interval_bytes: int = 32 << 10  # one sparse index entry per this much log
    max_batch_bytes: int = 16 << 20
    retention_bytes: int | None = None  # delete oldest sealed segments above this total
    retention_ms: int | None = None  # delete sealed segments whose newest record is older
    fsync: FsyncPolicy = FsyncPolicy()
    verify_sealed: bool = True  # check every sealed batch's CRC32C on open
    max_open_segments: int = 16  # read handles kept open on sealed segments

    def __post_init__(self) -> None:
        if not _MIN_SEGMENT_BYTES <= self.segment_bytes <= _MAX_SEGMENT_BYTES:
            raise ConfigError(
                f"segment_bytes must be in [{_MIN_SEGMENT_BYTES}, {_MAX_SEGMENT_BYTES}]"
            )
        if not HEADER_BYTES + RECORD_OVERHEAD_BYTES <= self.max_batch_bytes <= 1 << 30:
            raise ConfigError("max_batch_bytes must be in [60, 1 GiB]")
        if self.index_interval_bytes < 1:
            raise ConfigError("index_interval_bytes must be positive")
        if self.max_open_segments < 1:
            raise ConfigError("max_open_segments must be positive")
        for name in ("segment_ms", "retention_bytes", "retention_ms"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must not be negative")


def should_roll(
    config: LogConfig,
    *,
    active_bytes: int,
    active_batches: int,
    active_since_ms: int | None,
    batch_bytes: int,
    now_ms: int,
) -> bool:
    """Whether a batch of ``batch_bytes`` goes into a new segment. An empty active segment
    takes any batch (a batch larger than ``segment_bytes`` gets a segment to itself).

    Age is wall-clock time: ``active_since_ms`` is the clock reading at the active
    segment's first append (None: unknown, no roll by age), ``now_ms`` the clock now.
    Record timestamps play no part — they are the producers' clocks, and a replica catching
    up or a producer with a skewed clock would otherwise roll a segment per append."""
    if active_batches == 0:
        return False
    if active_bytes + batch_bytes > config.segment_bytes:
        return True
    return (
        config.segment_ms is not None
        and active_since_ms is not None
        and now_ms - active_since_ms >= config.segment_ms
    )


def retention_count(
    config: LogConfig, sealed: Sequence[tuple[int, int]], total_bytes: int, now_ms: int
) -> int:
    """How many of the oldest sealed segments, given as ``(size_bytes, max_timestamp_ms)``
    in log order, retention deletes: while the total exceeds ``retention_bytes`` or the
    segment's newest record is older than ``retention_ms``. Only a prefix is deleted."""
    count = 0
    for size, max_timestamp_ms in sealed:
        over = config.retention_bytes is not None and total_bytes > config.retention_bytes
        expired = (
            config.retention_ms is not None and now_ms - max_timestamp_ms > config.retention_ms
        )
        if not (over or expired):
            break
        total_bytes -= size
        count += 1
    return count


def check_read_start(from_seqno: int, first_seqno: int) -> None:
    if from_seqno < first_seqno:
        raise SeqnoOutOfRangeError(
            f"seqno {from_seqno} is below the first available seqno {first_seqno}"
        )


def iter_records(
    read_batches: Callable[[int, int | None, int], list[Batch]],
    from_seqno: int,
    to_seqno: int | None,
    max_bytes: int | None,
) -> Iterator[Record]:
    """Records ``from_seqno`` … ``to_seqno`` through a ``read_batches`` function, reading
    ``max_bytes`` of batches in one go, or everything in 1 MiB steps when None. The
    per-record path is C only (``chain`` over each batch's record iterator)."""
    return chain.from_iterable(_batch_records(read_batches, from_seqno, to_seqno, max_bytes))


def _batch_records(
    read_batches: Callable[[int, int | None, int], list[Batch]],
    from_seqno: int,
    to_seqno: int | None,
    max_bytes: int | None,
) -> Iterator[Iterator[Record]]:
    seqno = from_seqno
    while True:
        budget = DEFAULT_READ_BYTES if max_bytes is None else max_bytes
        batches = read_batches(seqno, to_seqno, budget)
        for batch in batches:
            yield batch.records(seqno, to_seqno)
        if not batches or max_bytes is not None:
            return
        seqno = batches[-1].next_seqno
        if to_seqno is not None and seqno > to_seqno:
            return


class RecoveryKind(enum.Enum):
    TRUNCATED = "truncated"  # torn tail of the active segment cut off
    REPAIRED = "repaired"  # operator-requested truncation at corruption
    SEGMENT_DELETED = "segment_deleted"  # a later segment dropped by a repair
    HEADER_REWRITTEN = "header_rewritten"  # an unfinished segment header completed
    INDEX_REBUILT = "index_rebuilt"  # a missing, damaged or stale index written anew
    INDEX_REMOVED = "index_removed"  # index of the active segment or of no segment
    TEMP_REMOVED = "temp_removed"  # leftover of an interrupted atomic write
    STRAY_IGNORED = "stray_ignored"  # a file that is not ours: left alone


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoveryAction:
    kind: RecoveryKind
    path: str
    offset: int | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoveryReport:
    """What opening a log found and did; every action was also logged."""

    actions: tuple[RecoveryAction, ...] = ()

    def kinds(self) -> list[RecoveryKind]:
        return [action.kind for action in self.actions]


class Log(Protocol):
    """An append-only log of records with contiguous seqnos, stored as batches.

    Empty log: ``first_seqno == next_seqno`` and ``last_seqno == next_seqno - 1`` (0 for a
    new log). Reads below ``first_seqno`` raise :class:`SeqnoOutOfRangeError`; reads past
    the end return nothing.
    """

    @property
    def first_seqno(self) -> int: ...

    @property
    def last_seqno(self) -> int: ...

    @property
    def next_seqno(self) -> int: ...

    @property
    def durable_seqno(self) -> int: ...

    @property
    def total_bytes(self) -> int: ...

    @property
    def segment_count(self) -> int: ...

    @property
    def last_epoch(self) -> int:
        """The epoch of the last stored batch (0 for an empty log)."""
        ...

    def append(self, entries: Sequence[Entry], *, epoch: int) -> Batch:
        """Encode ``entries`` as one batch at ``next_seqno``, store it, return it."""
        ...

    def append_batch(self, data: bytes | bytearray | memoryview | Batch) -> Batch:
        """Store an encoded batch that continues the log. Bytes are validated first (CRC32C,
        framing); a :class:`Batch` is trusted as already validated — every way of making one
        (``Batch.from_bytes``, ``encode_batch``, ``restamp``, a log read) validates."""
        ...

    def read_batches(
        self, from_seqno: int, *, to_seqno: int | None = None, max_bytes: int = DEFAULT_READ_BYTES
    ) -> list[Batch]:
        """Whole stored batches from the one holding ``from_seqno``, up to the one holding
        ``to_seqno`` or about ``max_bytes`` (at least one batch when any is available)."""
        ...

    def read(
        self, from_seqno: int, *, to_seqno: int | None = None, max_bytes: int | None = None
    ) -> Iterator[Record]:
        """Records with ``from_seqno <= seqno <= to_seqno``."""
        ...

    def seqno_for_time(self, timestamp_ms: int) -> int | None:
        """The first seqno whose record timestamp is at or after ``timestamp_ms``."""
        ...

    def truncate_after(self, seqno: int) -> None:
        """Drop every record after ``seqno`` (a replica whose tail diverged)."""
        ...

    def rebase(self, first_seqno: int) -> None:
        """Drop every record and start again, empty, at ``first_seqno``."""
        ...

    def import_segment(self, path: str, base_seqno: int) -> int:
        """Append the batches of the segment file at ``path`` (base ``base_seqno``, copied
        from another node) that continue the log; returns the records appended."""
        ...

    def roll(self) -> None:
        """Seal the active segment now (no-op when it is empty)."""
        ...

    def apply_retention(self, now_ms: int | None = None) -> int:
        """Delete whole sealed segments by the retention rules; returns how many."""
        ...

    def sync(self) -> None: ...

    def close(self) -> None: ...


def check_continues(batch: Batch, next_seqno: int) -> None:
    """An encoded batch appended as is (a replica storing what it received) must start
    where the log continues."""
    if batch.base_seqno != next_seqno:
        raise SeqnoGapError(
            f"batch starts at seqno {batch.base_seqno}, the log continues at {next_seqno}",
            expected=next_seqno,
            got=batch.base_seqno,
        )
