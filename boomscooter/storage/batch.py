"""The batch codec (sans-I/O): one producer batch = one stored batch = one multicast payload.

A batch is self-describing: it carries its length, a CRC32C, its base seqno, record count,
leader epoch and first/max timestamps in a fixed 48-byte header, so it can be stored,
validated, indexed and sent as opaque bytes. The exact layout is the on-disk specification
in :mod:`boomscooter.storage` (and ``docs/storage-format.md``); this module implements it.

Records are framed *by column*: all timestamps, then all payload lengths, then (only when
some record has one) channel and key lengths, then the channel, key and payload bytes. A
column is one ``struct`` call in C, and the record objects are built by ``map``/``zip``
pipelines, so encoding and decoding do no per-record Python bytecode in the common case
(no channel, no key). That is how a Python log reaches millions of records per second.

``encode_batch`` is a pure function of the entries, the base seqno and the epoch: the
leader stamps both before storing, and a replica stores the very bytes it received
(``Batch.from_bytes`` validates them first). Nothing here touches files, sockets or clocks.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from itertools import accumulate, islice, repeat
from operator import itemgetter
from typing import NamedTuple

import crc32c as _crc32c

from boomscooter.errors import BatchDecodeError, BatchEncodeError

HEADER = struct.Struct("<IIBBHIQQQII")
HEADER_BYTES = HEADER.size  # 48
_HEADER_TAIL = struct.Struct("<BBHIQQQII")  # the header after length and CRC
_U32 = struct.Struct("<I")
BATCH_MAGIC = 0xB5
BATCH_VERSION = 1
HAS_CHANNELS = 0x0001
HAS_KEYS = 0x0002
KNOWN_ATTRIBUTES = HAS_CHANNELS | HAS_KEYS
NO_CHANNEL = 0xFFFF  # channel length sentinel: this record has no channel
NO_KEY = 0xFFFFFFFF  # key length sentinel: this record has no key
MAX_CHANNEL_BYTES = NO_CHANNEL - 1
MAX_BATCH_BYTES = 0xFFFFFFFF
U32_MAX = 0xFFFFFFFF
U64_MAX = 0xFFFFFFFFFFFFFFFF
# Bytes per record in the always-present columns (timestamp u64, payload length u32).
RECORD_OVERHEAD_BYTES = 12

_new_tuple = tuple.__new__
_crc: Callable[..., int] = _crc32c.crc32c


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC32C (Castagnoli) of ``data``, continuing from ``value`` (C implementation)."""
    return int(_crc32c.crc32c(data, value))


class Entry(NamedTuple):
    """What a producer appends: a record before the log has given it a seqno."""

    timestamp_ms: int
    payload: bytes
    channel: str | None = None
    key: bytes | None = None


class Record(NamedTuple):
    """A stored record. A NamedTuple rather than a dataclass: decoding builds millions of
    these per second, and a tuple subclass is created in C without running ``__init__``."""

    seqno: int
    timestamp_ms: int
    channel: str | None
    key: bytes | None
    payload: bytes


class BatchHeader(NamedTuple):
    """The fixed 48-byte batch header (see the format specification)."""

    length: int
    crc: int
    magic: int
    version: int
    attributes: int
    record_count: int
    base_seqno: int
    first_timestamp_ms: int
    max_timestamp_ms: int
    epoch: int
    reserved: int

    @property
    def last_seqno(self) -> int:
        return self.base_seqno + self.record_count - 1

    @property
    def next_seqno(self) -> int:
        return self.base_seqno + self.record_count


@lru_cache(maxsize=1024)
def _column(code: str, count: int) -> struct.Struct:
    return struct.Struct(f"<{count}{code}")


def batch_crc(buf: bytes | bytearray | memoryview, offset: int, length: int) -> int:
    """The CRC32C a batch at ``buf[offset:offset+length]`` should carry: over its length
    field and everything after the CRC field."""
    view = memoryview(buf)
    return crc32c(view[offset + 8 : offset + length], crc32c(view[offset : offset + 4]))


