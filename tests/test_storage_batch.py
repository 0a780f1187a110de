"""The batch codec: a table of cases checked against an encoder written from the
specification, a pinned golden batch, hypothesis round trips, and every way to hand the
decoder bad bytes."""

from __future__ import annotations

import ast
import random
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from boomscooter.errors import BatchDecodeError, BatchEncodeError
from boomscooter.storage import Batch, Entry, Record, encode_batch, split_batches
from boomscooter.storage.batch import HEADER_BYTES, U32_MAX, U64_MAX, decode_header, restamp
from boomscooter.storage.index import IndexFiles, IndexMismatch, SegmentIndex, load_index

from support.storage import random_entries, spec_encode

CASES: list[tuple[str, list[Entry], int, int]] = [
    ("one bare record", [Entry(1_700_000_000_000, b"hello")], 1, 0),
    ("empty payload", [Entry(0, b"")], 7, 3),
    ("channel only", [Entry(5, b"x", "orders")], 10, 1),
    ("key only", [Entry(5, b"x", None, b"k")], 10, 1),
    ("empty channel and key are not None", [Entry(5, b"", "", b"")], 2, 9),
    (
        "mixed",
        [Entry(9, b"a"), Entry(3, b"bb", "ch", None), Entry(9, b"", None, b"key"), Entry(1, b"z")],
        100,
        2**32 - 1,
    ),
    ("utf-8 channel", [Entry(1, b"p", "ünïcode/チャネル")], 1, 1),
    ("large seqno", [Entry(1, b"p"), Entry(2, b"q")], 2**64 - 2, 1),
]


@pytest.mark.parametrize(("name", "entries", "base", "epoch"), CASES, ids=[c[0] for c in CASES])
def test_codec_table(name: str, entries: list[Entry], base: int, epoch: int) -> None:
    expected = spec_encode(entries, base_seqno=base, epoch=epoch)
    batch = encode_batch(entries, base_seqno=base, epoch=epoch)
    assert batch.data == expected
    decoded = Batch.from_bytes(expected)
    assert decoded == batch
    assert decoded.header.base_seqno == base
    assert decoded.header.epoch == epoch
    assert decoded.header.record_count == len(entries)
    assert decoded.header.first_timestamp_ms == entries[0].timestamp_ms
    assert decoded.header.max_timestamp_ms == max(e.timestamp_ms for e in entries)
    assert list(decoded.records()) == [
        Record(base + i, e.timestamp_ms, e.channel, e.key, e.payload) for i, e in enumerate(entries)
    ]
    assert decoded.entries() == entries


def test_golden_batch_pins_the_format() -> None:
    batch = encode_batch([Entry(2, b"hi", "c", None)], base_seqno=5, epoch=7)
    assert batch.data.hex() == (
        "41000000"  # length 65
        "803b6e39"  # crc32c
        "b5"
        "01"
        "0100"  # magic, version, attributes: channel column
        "01000000"  # one record
        "0500000000000000"  # base seqno
        "0200000000000000"
        "0200000000000000"  # first and max timestamp
        "07000000"
        "00000000"  # epoch, reserved
        "0200000000000000"  # timestamps column
        "02000000"  # payload lengths column
        "0100"  # channel lengths column
        "63"
        "6869"  # "c", b"hi"
    )


def test_decode_header_reads_no_records() -> None:
    batch = encode_batch([Entry(1, b"x" * 1000)] * 3, base_seqno=40, epoch=2)
    header = decode_header(batch.data[:HEADER_BYTES])  # only the header bytes exist
    assert (header.base_seqno, header.last_seqno, header.length) == (40, 42, len(batch.data))


def test_records_range_slices_the_batch() -> None:
    entries = random_entries(random.Random(1), 10)
    batch = encode_batch(entries, base_seqno=11, epoch=1)
    assert [r.seqno for r in batch.records(13, 15)] == [13, 14, 15]
    assert [r.seqno for r in batch.records(0, 11)] == [11]
    assert [r.seqno for r in batch.records(20)] == [20]
    assert list(batch.records(21)) == []
    assert list(batch.records(5, 10)) == []
    assert [r.payload for r in batch.records(14, 16)] == [e.payload for e in entries[3:6]]


