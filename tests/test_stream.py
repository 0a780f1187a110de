"""The multicast stream: a codec table checked against pages built from the specification,
every kind of bad datagram, hypothesis round trips, reassembly under a seeded hostile
network, gap detection and repair, epoch rules, and a seeded simulation of encoder →
lossy network → receiver + Fetch (replay one seed with ``STREAM_SEED=n``)."""

from __future__ import annotations

import ast
import random
import struct
from collections.abc import Callable
from pathlib import Path

import crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from boomscooter.errors import ConfigError, LocalProtocolError
from boomscooter.storage import Batch, Entry, encode_batch
from boomscooter.stream import (
    STREAM_HEADER_BYTES,
    BatchReceived,
    CommitAdvanced,
    Drop,
    EpochChanged,
    Event,
    Gap,
    Kind,
    StreamDropError,
    StreamEncodeError,
    StreamEncoder,
    StreamHeader,
    StreamPage,
    StreamReceiver,
    decode_page,
    encode_page,
)

FRAG = Kind.BATCH_FRAGMENT
BEAT = Kind.HEARTBEAT


def spec_datagram(
    index: int, epoch: int, words: tuple[int, ...], fragment: bytes = b"", *, flags: int = 0
) -> bytes:
    """A datagram built from the module docstring alone (no code shared with the codec)."""
    kind, seqno, commit, count, offset, total = words
    payload = struct.pack(">BBBBQQIII", 0xB7, 1, kind, flags, seqno, commit, count, offset, total)
    payload += fragment
    head = struct.pack(">IIII", len(payload), index, epoch, crc32c.crc32c(payload))
    return head + payload + b"\xbc\x01\x00\x00"


CODEC_CASES: list[tuple[str, int, int, StreamHeader, bytes]] = [
    ("heartbeat of an empty log", 1, 0, StreamHeader(BEAT, 0, 0), b""),
    ("heartbeat", 7, 3, StreamHeader(BEAT, 120, 100), b""),
    ("whole batch in one page", 2, 1, StreamHeader(FRAG, 5, 4, 2, 0, 80), b"b" * 80),
    ("middle fragment", 9, 2, StreamHeader(FRAG, 10, 0, 1, 64, 200), b"m" * 64),
    ("last fragment", 10, 2, StreamHeader(FRAG, 10, 0, 1, 192, 200), b"l" * 8),
    (
        "largest values",
        2**32 - 1,
        2**32 - 1,
        StreamHeader(FRAG, 2**64 - 1, 2**64 - 1, 1, 2**32 - 2, 2**32 - 1),
        b"x",
    ),
]


@pytest.mark.parametrize(
    ("name", "index", "epoch", "header", "fragment"), CODEC_CASES, ids=[c[0] for c in CODEC_CASES]
)
def test_codec_table(
    name: str, index: int, epoch: int, header: StreamHeader, fragment: bytes
) -> None:
    wire = spec_datagram(index, epoch, tuple(header), fragment)
    assert encode_page(index, epoch, header, fragment) == wire
    page = decode_page(wire)
    assert (page.page_index, page.epoch, page.header, bytes(page.fragment)) == (
        index,
        epoch,
        header,
        fragment,
    )
    assert decode_page(wire + b"trailing garbage") == page
    assert decode_page(wire[:-4]) == page  # no trailer (a spec-only sender)


def test_golden_heartbeat_pins_the_format() -> None:
    wire = StreamEncoder(epoch=5).heartbeat(9, 8)
    assert (
        wire.hex()
        == (
            "00000020"  # payload size 32
            "00000001"  # page index 1
            "00000005"  # cast id = epoch 5
            + f"{crc32c.crc32c(wire[16:48]):08x}"
            + "b7010200"  # magic, version, kind HEARTBEAT, flags
            "0000000000000009"  # last seqno
            "0000000000000008"  # commit seqno
            "000000000000000000000000"  # count, offset, total
            "bc010000"  # bootcast trailer
        )
    )
    assert STREAM_HEADER_BYTES == 32


def _batch(base: int, count: int = 3, *, epoch: int = 1, size: int = 100, seed: int = 0) -> Batch:
    rng = random.Random(seed * 1_000_003 + base)
    entries = [Entry(1000 + i, rng.randbytes(size)) for i in range(count)]
    return encode_batch(entries, base_seqno=base, epoch=epoch)


def _good() -> bytes:
    return spec_datagram(1, 1, (FRAG, 1, 0, 1, 0, 100), b"z" * 50)