def decode_header(buf: bytes | bytearray | memoryview, offset: int = 0) -> BatchHeader:
    """Unpack and check the header at ``offset`` without touching the records or the CRC.

    Checks what the header alone can tell: magic, version, known attributes, a record count
    of at least one, a length large enough for that many records' fixed columns, a seqno
    range that fits in u64 and a first timestamp not above the max.
    """
    if len(buf) - offset < HEADER_BYTES:
        raise BatchDecodeError(f"short batch header: {len(buf) - offset} bytes")
    header = BatchHeader._make(HEADER.unpack_from(buf, offset))
    if header.magic != BATCH_MAGIC:
        raise BatchDecodeError(f"bad batch magic 0x{header.magic:02x}")
    if header.version != BATCH_VERSION:
        raise BatchDecodeError(f"unsupported batch version {header.version}")
    if header.attributes & ~KNOWN_ATTRIBUTES or header.reserved:
        raise BatchDecodeError(f"unknown batch attributes 0x{header.attributes:04x}")
    if header.record_count < 1:
        raise BatchDecodeError("batch with no records")
    if header.length < HEADER_BYTES + RECORD_OVERHEAD_BYTES * header.record_count:
        raise BatchDecodeError(
            f"batch length {header.length} too small for {header.record_count} records"
        )
    if header.base_seqno < 1 or header.base_seqno + header.record_count - 1 > U64_MAX:
        raise BatchDecodeError(f"bad base seqno {header.base_seqno}")
    if header.first_timestamp_ms > header.max_timestamp_ms:
        raise BatchDecodeError("first timestamp above the max timestamp")
    return header


def check_crc(buf: bytes | bytearray | memoryview, offset: int, header: BatchHeader) -> None:
    """Raise :class:`BatchDecodeError` unless the batch at ``offset`` matches its CRC32C."""
    if len(buf) - offset < header.length:
        raise BatchDecodeError(f"truncated batch: {len(buf) - offset} of {header.length} bytes")
    actual = batch_crc(buf, offset, header.length)
    if actual != header.crc:
        raise BatchDecodeError(
            f"CRC32C mismatch: stored 0x{header.crc:08x}, computed 0x{actual:08x}"
        )


class _Columns(NamedTuple):
    timestamps: tuple[int, ...]
    channel_lengths: tuple[int, ...] | None
    key_lengths: tuple[int, ...] | None
    channel_offsets: list[int] | None
    key_offsets: list[int] | None
    payload_offsets: list[int]


def _columns(data: bytes, header: BatchHeader) -> _Columns:
    count = header.record_count
    pos = HEADER_BYTES
    if header.length != len(data):
        raise BatchDecodeError(f"batch length {header.length} but {len(data)} bytes")
    fixed = pos + count * (
        12
        + (2 if header.attributes & HAS_CHANNELS else 0)
        + (4 if header.attributes & HAS_KEYS else 0)
    )
    if fixed > header.length:
        raise BatchDecodeError("record columns overrun the batch")
    timestamps = _column("Q", count).unpack_from(data, pos)
    pos += 8 * count
    payload_lengths = _column("I", count).unpack_from(data, pos)
    pos += 4 * count
    channel_lengths = key_lengths = None
    if header.attributes & HAS_CHANNELS:
        channel_lengths = _column("H", count).unpack_from(data, pos)
        pos += 2 * count
    if header.attributes & HAS_KEYS:
        key_lengths = _column("I", count).unpack_from(data, pos)
        pos += 4 * count
    channel_offsets = key_offsets = None
    if channel_lengths is not None:
        sizes = [0 if n == NO_CHANNEL else n for n in channel_lengths]
        channel_offsets = list(accumulate(sizes, initial=pos))
        pos = channel_offsets[-1]
    if key_lengths is not None:
        sizes = [0 if n == NO_KEY else n for n in key_lengths]
        key_offsets = list(accumulate(sizes, initial=pos))
        pos = key_offsets[-1]
    payload_offsets = list(accumulate(payload_lengths, initial=pos))
    if payload_offsets[-1] != header.length:
        raise BatchDecodeError(
            f"record framing covers {payload_offsets[-1]} bytes of a {header.length}-byte batch"
        )
    return _Columns(
        timestamps, channel_lengths, key_lengths, channel_offsets, key_offsets, payload_offsets
    )