entry_strategy = st.builds(
    Entry,
    timestamp_ms=st.integers(0, 2**64 - 1),
    payload=st.binary(max_size=64),
    channel=st.none() | st.text(max_size=12),
    key=st.none() | st.binary(max_size=12),
)


@settings(max_examples=200, deadline=None)
@given(
    entries=st.lists(entry_strategy, min_size=1, max_size=20),
    base=st.integers(1, 2**40),
    epoch=st.integers(0, 2**32 - 1),
)
def test_round_trip(entries: list[Entry], base: int, epoch: int) -> None:
    batch = encode_batch(entries, base_seqno=base, epoch=epoch)
    assert batch.data == spec_encode(entries, base_seqno=base, epoch=epoch)
    again = Batch.from_bytes(batch.data)
    assert again.entries() == entries
    assert [r.seqno for r in again.records()] == list(range(base, base + len(entries)))


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_any_single_bit_flip_is_refused(data: st.DataObject) -> None:
    entries = data.draw(st.lists(entry_strategy, min_size=1, max_size=5))
    raw = bytearray(encode_batch(entries, base_seqno=3, epoch=1).data)
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(BatchDecodeError):
        Batch.from_bytes(raw)


def test_every_truncation_is_refused() -> None:
    data = encode_batch(random_entries(random.Random(2), 5), base_seqno=1, epoch=1).data
    for cut in range(len(data)):
        with pytest.raises(BatchDecodeError):
            Batch.from_bytes(data[:cut])


def test_trailing_garbage_is_refused() -> None:
    data = bytes(encode_batch([Entry(1, b"x")], base_seqno=1, epoch=1).data)
    with pytest.raises(BatchDecodeError, match="length"):
        Batch.from_bytes(data + b"\x00")
    with pytest.raises(BatchDecodeError):
        split_batches(data + b"\x00" * 10)


def test_split_batches_of_a_stream() -> None:
    rng = random.Random(3)
    batches = []
    seqno = 1
    for _ in range(5):
        batch = encode_batch(random_entries(rng, rng.randrange(1, 6)), base_seqno=seqno, epoch=1)
        batches.append(batch)
        seqno = batch.next_seqno
    assert split_batches(b"".join(b.data for b in batches)) == batches
    assert split_batches(b"") == []


def _resigned(data: bytearray) -> bytes:
    """``data`` with a correct CRC again, so only the structural checks can object."""
    import crc32c

    crc = crc32c.crc32c(bytes(data[8:]), crc32c.crc32c(bytes(data[:4])))
    struct.pack_into("<I", data, 4, crc)
    return bytes(data)


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "match"),
    [
        (8, "<B", 0xB6, "magic"),
        (9, "<B", 2, "version"),
        (10, "<H", 4, "attributes"),
        (44, "<I", 1, "attributes"),
        (12, "<I", 0, "no records"),
        (12, "<I", 1000, "too small"),
        (16, "<Q", 0, "base seqno"),
        (24, "<Q", 99, "first timestamp"),  # first above max
        (32, "<Q", 8, "max timestamp does not match"),
        (24, "<Q", 0, "first timestamp does not match"),
        (56, "<I", 50, "framing"),  # payload length column disagrees with the length
    ],
)
def test_structural_checks_behind_a_valid_crc(
    offset: int, fmt: str, value: int, match: str
) -> None:
    raw = bytearray(encode_batch([Entry(7, b"abcd")], base_seqno=1, epoch=1).data)
    struct.pack_into(fmt, raw, offset, value)
    with pytest.raises(BatchDecodeError, match=match):
        Batch.from_bytes(_resigned(raw))


def test_bad_utf8_channel_is_refused() -> None:
    raw = bytearray(encode_batch([Entry(1, b"", "ab")], base_seqno=1, epoch=1).data)
    raw[-2:] = b"\xff\xfe"
    with pytest.raises(BatchDecodeError, match="UTF-8"):
        Batch.from_bytes(_resigned(raw))