def _recrc(data: bytes) -> bytes:
    size = struct.unpack_from(">I", data)[0]
    return data[:12] + struct.pack(">I", crc32c.crc32c(data[16 : 16 + size])) + data[16:]


BAD_CASES: list[tuple[str, Callable[[], bytes], Drop]] = [
    ("empty", lambda: b"", Drop.SHORT),
    ("short header", lambda: _good()[:15], Drop.SHORT),
    ("truncated payload", lambda: _good()[:60], Drop.TRUNCATED),
    ("flipped payload bit", lambda: _good()[:40] + b"\x01" + _good()[41:], Drop.BAD_CRC),
    ("page index 0", lambda: _good()[:4] + bytes(4) + _good()[8:], Drop.BAD_INDEX),
    (
        "oversized page",
        lambda: spec_datagram(1, 1, (FRAG, 1, 0, 1, 0, 9000), bytes(2000)),
        Drop.OVERSIZED,
    ),
    (
        "payload shorter than a stream header",
        lambda: _recrc(struct.pack(">IIII", 4, 1, 1, 0) + b"abcd"),
        Drop.BAD_HEADER,
    ),
    (
        "bootcast file page",
        lambda: _recrc(struct.pack(">IIII", 40, 1, 1, 0) + bytes(40)),
        Drop.BAD_HEADER,
    ),
    ("bad magic", lambda: _recrc(_good()[:16] + b"\xb6" + _good()[17:]), Drop.BAD_HEADER),
    ("bad version", lambda: _recrc(_good()[:17] + b"\x02" + _good()[18:]), Drop.BAD_HEADER),
    ("unknown kind", lambda: spec_datagram(1, 1, (3, 1, 0, 1, 0, 100), b"z"), Drop.BAD_HEADER),
    (
        "unknown flags",
        lambda: spec_datagram(1, 1, (FRAG, 1, 0, 1, 0, 100), b"z", flags=1),
        Drop.BAD_HEADER,
    ),
    (
        "heartbeat with bytes",
        lambda: spec_datagram(1, 1, (BEAT, 1, 0, 0, 0, 0), b"z"),
        Drop.BAD_HEADER,
    ),
    ("heartbeat with count", lambda: spec_datagram(1, 1, (BEAT, 1, 0, 1, 0, 0)), Drop.BAD_HEADER),
    (
        "fragment of no records",
        lambda: spec_datagram(1, 1, (FRAG, 1, 0, 0, 0, 100), b"z"),
        Drop.BAD_HEADER,
    ),
    (
        "fragment at seqno 0",
        lambda: spec_datagram(1, 1, (FRAG, 0, 0, 1, 0, 100), b"z"),
        Drop.BAD_HEADER,
    ),
    ("empty fragment", lambda: spec_datagram(1, 1, (FRAG, 1, 0, 1, 0, 100)), Drop.BAD_HEADER),
    (
        "fragment past the batch",
        lambda: spec_datagram(1, 1, (FRAG, 1, 0, 1, 90, 100), b"z" * 11),
        Drop.BAD_HEADER,
    ),
    (
        "batch shorter than its header",
        lambda: spec_datagram(1, 1, (FRAG, 1, 0, 1, 0, 47), b"z"),
        Drop.BAD_HEADER,
    ),
    (
        "seqno range past u64",
        lambda: spec_datagram(1, 1, (FRAG, 2**64 - 1, 0, 2, 0, 100), b"z"),
        Drop.BAD_HEADER,
    ),
    ("older epoch", lambda: spec_datagram(1, 0, (BEAT, 1, 0, 0, 0, 0)), Drop.OLD_EPOCH),
]