def iter_records(
    data: bytes, header: BatchHeader, start: int = 0, stop: int | None = None
) -> Iterator[Record]:
    """Records ``start`` … ``stop - 1`` (indexes within the batch) of a batch whose CRC the
    caller has checked. Framing errors raise at once, before the first record."""
    count = header.record_count
    stop = count if stop is None else min(stop, count)
    start = max(start, 0)
    if start >= stop:
        return iter(())
    cols = _columns(data, header)
    channels: Iterator[str | None]
    keys: Iterator[bytes | None]
    if cols.channel_lengths is None or cols.channel_offsets is None:
        channels = repeat(None)
    else:
        offs = cols.channel_offsets
        try:
            channels = iter(
                [
                    None if n == NO_CHANNEL else str(data[offs[i] : offs[i + 1]], "utf-8")
                    for i, n in enumerate(cols.channel_lengths[start:stop], start)
                ]
            )
        except UnicodeDecodeError as exc:
            raise BatchDecodeError(f"channel is not UTF-8: {exc}") from None
    if cols.key_lengths is None or cols.key_offsets is None:
        keys = repeat(None)
    else:
        offs = cols.key_offsets
        keys = iter(
            [
                None if n == NO_KEY else data[offs[i] : offs[i + 1]]
                for i, n in enumerate(cols.key_lengths[start:stop], start)
            ]
        )
    poffs = cols.payload_offsets
    payloads = map(
        data.__getitem__,
        map(slice, islice(poffs, start, stop), islice(poffs, start + 1, stop + 1)),
    )
    base = header.base_seqno
    return map(
        _new_tuple,
        repeat(Record),
        zip(  # noqa: B905 - the repeat() columns are endless; range bounds the zip
            range(base + start, base + stop), cols.timestamps[start:stop], channels, keys, payloads
        ),
    )


def validate_batch(data: bytes, header: BatchHeader) -> None:
    """Everything a receiver must check before storing bytes it did not encode: the CRC,
    the framing, UTF-8 channels and the header's first/max timestamps."""
    check_crc(data, 0, header)
    cols = _columns(data, header)
    if cols.timestamps[0] != header.first_timestamp_ms:
        raise BatchDecodeError("header first timestamp does not match the first record")
    if max(cols.timestamps) != header.max_timestamp_ms:
        raise BatchDecodeError("header max timestamp does not match the records")
    if cols.channel_lengths is not None:
        for _record in iter_records(data, header):
            pass  # decodes every channel: raises on bad UTF-8


class Batch(NamedTuple):
    """One encoded batch: its parsed header and its bytes, exactly as stored and sent.

    ``data`` is ``bytes`` from :func:`encode_batch` and :meth:`from_bytes`; batches read
    from a log are read-only ``memoryview`` slices of the read buffer, handed out without
    a copy (``bytes(batch.data)`` makes one; sockets and files take views directly).
    A NamedTuple (immutable, built in C): reads create one per stored batch."""

    header: BatchHeader
    data: bytes | memoryview

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Batch:
        """Parse and fully validate bytes received from elsewhere (a replica's input)."""
        raw = bytes(data)
        header = decode_header(raw)
        if header.length != len(raw):
            raise BatchDecodeError(f"batch length {header.length} but {len(raw)} bytes given")
        validate_batch(raw, header)
        return cls(header, raw)

    @property
    def base_seqno(self) -> int:
        return self.header.base_seqno

    @property
    def last_seqno(self) -> int:
        return self.header.base_seqno + self.header.record_count - 1

    @property
    def next_seqno(self) -> int:
        return self.header.base_seqno + self.header.record_count

    @property
    def record_count(self) -> int:
        return self.header.record_count

    @property
    def epoch(self) -> int:
        return self.header.epoch

    def records(self, from_seqno: int = 0, to_seqno: int | None = None) -> Iterator[Record]:
        """The batch's records with ``from_seqno <= seqno <= to_seqno``."""
        base = self.header.base_seqno
        stop = None if to_seqno is None else to_seqno - base + 1
        data = self.data
        if type(data) is not bytes:
            data = bytes(data)  # payloads are sliced out as bytes, not views
        return iter_records(data, self.header, from_seqno - base, stop)

    def entries(self) -> list[Entry]:
        return [Entry(r.timestamp_ms, r.payload, r.channel, r.key) for r in self.records()]