@pytest.mark.parametrize(
    ("entries", "base", "epoch", "match"),
    [
        ([], 1, 0, "at least one"),
        ([Entry(1, b"")], 0, 0, "base seqno"),
        ([Entry(1, b""), Entry(1, b"")], 2**64 - 1, 0, "base seqno"),
        ([Entry(1, b"")], 1, -1, "epoch"),
        ([Entry(1, b"")], 1, 2**32, "epoch"),
        ([Entry(-1, b"")], 1, 0, "out of range"),
        ([Entry(1, "text")], 1, 0, "bytes"),  # type: ignore[arg-type]
        ([Entry(1, b"", b"bytes-channel")], 1, 0, "Entry"),  # type: ignore[arg-type]
        ([Entry(1, b"", "c" * 65535)], 1, 0, "channel"),
        ([(1,)], 1, 0, "Entry"),
    ],
)
def test_encode_refuses(entries: list[Entry], base: int, epoch: int, match: str) -> None:
    with pytest.raises(BatchEncodeError, match=match):
        encode_batch(entries, base_seqno=base, epoch=epoch)


def test_longest_channel_is_accepted() -> None:
    batch = encode_batch([Entry(1, b"", "c" * 65534)], base_seqno=1, epoch=0)
    assert next(batch.records()).channel == "c" * 65534


def test_index_round_trip_and_mismatches() -> None:
    index = SegmentIndex(base_seqno=10, start=32, interval_bytes=100)
    position = 32
    for i in range(20):
        batch = encode_batch(
            [Entry(100 - i if i % 3 else 100 + i, b"x" * 30)], base_seqno=10 + i, epoch=1
        )
        index.add(position, batch.header)
        position += batch.header.length
    files = index.encode()
    loaded = load_index(files, base_seqno=10, segment_bytes=position, interval_bytes=100, start=32)
    assert loaded.matches(files)
    assert list(loaded.seqnos) == list(index.seqnos)
    assert loaded.find_seqno(17) == index.find_seqno(17)
    assert loaded.find_time(130) == index.find_time(130)
    bad_inputs = {
        "size": dict(base_seqno=10, segment_bytes=position + 1, interval_bytes=100),
        "base": dict(base_seqno=11, segment_bytes=position, interval_bytes=100),
        "interval": dict(base_seqno=10, segment_bytes=position, interval_bytes=50),
    }
    for kwargs in bad_inputs.values():
        with pytest.raises(IndexMismatch):
            load_index(files, start=32, **kwargs)
    flipped = bytearray(files.offsets)
    flipped[-1] ^= 1
    with pytest.raises(IndexMismatch, match="CRC"):
        load_index(
            IndexFiles(offsets=bytes(flipped), times=files.times),
            base_seqno=10,
            segment_bytes=position,
            interval_bytes=100,
            start=32,
        )
    with pytest.raises(IndexMismatch):
        load_index(
            IndexFiles(offsets=files.offsets[:-8], times=files.times),
            base_seqno=10,
            segment_bytes=position,
            interval_bytes=100,
            start=32,
        )


SANS_IO = ["batch", "index", "api"]
FORBIDDEN = {"asyncio", "socket", "time", "os", "selectors", "threading"}


@pytest.mark.parametrize("module", SANS_IO)
def test_codec_modules_import_no_io(module: str) -> None:
    source = Path(__file__).parent.parent / "boomscooter" / "storage" / f"{module}.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN, f"{module} imports {imported & FORBIDDEN}"


# -- restamp ----------------------------------------------------------------------------------

RESTAMP_ENTRIES = [
    Entry(1_700_000_000_000, b"first"),
    Entry(1_700_000_000_005, b"", "orders/eu", b"k1"),
    Entry(1_699_999_999_000, b"third", None, None),
    Entry(1_700_000_000_001, b"x" * 300, "", b""),
]