@pytest.mark.parametrize(("name", "make", "reason"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_datagrams_are_dropped_and_counted(
    name: str, make: Callable[[], bytes], reason: Drop
) -> None:
    receiver = StreamReceiver(1, 1, page_size_bytes=1400)
    assert receiver.datagram(make(), 0.0) == []
    assert receiver.drops == {reason: 1}
    if reason is not Drop.OLD_EPOCH:
        with pytest.raises(StreamDropError) as info:
            decode_page(make(), page_size_bytes=1400)
        assert info.value.reason is reason


def test_random_garbage_never_raises() -> None:
    rng = random.Random(7)
    receiver = StreamReceiver(1, 1)
    good = StreamEncoder(1, 200).batch(_batch(1, size=500).data, 0)
    for i in range(3000):
        data = bytearray(rng.choice(good))
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if i % 3 == 0:
            data = bytearray(rng.randbytes(rng.randrange(80)))
        receiver.datagram(bytes(data), 0.0)
    # A mutation may hit only the trailer (advisory): such copies are still good pages.
    assert receiver.next_seqno in (1, 4)
    assert sum(receiver.drops.values()) > 2500


# -- round trips ------------------------------------------------------------------------------

entry_strategy = st.builds(
    Entry,
    st.integers(0, 2**63),
    st.binary(max_size=700),
    st.none() | st.text(max_size=8),
    st.none() | st.binary(max_size=8),
)


@settings(max_examples=60, deadline=None)
@given(
    batches=st.lists(st.lists(entry_strategy, min_size=1, max_size=8), min_size=1, max_size=5),
    page_size=st.integers(64, 3000),
    epoch=st.integers(0, 2**32 - 1),
    seed=st.integers(0, 2**32),
)
def test_round_trip(batches: list[list[Entry]], page_size: int, epoch: int, seed: int) -> None:
    encoder = StreamEncoder(epoch, page_size)
    receiver = StreamReceiver(epoch, 1, page_size_bytes=page_size)
    stored, wire, base = [], [], 1
    for entries in batches:
        batch = encode_batch(entries, base_seqno=base, epoch=epoch)
        pages = encoder.batch(batch.data, commit_seqno=base - 1)
        assert all(len(p) <= 16 + page_size + 4 for p in pages)
        stored.append(batch)
        wire += pages
        base = batch.next_seqno
    assert [decode_page(p).page_index for p in wire] == list(range(1, len(wire) + 1))
    random.Random(seed).shuffle(wire)
    events = [e for page in wire for e in receiver.datagram(page, 0.0)]
    delivered = [e.batch for e in events if isinstance(e, BatchReceived)]
    assert delivered == stored
    assert receiver.next_seqno == base
    assert receiver.buffered_bytes == 0


@pytest.mark.parametrize("seed", range(8))
def test_shuffled_duplicated_dropped_with_garbage(seed: int) -> None:
    rng = random.Random(seed)
    encoder = StreamEncoder(2, rng.choice([64, 150, 400]))
    stored = [
        _batch(1 + 5 * i, 5, epoch=2, size=rng.randrange(1, 300), seed=seed) for i in range(12)
    ]
    wire = [p for b in stored for p in encoder.batch(b.data, 0)]
    lost = set(rng.sample(range(len(wire)), len(wire) // 10))
    sent = [p + rng.randbytes(rng.randrange(8)) for i, p in enumerate(wire) if i not in lost]
    sent += rng.sample(sent, len(sent) // 3)  # duplicates
    rng.shuffle(sent)
    receiver = StreamReceiver(2, 1, reorder_window_s=0.01)
    events = [e for page in sent for e in receiver.datagram(page, 0.0)]
    events += receiver.poll(0.02)
    gaps = [e for e in events if isinstance(e, Gap)]
    assert gaps or not lost
    for gap in gaps:
        for b in stored:
            if b.base_seqno <= gap.to_seqno and b.last_seqno >= gap.from_seqno:
                events += receiver.repaired(b.data)
    delivered = [e.batch for e in events if isinstance(e, BatchReceived)]
    assert delivered == stored
    assert receiver.drops[Drop.DUPLICATE] + receiver.drops[Drop.STALE] > 0
    assert receiver.poll(5.0) == []


# -- encoder rules ------------------------------------------------------------------------------


def test_encoder_cuts_pages_and_numbers_them() -> None:
    batch = _batch(1, 1, size=3000)  # 3060 bytes
    encoder = StreamEncoder(4, 1000)
    pages = [decode_page(p) for p in encoder.batch(batch.data, 0)]
    assert [(p.page_index, p.header.offset, len(p.fragment)) for p in pages] == [
        (1, 0, 968),
        (2, 968, 968),
        (3, 1936, 968),
        (4, 2904, 156),
    ]
    assert {
        (p.epoch, p.header.seqno, p.header.record_count, p.header.total_bytes) for p in pages
    } == {(4, 1, 1, 3060)}
    assert decode_page(encoder.heartbeat(1, 1)).page_index == 5
    wrap = StreamEncoder(4, first_page_index=2**32 - 1)
    assert [decode_page(wrap.heartbeat(0, 0)).page_index for _ in range(3)] == [2**32 - 1, 1, 2]


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("not a batch", b"hello world" * 10, "not a batch"),
        ("truncated", _batch(1).data[:-1], "bytes"),
        ("trailing bytes", bytes(_batch(1).data) + b"x", "bytes"),
        ("oversize", _batch(1, size=2000).data, "batch of"),
        ("newer epoch", _batch(1, epoch=9).data, "epoch"),
    ],
)
def test_encoder_refuses_bad_batches(name: str, data: bytes, message: str) -> None:
    encoder = StreamEncoder(1, 200, max_batch_bytes=1000)
    with pytest.raises(StreamEncodeError, match=message) as info:
        encoder.batch(data, 0)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, LocalProtocolError)
    assert encoder.next_page_index == 1  # nothing was sent


def test_encoder_refuses_going_backwards_and_bad_values() -> None:
    encoder = StreamEncoder(1)
    encoder.batch(_batch(5).data, 0)
    with pytest.raises(StreamEncodeError, match="goes back"):
        encoder.batch(_batch(7).data, 0)
    encoder.batch(_batch(20).data, 0)  # forward jumps are the receiver's gap to repair
    with pytest.raises(StreamEncodeError):
        encoder.batch(_batch(30).data, -1)
    with pytest.raises(StreamEncodeError):
        encoder.heartbeat(3, 4)
    for bad in (
        {"epoch": -1},
        {"epoch": 2**32},
        {"page_size_bytes": 63},
        {"page_size_bytes": 70000},
    ):
        with pytest.raises(ConfigError):
            StreamEncoder(**{"epoch": 1, **bad})
    with pytest.raises(ConfigError):
        StreamReceiver(1, 0)


# -- gaps and repair ------------------------------------------------------------------------------


def _feed(receiver: StreamReceiver, pages: list[bytes], now: float) -> list[Event]:
    return [e for p in pages for e in receiver.datagram(p, now)]


def _delivered(events: list[Event]) -> list[tuple[int, int]]:
    return [(e.base_seqno, e.last_seqno) for e in events if isinstance(e, BatchReceived)]


def test_mid_stream_gap_is_reported_after_the_reorder_window_and_repaired() -> None:
    encoder = StreamEncoder(1, 1400)
    b1, b2, b3 = _batch(1), _batch(4), _batch(7)
    receiver = StreamReceiver(1, 1, reorder_window_s=0.05, repair_timeout_s=1.0)
    assert _delivered(_feed(receiver, encoder.batch(b1.data, 0), 0.0)) == [(1, 3)]
    encoder.batch(b2.data, 3)  # lost
    assert _feed(receiver, encoder.batch(b3.data, 3), 0.01) == [CommitAdvanced(3)]
    assert receiver.next_deadline() == pytest.approx(0.05)  # batch 1's evidence: nothing
    assert receiver.poll(0.05) == []
    assert receiver.next_deadline() == pytest.approx(0.06)  # batch 3 may be just reordered
    assert receiver.poll(0.07) == [Gap(4, 6)]
    assert receiver.poll(0.5) == []  # asked for: not asked again yet
    assert receiver.poll(1.08) == [Gap(4, 6)]  # the repair timed out: ask again
    events = receiver.repaired(b2.data)
    assert [(type(e).__name__, e.repaired) for e in events if isinstance(e, BatchReceived)] == [
        ("BatchReceived", True),
        ("BatchReceived", False),
    ]
    assert _delivered(events) == [(4, 6), (7, 9)]
    assert receiver.repaired(b2.data) == [] and receiver.drops[Drop.STALE] == 1
    assert receiver.poll(10.0) == [] and receiver.next_deadline() is None


def test_reordered_batch_inside_the_window_is_not_a_gap() -> None:
    encoder = StreamEncoder(1, 1400)
    p1, p2 = encoder.batch(_batch(1).data, 0), encoder.batch(_batch(4).data, 0)
    receiver = StreamReceiver(1, 1, reorder_window_s=0.05)
    assert _feed(receiver, p2, 0.0) == []
    assert _delivered(_feed(receiver, p1, 0.04)) == [(1, 3), (4, 6)]
    assert receiver.poll(1.0) == []


def test_tail_loss_is_reported_from_a_heartbeat() -> None:
    encoder = StreamEncoder(1, 1400)
    receiver = StreamReceiver(1, 1, reorder_window_s=0.05)
    _feed(receiver, encoder.batch(_batch(1).data, 0), 0.0)
    encoder.batch(_batch(4).data, 0)  # lost, and nothing follows
    assert receiver.poll(1.0) == []
    assert receiver.datagram(encoder.heartbeat(6, 3), 1.0) == [CommitAdvanced(3)]
    assert receiver.datagram(encoder.heartbeat(6, 3), 1.06) == [Gap(4, 6)]
    assert _delivered(receiver.repaired(_batch(4).data)) == [(4, 6)]
    assert receiver.datagram(encoder.heartbeat(6, 6), 2.0) == [CommitAdvanced(6)]
    assert receiver.poll(3.0) == []


def test_commit_beyond_what_arrived_is_a_gap() -> None:
    receiver = StreamReceiver(1, 1, reorder_window_s=0.0)
    assert receiver.datagram(StreamEncoder(1).heartbeat(9, 9), 0.0) == [
        CommitAdvanced(9),
        Gap(1, 9),
    ]


def test_lost_fragment_is_reported_after_the_window() -> None:
    encoder = StreamEncoder(1, 100)
    b1, b2 = _batch(1, size=200), _batch(4, size=200)
    p1, p2 = encoder.batch(b1.data, 0), encoder.batch(b2.data, 0)
    receiver = StreamReceiver(1, 1, reorder_window_s=0.05)
    _feed(receiver, p1[:3] + p1[4:], 0.0)  # one fragment of batch 1 lost
    assert _feed(receiver, p2, 0.02) == []
    assert receiver.poll(0.051) == [Gap(1, 3)]  # batch 2 is still within its window
    assert receiver.poll(0.1) == []  # batch 2 is complete, only batch 1 is missing
    assert _delivered(_feed(receiver, [p1[3]], 0.2)) == [(1, 3), (4, 6)]  # late after all
    assert receiver.repaired(b1.data) == []
    assert receiver.drops[Drop.STALE] == 1


def test_partial_batch_without_later_evidence_is_a_gap() -> None:
    encoder = StreamEncoder(1, 100)
    pages = encoder.batch(_batch(1, size=200).data, 0)
    receiver = StreamReceiver(1, 1, reorder_window_s=0.05)
    _feed(receiver, pages[:1], 0.0)
    assert receiver.next_deadline() == pytest.approx(0.05)
    assert receiver.poll(0.05) == [Gap(1, 3)]


def test_repair_of_a_later_batch_is_buffered_and_only_gaps_are_asked() -> None:
    receiver = StreamReceiver(1, 1, reorder_window_s=0.0)
    assert receiver.repaired(_batch(7).data) == []
    assert receiver.poll(0.0) == [Gap(1, 6)]
    assert _delivered(receiver.repaired(_batch(1).data)) == [(1, 3)]
    assert _delivered(receiver.repaired(_batch(4).data)) == [(4, 6), (7, 9)]
    assert receiver.buffered_bytes == 0


def test_corrupt_batch_behind_valid_pages_is_not_delivered() -> None:
    data = bytearray(_batch(1).data)
    data[-1] ^= 0xFF  # page CRCs are computed over the corrupt bytes: only the batch CRC fails
    receiver = StreamReceiver(1, 1)
    assert _feed(receiver, StreamEncoder(1).batch(bytes(data), 0), 0.0) == []
    assert receiver.drops == {Drop.BAD_BATCH: 1}
    assert receiver.repaired(bytes(data)) == []
    assert receiver.repaired(b"garbage") == []
    assert receiver.drops == {Drop.BAD_BATCH: 3}


def test_pages_that_contradict_their_batch_are_dropped() -> None:
    receiver = StreamReceiver(1, 1)
    first = spec_datagram(1, 1, (FRAG, 1, 0, 3, 0, 200), b"a" * 100)
    assert receiver.datagram(first, 0.0) == []
    assert receiver.datagram(spec_datagram(2, 1, (FRAG, 1, 0, 3, 0, 300), b"a"), 0.0) == []
    assert receiver.datagram(spec_datagram(3, 1, (FRAG, 1, 0, 3, 0, 200), b"b" * 100), 0.0) == []
    assert receiver.datagram(first, 0.0) == []
    assert receiver.drops == {Drop.INCONSISTENT: 2, Drop.DUPLICATE: 1}
    lying = _batch(1)  # a real batch announced under another seqno
    pages = StreamEncoder(1).batch(lying.data, 0)
    relabelled = [spec_datagram(9, 1, (FRAG, 50, 0, 3, 0, len(lying.data)), bytes(lying.data))]
    assert _feed(receiver, relabelled, 0.0) == []
    assert receiver.drops[Drop.BAD_BATCH] == 1
    assert _delivered(_feed(receiver, pages, 0.0)) == []  # batch 1 is still partial (200 bytes)


def test_buffer_is_bounded_and_the_next_batch_always_fits() -> None:
    encoder = StreamEncoder(1, 200)
    stored = [_batch(1 + 3 * i, size=100) for i in range(6)]
    pages = [encoder.batch(b.data, 0) for b in stored]
    receiver = StreamReceiver(1, 1, reorder_window_s=0.0, max_buffered_bytes=500)
    events = _feed(receiver, [p for batch_pages in pages[1:] for p in batch_pages], 0.0)
    assert receiver.buffered_bytes <= 500
    assert receiver.drops[Drop.BUFFER_FULL] > 0
    events += _feed(receiver, pages[0], 0.0)  # exempt from the bound
    events += receiver.poll(0.0)
    for gap in [e for e in events if isinstance(e, Gap)]:
        for b in stored:
            if b.base_seqno <= gap.to_seqno and b.last_seqno >= gap.from_seqno:
                events += receiver.repaired(b.data)
    assert [e.batch for e in events if isinstance(e, BatchReceived)] == stored


def test_receiver_started_inside_a_batch_delivers_it_once() -> None:
    receiver = StreamReceiver(1, 5, reorder_window_s=0.0)
    encoder = StreamEncoder(1)
    assert _delivered(_feed(receiver, encoder.batch(_batch(4).data, 0), 0.0)) == [(4, 6)]
    assert _delivered(_feed(receiver, encoder.batch(_batch(7).data, 0), 0.0)) == [(7, 9)]
    assert receiver.repaired(_batch(4).data) == []


def test_too_large_batch_is_dropped() -> None:
    receiver = StreamReceiver(1, 1, max_batch_bytes=200)
    assert _feed(receiver, StreamEncoder(1, 100).batch(_batch(1, size=300).data, 0), 0.0) == []
    assert receiver.drops[Drop.TOO_LARGE] > 0


# -- epochs ---------------------------------------------------------------------------------------


def test_epoch_rules() -> None:
    receiver = StreamReceiver(5, 1)
    older, newer, newest = StreamEncoder(4), StreamEncoder(6), StreamEncoder(7)
    assert _feed(receiver, older.batch(_batch(1, epoch=4).data, 0), 0.0) == []
    assert _feed(receiver, newer.batch(_batch(1, epoch=6).data, 0), 0.0) == [EpochChanged(6)]
    assert receiver.datagram(newer.heartbeat(3, 3), 0.0) == []  # reported once
    assert receiver.datagram(newest.heartbeat(3, 3), 0.0) == [EpochChanged(7)]
    assert receiver.drops == {Drop.OLD_EPOCH: 1, Drop.NEW_EPOCH: 3}
    assert receiver.commit_seqno == 0 and receiver.next_seqno == 1
    # Batches of older epochs are history: fetched or re-sent under the current epoch.
    assert _delivered(receiver.repaired(_batch(1, epoch=2).data)) == [(1, 3)]
    assert _delivered(_feed(receiver, StreamEncoder(5).batch(_batch(4, epoch=3).data, 0), 0)) == [
        (4, 6)
    ]
    assert receiver.repaired(_batch(7, epoch=8).data) == [EpochChanged(8)]
    # A page of this epoch whose batch claims a newer one is not believed.
    claim = bytes(_batch(7, epoch=9).data)
    forged = spec_datagram(1, 5, (FRAG, 7, 0, 3, 0, len(claim)), claim)
    assert receiver.datagram(forged, 0.0) == []
    assert receiver.drops[Drop.BAD_BATCH] == 1


def test_stream_is_sans_io() -> None:
    """The codec and the receiver core (listener.py is their asyncio shell)."""
    package = Path(__file__).parents[1] / "boomscooter" / "stream"
    modules = [package / n for n in ("__init__.py", "codec.py", "receiver.py")]
    for source in modules:
        imported: set[str] = set()
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        bad = imported & {"asyncio", "socket", "time", "os", "threading", "selectors"}
        assert not bad, (source.name, bad)


def test_page_value_is_frozen() -> None:
    page = decode_page(_good())
    assert isinstance(page, StreamPage)
    with pytest.raises(AttributeError):
        page.epoch = 2  # type: ignore[misc]
