"""The producer journal: its entry codec, loading (and what it ignores), torn tails, undo,
compaction, reopening, and a leader that still recognises a retry after a restart."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from structlog.testing import capture_logs

from boomscooter.node.core import Appended, DedupeTable
from boomscooter.node.journal import (
    JOURNAL_NAME,
    ProducerJournal,
    decode_entries,
    encode_entry,
)
from boomscooter.storage import FsyncMode, FsyncPolicy, split_batches
from boomscooter.storage.batch import crc32c
from boomscooter.v1 import boomscooter_pb2 as pb
from boomscooter.v1 import boomscooter_pb2_grpc

from support.log import running_leader

Item = tuple[str, int, Appended]

ITEMS: list[Item] = [
    ("alpha", 1, Appended(1, 3, 1)),
    ("beta", 7, Appended(4, 1, 1)),
    ("alpha", 2, Appended(5, 2, 1)),
    ("ünï-🛴", 2**64 - 1, Appended(7, 4, 2**32 - 1)),
    ("", 0, Appended(11, 1, 0)),
    ("x" * 128, 3, Appended(12, 10, 2)),
]


def table_of(items: list[Item], **options: int) -> DedupeTable:
    table = DedupeTable(**options)
    for producer_id, sequence, appended in items:
        table.add(producer_id, sequence, appended)
    return table


def write_journal(directory: Path, items: list[Item]) -> ProducerJournal:
    """A journal opened on an empty directory with ``items`` appended (still open)."""
    journal = ProducerJournal(str(directory))
    assert journal.load(DedupeTable(), last_seqno=0) == 0
    for producer_id, sequence, appended in items:
        journal.append(producer_id, sequence, appended)
    return journal


def load(directory: Path, last_seqno: int = 10**9) -> tuple[DedupeTable, int, ProducerJournal]:
    table = DedupeTable()
    journal = ProducerJournal(str(directory))
    loaded = journal.load(table, last_seqno=last_seqno)
    return table, loaded, journal


# -- the entry codec --------------------------------------------------------------------------


@pytest.mark.parametrize("item", ITEMS, ids=[f"{i[0][:8]!r}/{i[1]}" for i in ITEMS])
def test_entry_layout(item: Item) -> None:
    producer_id, sequence, appended = item
    data = encode_entry(producer_id, sequence, appended)
    ident = producer_id.encode()
    assert len(data) == 30 + len(ident)
    crc, id_len, seq, base, count, epoch = struct.unpack_from("<IHQQII", data)
    assert (id_len, seq, base, count, epoch) == (
        len(ident),
        sequence,
        appended.base_seqno,
        appended.record_count,
        appended.epoch,
    )
    assert data[30:] == ident
    assert crc == crc32c(data[4:])


def test_entries_round_trip() -> None:
    data = b"".join(encode_entry(*item) for item in ITEMS)
    entries, valid = decode_entries(data)
    assert entries == ITEMS
    assert valid == len(data)


def test_decode_empty() -> None:
    assert decode_entries(b"") == ([], 0)


def test_surrogate_producer_id_round_trips() -> None:
    data = encode_entry("bad\udc80id", 5, Appended(1, 1, 1))
    assert decode_entries(data) == ([("bad\udc80id", 5, Appended(1, 1, 1))], len(data))


def entry_bytes() -> tuple[bytes, list[int]]:
    """The journal bytes of ITEMS and the offset where each entry starts."""
    parts = [encode_entry(*item) for item in ITEMS]
    offsets = [sum(len(p) for p in parts[:i]) for i in range(len(parts))]
    return b"".join(parts), offsets


@pytest.mark.parametrize("cut", [1, 4, 29, 30, 31])
def test_decode_stops_at_a_truncated_entry(cut: int) -> None:
    data, offsets = entry_bytes()
    last = offsets[-1]
    entries, valid = decode_entries(data[: last + cut])
    assert entries == ITEMS[:-1]
    assert valid == last


def test_decode_stops_at_a_flipped_bit_and_drops_what_follows() -> None:
    data, offsets = entry_bytes()
    ends = [*offsets[1:], len(data)]
    for index in range(len(ITEMS)):
        for byte in (0, 4, 6, 14, 22, 26, 30):
            raw = bytearray(data)
            position = offsets[index] + byte
            if position >= ends[index]:
                continue  # past this entry (an empty producer id)
            raw[position] ^= 0x10
            entries, valid = decode_entries(bytes(raw))
            assert entries == ITEMS[:index], (index, byte)
            assert valid == offsets[index]


def test_decode_rejects_entries_with_no_records_or_seqno_zero() -> None:
    good = encode_entry("p", 1, Appended(1, 1, 1))
    for bad in (Appended(5, 0, 1), Appended(0, 3, 1)):
        data = good + encode_entry("p", 2, bad)  # a valid CRC over a nonsense entry
        assert decode_entries(data) == ([("p", 1, Appended(1, 1, 1))], len(good))


def test_decode_rejects_an_id_that_is_not_utf8() -> None:
    body = struct.pack("<HQQII", 2, 1, 1, 1, 1) + b"\xff\xfe"
    bad = struct.pack("<I", crc32c(body)) + body
    good = encode_entry("p", 1, Appended(1, 1, 1))
    assert decode_entries(good + bad + good) == ([("p", 1, Appended(1, 1, 1))], len(good))


# -- ProducerJournal --------------------------------------------------------------------------


def test_missing_journal_loads_nothing_and_creates_the_file(tmp_path: Path) -> None:
    table, loaded, journal = load(tmp_path)
    try:
        assert loaded == 0
        assert len(table) == 0
        assert (tmp_path / JOURNAL_NAME).read_bytes() == b""
        assert not (tmp_path / (JOURNAL_NAME + ".tmp")).exists()
    finally:
        journal.close()


def test_reopened_journal_reproduces_the_table(tmp_path: Path) -> None:
    journal = write_journal(tmp_path, ITEMS)
    journal.close()
    journal.close()  # closing twice is harmless
    expected = table_of(ITEMS)
    table, loaded, reopened = load(tmp_path)
    try:
        assert loaded == len(ITEMS)
        assert list(table.items()) == list(expected.items())
        for producer_id, sequence, appended in ITEMS:
            assert table.lookup(producer_id, sequence) == appended
        # loading rewrote the journal compactly: exactly the table's entries
        data = (tmp_path / JOURNAL_NAME).read_bytes()
        assert data == b"".join(encode_entry(*item) for item in expected.items())
        # and it is open for appends again
        reopened.append("gamma", 1, Appended(30, 1, 1))
    finally:
        reopened.close()
    table, loaded, journal = load(tmp_path)
    journal.close()
    assert loaded == len(ITEMS) + 1
    assert table.lookup("gamma", 1) == Appended(30, 1, 1)


def test_load_ignores_entries_past_the_last_seqno(tmp_path: Path) -> None:
    items: list[Item] = [
        ("a", 1, Appended(1, 3, 1)),  # 1..3
        ("b", 1, Appended(4, 2, 1)),  # 4..5
        ("a", 2, Appended(6, 2, 1)),  # 6..7: straddles last_seqno 6
        ("b", 2, Appended(8, 1, 1)),  # 8: never reached the log
    ]
    write_journal(tmp_path, items).close()
    table, loaded, journal = load(tmp_path, last_seqno=6)
    journal.close()
    assert loaded == 2
    assert list(table.items()) == items[:2]
    assert table.lookup("a", 2) is None
    assert table.lookup("b", 2) is None
    # the ignored entries are gone from the rewritten file, not just skipped
    entries, _ = decode_entries((tmp_path / JOURNAL_NAME).read_bytes())
    assert entries == items[:2]


def test_load_with_an_empty_log_ignores_everything(tmp_path: Path) -> None:
    write_journal(tmp_path, ITEMS).close()
    table, loaded, journal = load(tmp_path, last_seqno=0)
    journal.close()
    assert loaded == 0
    assert len(table) == 0
    assert (tmp_path / JOURNAL_NAME).read_bytes() == b""


def _truncate(data: bytes, last: int) -> bytes:
    return data[: last + 17]


def _garbage(data: bytes, last: int) -> bytes:
    return data + b"\x01garbage that is not an entry at all\xff" * 2


def _zeros(data: bytes, last: int) -> bytes:
    return data + bytes(64)


def _flip(data: bytes, last: int) -> bytes:
    raw = bytearray(data)
    raw[last + 15] ^= 0x04  # a bit of the last entry's base seqno
    return bytes(raw)


TORN: dict[str, tuple[Callable[[bytes, int], bytes], int]] = {
    # name: (corruption, how many entries survive)
    "truncated last entry": (_truncate, len(ITEMS) - 1),
    "garbage after the entries": (_garbage, len(ITEMS)),
    "zeroed tail": (_zeros, len(ITEMS)),
    "flipped bit in the last entry": (_flip, len(ITEMS) - 1),
}


@pytest.mark.parametrize("name", list(TORN))
def test_torn_tail_keeps_the_valid_prefix(tmp_path: Path, name: str) -> None:
    corrupt, survivors = TORN[name]
    write_journal(tmp_path, ITEMS).close()
    path = tmp_path / JOURNAL_NAME
    data = path.read_bytes()
    _, offsets = entry_bytes()
    path.write_bytes(corrupt(data, offsets[-1]))
    valid = offsets[survivors] if survivors < len(ITEMS) else len(data)
    size = len(path.read_bytes())
    with capture_logs() as logs:
        table, loaded, journal = load(tmp_path)
    try:
        assert loaded == survivors
        assert list(table.items()) == list(table_of(ITEMS[:survivors]).items())
        warnings = [e for e in logs if e["event"] == "journal.truncated"]
        assert len(warnings) == 1
        assert warnings[0]["log_level"] == "warning"
        assert warnings[0]["path"] == str(path)
        assert warnings[0]["offset"] == valid
        assert warnings[0]["dropped"] == size - valid
        # the torn tail is gone and appends continue after the valid prefix
        journal.append("after", 1, Appended(99, 1, 1))
    finally:
        journal.close()
    table, loaded, journal = load(tmp_path)
    journal.close()
    assert loaded == survivors + 1
    assert table.lookup("after", 1) == Appended(99, 1, 1)


def test_a_clean_journal_logs_no_warning(tmp_path: Path) -> None:
    write_journal(tmp_path, ITEMS).close()
    with capture_logs() as logs:
        _, _, journal = load(tmp_path)
    journal.close()
    assert [e for e in logs if e["event"] == "journal.truncated"] == []


def test_undo_removes_the_last_entry(tmp_path: Path) -> None:
    journal = write_journal(tmp_path, ITEMS[:2])
    path = tmp_path / JOURNAL_NAME
    before = path.read_bytes()
    journal.append(*ITEMS[2])
    assert len(path.read_bytes()) > len(before)
    journal.undo(*ITEMS[2])
    assert path.read_bytes() == before
    journal.append(*ITEMS[3])  # appends continue where the undone entry was
    journal.close()
    assert decode_entries(path.read_bytes()) == (
        [ITEMS[0], ITEMS[1], ITEMS[3]],
        len(path.read_bytes()),
    )


def test_rewrite_keeps_only_the_tables_entries(tmp_path: Path) -> None:
    journal = ProducerJournal(str(tmp_path), compact_bytes=200)
    table = DedupeTable(window=2)
    journal.load(table, last_seqno=0)
    path = tmp_path / JOURNAL_NAME
    try:
        for sequence in range(1, 9):
            appended = Appended(sequence, 1, 1)
            journal.append("p", sequence, appended)
            table.add("p", sequence, appended)
        assert len(decode_entries(path.read_bytes())[0]) == 8
        assert journal.needs_compaction()  # 8 * 31 bytes > 200
        journal.rewrite(table)
        assert not journal.needs_compaction()
        assert decode_entries(path.read_bytes())[0] == [
            ("p", 7, Appended(7, 1, 1)),
            ("p", 8, Appended(8, 1, 1)),
        ]
        assert not (tmp_path / (JOURNAL_NAME + ".tmp")).exists()
        journal.append("p", 9, Appended(9, 1, 1))  # the new file is the one appended to
    finally:
        journal.close()
    entries, _ = decode_entries(path.read_bytes())
    assert [s for _, s, _ in entries] == [7, 8, 9]


def test_needs_compaction_tracks_the_size(tmp_path: Path) -> None:
    journal = ProducerJournal(str(tmp_path), compact_bytes=62)
    journal.load(DedupeTable(), last_seqno=0)
    try:
        journal.append("p", 1, Appended(1, 1, 1))  # 31 bytes
        journal.append("p", 2, Appended(2, 1, 1))  # 62
        assert not journal.needs_compaction()
        journal.append("p", 3, Appended(3, 1, 1))  # 93
        assert journal.needs_compaction()
        journal.undo("p", 3, Appended(3, 1, 1))
        assert not journal.needs_compaction()
    finally:
        journal.close()


def test_load_compacts_a_journal_larger_than_the_window(tmp_path: Path) -> None:
    items = [("p", s, Appended(s, 1, 1)) for s in range(1, 2001)]
    write_journal(tmp_path, items).close()
    table, loaded, journal = load(tmp_path)
    journal.close()
    assert loaded == 2000  # every entry was read
    entries, _ = decode_entries((tmp_path / JOURNAL_NAME).read_bytes())
    assert len(entries) == table.window == 1024
    assert entries[0][1] == 2000 - 1023
    assert os.path.getsize(tmp_path / JOURNAL_NAME) == 1024 * 31


# -- the leader -------------------------------------------------------------------------------

ALWAYS = FsyncPolicy(mode=FsyncMode.ALWAYS)


def request(sequence: int, *payloads: bytes, producer_id: str = "producer-1") -> pb.ProduceRequest:
    return pb.ProduceRequest(
        producer_id=producer_id,
        batch_sequence=sequence,
        ack_level=pb.ACK_LEVEL_LEADER,
        record_list=pb.RecordList(records=[pb.Record(payload=p) for p in payloads]),
    )


async def produce(address: str, *requests: pb.ProduceRequest) -> list[pb.ProduceResponse]:
    channel = grpc.aio.insecure_channel(address)
    try:
        stub = boomscooter_pb2_grpc.BoomscooterStub(channel)
        call = stub.Produce()
        for item in requests:
            await call.write(item)
        await call.done_writing()
        responses = [r async for r in call]
        assert await call.code() == grpc.StatusCode.OK
        return responses
    finally:
        await channel.close()


async def fetch_all(address: str) -> list[bytes]:
    channel = grpc.aio.insecure_channel(address)
    try:
        stub = boomscooter_pb2_grpc.BoomscooterStub(channel)
        response = await stub.Fetch(pb.FetchRequest(from_seqno=1, include_uncommitted=True))
        return [r.payload for b in split_batches(response.batches) for r in b.records()]
    finally:
        await channel.close()


async def test_leader_answers_a_retry_after_restart_as_duplicate(tmp_path: Path) -> None:
    async with running_leader(tmp_path, fsync=ALWAYS) as node:
        first = await produce(
            node.address,
            request(1, b"a", b"b", b"c"),
            request(2, b"d"),
            request(1, b"other", producer_id="producer-2"),
        )
        assert [r.WhichOneof("result") for r in first] == ["ack"] * 3
        assert [(r.ack.base_seqno, r.ack.record_count, r.ack.duplicate) for r in first] == [
            (1, 3, False),
            (4, 1, False),
            (5, 1, False),
        ]
        epoch = first[0].ack.epoch
        assert node.log.last_seqno == 5
    assert (tmp_path / JOURNAL_NAME).stat().st_size > 0

    async with running_leader(tmp_path, fsync=ALWAYS) as node:
        assert node.log.last_seqno == 5
        assert len(node.dedupe) == 2
        again = await produce(
            node.address,
            request(1, b"a", b"b", b"c"),
            request(2, b"different payload, same sequence"),
            request(1, b"other", producer_id="producer-2"),
        )
        for response, (base, count, sequence) in zip(
            again, [(1, 3, 1), (4, 1, 2), (5, 1, 1)], strict=True
        ):
            assert response.WhichOneof("result") == "ack", response
            assert response.batch_sequence == sequence
            assert response.ack.duplicate is True
            assert (response.ack.base_seqno, response.ack.record_count) == (base, count)
            assert response.ack.epoch == epoch
        assert node.log.last_seqno == 5  # nothing appended
        assert node.counters["duplicates"] == 3
        assert await fetch_all(node.address) == [b"a", b"b", b"c", b"d", b"other"]
        # a new sequence is appended after the originals
        (new,) = await produce(node.address, request(3, b"e"))
        assert (new.ack.base_seqno, new.ack.duplicate) == (6, False)
        assert node.log.last_seqno == 6


def append_bytes(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


async def test_leader_forgets_journal_entries_of_batches_the_log_lost(tmp_path: Path) -> None:
    async with running_leader(tmp_path, fsync=ALWAYS) as node:
        (ack,) = await produce(node.address, request(1, b"a"))
        assert ack.ack.base_seqno == 1
    # an entry whose batch never reached the log (a crash between journal and append)
    append_bytes(tmp_path / JOURNAL_NAME, encode_entry("producer-1", 2, Appended(2, 1, 1)))
    async with running_leader(tmp_path, fsync=ALWAYS) as node:
        assert node.dedupe.lookup("producer-1", 2) is None
        (ack,) = await produce(node.address, request(2, b"b"))
        assert (ack.ack.base_seqno, ack.ack.duplicate) == (2, False)
        assert await fetch_all(node.address) == [b"a", b"b"]
