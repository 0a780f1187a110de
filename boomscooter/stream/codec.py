"""Wire format of the log stream: the stream header codec and the encoder (sans-I/O).

The format is specified in the docstring of :mod:`boomscooter.stream`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import NamedTuple

from boomscooter.errors import BatchDecodeError, ConfigError, LocalProtocolError
from boomscooter.storage.batch import HEADER_BYTES as BATCH_HEADER_BYTES
from boomscooter.storage.batch import U32_MAX, U64_MAX, decode_header
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


def check_range(name: str, value: float, low: float, high: float) -> None:
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
        check_range("epoch", epoch, 0, U32_MAX)
        check_range("page_size_bytes", page_size_bytes, MIN_PAGE_SIZE, bpage.MAX_PAGE_SIZE)
        check_range("max_batch_bytes", max_batch_bytes, BATCH_HEADER_BYTES, U32_MAX)
        check_range("first_page_index", first_page_index, 1, U32_MAX)
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
