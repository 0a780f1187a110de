"""LogReader: direct, read-only access to a data directory another writer is appending to."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from boomscooter.errors import CorruptLogError, LogTruncatedError, SeqnoOutOfRangeError
from boomscooter.storage import Entry, LogReader, Record, SegmentedLog, encode_batch

from support.storage import quiet_logs, random_entries, small_config


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


# -- committed limits and truncation under the reader -----------------------------------


def test_a_notified_reader_stops_at_the_notified_size_even_in_a_sealed_segment(
    tmp_path: Path,
) -> None:
    with SegmentedLog.open(tmp_path, small_config(segment_bytes=10**6)) as log:
        first = log.append([Entry(1, b"one")], epoch=1)
        committed = log.segment_files()[-1]
        second = log.append([Entry(2, b"two")], epoch=1)  # not committed yet
        log.roll()  # the segment now has a successor...
        third = log.append([Entry(3, b"three")], epoch=1)  # ...which was never announced
        with LogReader(tmp_path) as reader:
            reader.notify(*committed)
            assert drain(reader) == list(first.records())
            assert reader.read() == []
            reader.notify(*log.segment_files()[-1])
            assert drain(reader) == [*second.records(), *third.records()]


def test_a_notified_reader_reads_no_segment_after_the_notified_one(tmp_path: Path) -> None:
    with SegmentedLog.open(tmp_path, small_config()) as log:
        records = write(log, 60)
        files = log.segment_files()
        assert len(files) > 3
        with LogReader(tmp_path) as reader:
            reader.notify(*files[1])  # the second segment, whole
            got = drain(reader)
            assert got and got[-1].seqno == int(files[2][0][:20]) - 1
            assert got == records[: len(got)]


def test_a_notification_below_what_was_read_is_an_error(tmp_path: Path) -> None:
    with SegmentedLog.open(tmp_path, small_config(segment_bytes=10**6)) as log:
        batches = [log.append([Entry(i, b"x" * 10)], epoch=1) for i in range(5)]
        with LogReader(tmp_path) as reader:
            reader.notify(*log.segment_files()[-1])
            assert len(drain(reader)) == 5
            log.truncate_after(batches[2].last_seqno)
            reader.notify(*log.segment_files()[-1])
            with pytest.raises(LogTruncatedError, match="up to seqno 5"):
                reader.read()


@pytest.mark.parametrize("regrow", [False, True])
def test_a_file_cut_below_the_reader_is_an_error(tmp_path: Path, regrow: bool) -> None:
    """No notifications: the file shrinks under the reader (and maybe grows back with other
    batches past the reader's position); what it returned is gone."""
    with SegmentedLog.open(tmp_path, small_config(segment_bytes=10**6)) as log:
        batches = [log.append([Entry(i, b"x" * 10)], epoch=1) for i in range(5)]
        with LogReader(tmp_path) as reader:
            assert len(drain(reader)) == 5
            log.truncate_after(batches[1].last_seqno)
            if regrow:
                for i in range(6):
                    log.append([Entry(i, b"other" * 3)], epoch=2)
            with pytest.raises(LogTruncatedError):
                reader.read()


def test_a_replaced_file_is_followed_when_what_was_read_is_still_there(tmp_path: Path) -> None:
    """truncate_after inside a batch replaces the file by a shortened copy (a new inode): a
    reader that had not got that far goes on reading the new file."""
    with SegmentedLog.open(tmp_path, small_config(segment_bytes=10**6)) as log:
        first = log.append([Entry(1, b"a"), Entry(2, b"b")], epoch=1)
        log.append([Entry(3, b"c"), Entry(4, b"d"), Entry(5, b"e")], epoch=1)
        with LogReader(tmp_path) as reader:
            assert reader.read(max_bytes=1) == list(first.records())
            log.truncate_after(3)
            after = log.append([Entry(6, b"f")], epoch=2)
            assert [r.payload for r in drain(reader)] == [b"c", b"f"]
            assert reader.next_seqno == after.last_seqno + 1


def test_a_replaced_file_past_the_reader_is_an_error(tmp_path: Path) -> None:
    with SegmentedLog.open(tmp_path, small_config(segment_bytes=10**6)) as log:
        log.append([Entry(1, b"a"), Entry(2, b"b")], epoch=1)
        with LogReader(tmp_path) as reader:
            assert len(reader.read()) == 2
            log.truncate_after(1)
            log.append([Entry(3, b"c"), Entry(4, b"d")], epoch=2)
            with pytest.raises(LogTruncatedError):
                reader.read()


def test_deleted_later_segments_are_an_error_for_a_reader_in_them(tmp_path: Path) -> None:
    with SegmentedLog.open(tmp_path, small_config()) as log:
        records = write(log, 60)
        assert log.segment_count > 3
        with LogReader(tmp_path) as reader:
            assert drain(reader) == records
            log.truncate_after(records[10].seqno)
            with pytest.raises(LogTruncatedError, match="deleted"):
                reader.read()


def test_a_cut_after_what_was_read_is_not_an_error(tmp_path: Path) -> None:
    with SegmentedLog.open(tmp_path, small_config()) as log:
        records = write(log, 60)
        with LogReader(tmp_path) as reader:
            got = reader.read(max_bytes=700)
            log.truncate_after(got[-1].seqno)  # drops whole segments after the reader
            new = log.append([Entry(1, b"new")], epoch=2).records()
            assert drain(reader) == list(new)
            assert got == records[: len(got)]


def test_retention_deleting_the_segment_being_read_is_not_an_error(tmp_path: Path) -> None:
    with SegmentedLog.open(tmp_path, small_config(retention_bytes=3000)) as log:
        records = write(log, 100)
        with LogReader(tmp_path) as reader:
            got = reader.read(max_bytes=1)
            log.apply_retention()
            assert log.first_seqno > records[-1].seqno // 2
            # The open descriptor still reads the deleted segment, then the next one is gone.
            with pytest.raises(SeqnoOutOfRangeError):
                got += drain(reader)