@pytest.mark.parametrize(
    ("base", "epoch"),
    [(1, 0), (2, 1), (1_000_000, 7), (U64_MAX - len(RESTAMP_ENTRIES) + 1, U32_MAX)],
)
def test_restamp_rewrites_base_and_epoch(base: int, epoch: int) -> None:
    original = encode_batch(RESTAMP_ENTRIES, base_seqno=1, epoch=0)
    stamped = restamp(original, base_seqno=base, epoch=epoch)
    assert stamped.base_seqno == base
    assert stamped.epoch == epoch
    assert stamped.last_seqno == base + len(RESTAMP_ENTRIES) - 1
    # the CRC is valid: the bytes parse and validate as received from elsewhere
    reparsed = Batch.from_bytes(stamped.data)
    assert reparsed.header == stamped.header
    assert decode_header(stamped.data) == stamped.header
    assert reparsed.entries() == RESTAMP_ENTRIES
    assert [r.seqno for r in reparsed.records()] == list(range(base, base + len(RESTAMP_ENTRIES)))
    # the very bytes the encoder would have produced with those values
    assert stamped.data == encode_batch(RESTAMP_ENTRIES, base_seqno=base, epoch=epoch).data
    # the original is untouched
    assert original.base_seqno == 1 and original.epoch == 0
    assert Batch.from_bytes(original.data) == original


def test_restamp_changes_only_base_epoch_and_crc() -> None:
    original = encode_batch(RESTAMP_ENTRIES, base_seqno=5, epoch=2)
    stamped = restamp(original, base_seqno=99, epoch=4)
    before, after = bytes(original.data), bytes(stamped.data)
    assert len(before) == len(after)
    changed = {i for i in range(len(before)) if before[i] != after[i]}
    allowed = set(range(4, 8)) | set(range(16, 24)) | set(range(40, 44))
    assert changed <= allowed
    assert struct.unpack_from("<Q", after, 16)[0] == 99
    assert struct.unpack_from("<I", after, 40)[0] == 4


def test_restamp_accepts_a_memoryview_batch() -> None:
    original = encode_batch(RESTAMP_ENTRIES, base_seqno=1, epoch=0)
    view = Batch(original.header, memoryview(bytearray(original.data)).toreadonly())
    stamped = restamp(view, base_seqno=10, epoch=3)
    assert isinstance(stamped.data, bytes)
    assert Batch.from_bytes(stamped.data).entries() == RESTAMP_ENTRIES


def test_restamp_output_fails_validation_if_tampered() -> None:
    stamped = restamp(encode_batch(RESTAMP_ENTRIES, base_seqno=1, epoch=0), base_seqno=3, epoch=1)
    raw = bytearray(stamped.data)
    raw[16] ^= 0x01  # base seqno changed behind the CRC's back
    with pytest.raises(BatchDecodeError, match="CRC32C"):
        Batch.from_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("base", "epoch"),
    [
        (0, 0),
        (-1, 0),
        (U64_MAX - len(RESTAMP_ENTRIES) + 2, 0),  # the last record's seqno would pass u64
        (U64_MAX, 0),
        (1, -1),
        (1, U32_MAX + 1),
    ],
)
def test_restamp_out_of_range_raises(base: int, epoch: int) -> None:
    original = encode_batch(RESTAMP_ENTRIES, base_seqno=1, epoch=0)
    with pytest.raises(BatchEncodeError, match="cannot stamp"):
        restamp(original, base_seqno=base, epoch=epoch)


@settings(max_examples=60, deadline=None)
@given(
    entries=st.lists(
        st.builds(
            Entry,
            st.integers(0, 2**64 - 1),
            st.binary(max_size=20),
            st.none() | st.text(max_size=5),
            st.none() | st.binary(max_size=5),
        ),
        min_size=1,
        max_size=8,
    ),
    base=st.integers(1, 2**40),
    epoch=st.integers(0, U32_MAX),
)
def test_restamp_round_trips(entries: list[Entry], base: int, epoch: int) -> None:
    stamped = restamp(encode_batch(entries, base_seqno=1, epoch=0), base_seqno=base, epoch=epoch)
    reparsed = Batch.from_bytes(stamped.data)
    assert reparsed == stamped
    assert reparsed.entries() == entries