def restamp(batch: Batch, *, base_seqno: int, epoch: int) -> Batch:
    """The same records with another base seqno and epoch (the leader stamping a producer's
    pre-encoded batch): two header fields rewritten and the CRC32C recomputed."""
    if not 1 <= base_seqno <= U64_MAX - batch.header.record_count + 1 or not 0 <= epoch <= U32_MAX:
        raise BatchEncodeError(f"cannot stamp base seqno {base_seqno} epoch {epoch}")
    raw = bytearray(batch.data)
    struct.pack_into("<Q", raw, 16, base_seqno)
    struct.pack_into("<I", raw, 40, epoch)
    struct.pack_into("<I", raw, 4, batch_crc(raw, 0, len(raw)))
    data = bytes(raw)
    header = batch.header._replace(
        base_seqno=base_seqno, epoch=epoch, crc=_U32.unpack_from(data, 4)[0]
    )
    return Batch(header, data)


_get_timestamp = itemgetter(0)
_get_payload = itemgetter(1)
_get_channel = itemgetter(2)
_get_key = itemgetter(3)


def encode_batch(entries: Sequence[Entry], *, base_seqno: int, epoch: int) -> Batch:
    """Encode ``entries`` as one batch whose first record gets ``base_seqno`` (pure)."""
    count = len(entries)
    if count == 0:
        raise BatchEncodeError("a batch holds at least one entry")
    if not 1 <= base_seqno <= U64_MAX - count + 1:
        raise BatchEncodeError(f"base seqno {base_seqno} out of range")
    if not 0 <= epoch <= U32_MAX:
        raise BatchEncodeError(f"epoch {epoch} out of range")
    try:
        timestamps = list(map(_get_timestamp, entries))
        payloads = list(map(_get_payload, entries))
        channels = list(map(_get_channel, entries))
        keys = list(map(_get_key, entries))
        parts = [
            _column("Q", count).pack(*timestamps),
            _column("I", count).pack(*map(len, payloads)),
        ]
        attributes = 0
        variable: list[bytes] = []
        if channels.count(None) != count:
            attributes |= HAS_CHANNELS
            encoded = [b"" if c is None else c.encode("utf-8") for c in channels]
            if max(map(len, encoded)) > MAX_CHANNEL_BYTES:
                raise BatchEncodeError(f"a channel is longer than {MAX_CHANNEL_BYTES} bytes")
            lengths = [
                NO_CHANNEL if c is None else len(e) for c, e in zip(channels, encoded, strict=True)
            ]
            parts.append(_column("H", count).pack(*lengths))
            variable += encoded
        if keys.count(None) != count:
            attributes |= HAS_KEYS
            key_bytes = [b"" if k is None else k for k in keys]
            if max(map(len, key_bytes)) >= NO_KEY:
                raise BatchEncodeError("a key is too long")
            parts.append(_column("I", count).pack(*[NO_KEY if k is None else len(k) for k in keys]))
            variable += key_bytes
        parts += variable
        parts += payloads
        body = b"".join(parts)
        first, largest = timestamps[0], max(timestamps)
        length = HEADER_BYTES + len(body)
        if length > MAX_BATCH_BYTES:
            raise BatchEncodeError(f"batch of {length} bytes exceeds {MAX_BATCH_BYTES}")
        tail = _HEADER_TAIL.pack(
            BATCH_MAGIC, BATCH_VERSION, attributes, count, base_seqno, first, largest, epoch, 0
        )
    except struct.error as exc:
        raise BatchEncodeError(f"entry field out of range: {exc}") from None
    except (TypeError, AttributeError, IndexError) as exc:
        raise BatchEncodeError(
            "entries must be Entry(timestamp_ms: int, payload: bytes, channel: str | None, "
            f"key: bytes | None): {exc}"
        ) from None
    length_field = _U32.pack(length)
    crc: int = _crc(body, _crc(tail, _crc(length_field)))
    header = (length, crc, BATCH_MAGIC, BATCH_VERSION, attributes, count, base_seqno, first)
    data = b"".join((length_field, _U32.pack(crc), tail, body))
    return _new_tuple(Batch, (_new_tuple(BatchHeader, (*header, largest, epoch, 0)), data))


def split_batches(buf: bytes) -> list[Batch]:
    """Split and fully validate a buffer of back-to-back batches (e.g. a fetched range)."""
    batches: list[Batch] = []
    pos = 0
    while pos < len(buf):
        header = decode_header(buf, pos)
        if pos + header.length > len(buf):
            raise BatchDecodeError("truncated batch at the end of the buffer")
        batches.append(Batch.from_bytes(buf[pos : pos + header.length]))
        pos += header.length
    return batches
