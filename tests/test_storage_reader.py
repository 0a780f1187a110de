"""LogReader: direct, read-only access to a data directory another writer is appending to."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from storage_support import quiet_logs, random_entries, small_config

from boomscooter.errors import CorruptLogError, SeqnoOutOfRangeError
from boomscooter.storage import Entry, LogReader, Record, SegmentedLog, encode_batch


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with quiet_logs():
        yield


def write(log: SegmentedLog, batches: int, seed: int = 0) -> list[Record]:
    rng = random.Random(seed)
    records: list[Record] = []
    for _ in range(batches):
        records += log.append(random_entries(rng, rng.randrange(1, 5)), epoch=1).records()
    return records


def drain(reader: LogReader, max_bytes: int = 700) -> list[Record]:
    records: list[Record] = []
    while more := reader.read(max_bytes=max_bytes):
        records += more
    return records


def test_reads_a_whole_log_across_segments(tmp_path: Path) -> None:
    with SegmentedLog.open(tmp_path, small_config()) as log:
        records = write(log, 120)
        assert log.segment_count > 5
    with LogReader(tmp_path) as reader:
        assert reader.first_seqno == 1
        assert drain(reader) == records
        assert reader.next_seqno == records[-1].seqno + 1
        assert reader.read() == []


@pytest.mark.parametrize("with_index", [True, False])
def test_starts_anywhere(tmp_path: Path, with_index: bool) -> None:
    with SegmentedLog.open(tmp_path, small_config()) as log:
        records = write(log, 120)
    if not with_index:
        for name in os.listdir(tmp_path):
            if name.endswith("index"):
                os.unlink(tmp_path / name)
    for start in (1, 2, 77, records[-1].seqno):
        with LogReader(tmp_path, from_seqno=start) as reader:
            assert drain(reader) == records[start - 1 :]


def test_follows_appends_and_rolls_as_notified(tmp_path: Path) -> None:
    rng = random.Random(5)
    with SegmentedLog.open(tmp_path, small_config()) as log, LogReader(tmp_path) as reader:
        assert reader.read() == []
        seen: list[Record] = []
        for _ in range(60):
            new: list[Record] = []
            for _ in range(rng.randrange(0, 4)):
                new += log.append(random_entries(rng, 2), epoch=1).records()
            reader.notify(*log.segment_files()[-1])
            got = drain(reader)
            assert got == new
            seen += got
        assert log.segment_count > 3
        assert [r.seqno for r in seen] == list(range(1, log.next_seqno))


def test_never_reads_past_the_notified_size(tmp_path: Path) -> None:
    with SegmentedLog.open(tmp_path, small_config(segment_bytes=10**6)) as log:
        first = log.append([Entry(1, b"one")], epoch=1)
        name, size_after_first = log.segment_files()[-1]
        log.append([Entry(2, b"two")], epoch=1)
        reader = LogReader(tmp_path)
        reader.notify(name, size_after_first)
        assert reader.read() == list(first.records())
        assert reader.read() == []
        reader.notify(*log.segment_files()[-1])
        assert [r.payload for r in reader.read()] == [b"two"]
        reader.close()


def test_a_partial_batch_waits_and_a_complete_one_arrives(tmp_path: Path) -> None:
    with SegmentedLog.open(tmp_path, small_config(segment_bytes=10**6)) as log:
        records = write(log, 3)
        name, _size = log.segment_files()[-1]
        following = encode_batch([Entry(9, b"x" * 100)], base_seqno=log.next_seqno, epoch=1)
    path = tmp_path / name
    with LogReader(tmp_path) as reader:
        with open(path, "ab") as f:  # a writer in the middle of its pwrite
            f.write(following.data[:70])
        assert drain(reader) == records
        with open(path, "ab") as f:
            f.write(following.data[70:])
        assert reader.read() == list(following.records())


def test_a_damaged_complete_batch_is_refused(tmp_path: Path) -> None:
    with SegmentedLog.open(tmp_path, small_config(segment_bytes=10**6)) as log:
        write(log, 3)
        name, size = log.segment_files()[-1]
    data = bytearray((tmp_path / name).read_bytes())
    data[size - 1] ^= 1
    (tmp_path / name).write_bytes(bytes(data))
    with LogReader(tmp_path) as reader, pytest.raises(CorruptLogError, match="CRC32C"):
        drain(reader)


def test_a_reader_behind_retention_is_told(tmp_path: Path) -> None:
    config = small_config(retention_bytes=3000)
    with SegmentedLog.open(tmp_path, config) as log:
        records = write(log, 100)
        log.apply_retention()
        first = log.first_seqno
    with LogReader(tmp_path, from_seqno=1) as reader, pytest.raises(SeqnoOutOfRangeError):
        reader.read()
    with LogReader(tmp_path) as reader:  # default: the oldest available
        assert drain(reader) == records[first - 1 :]


def test_an_empty_directory_then_a_log(tmp_path: Path) -> None:
    with LogReader(tmp_path) as reader:
        assert reader.read() == [] and reader.next_seqno is None
        with SegmentedLog.open(tmp_path, small_config()) as log:
            records = write(log, 2)
            reader.notify(*log.segment_files()[-1])
            assert drain(reader) == records


def test_notify_refuses_names_that_are_not_segments(tmp_path: Path) -> None:
    with LogReader(tmp_path) as reader, pytest.raises(ValueError, match="segment"):
        reader.notify("notes.txt", 10)
