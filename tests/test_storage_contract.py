"""The Log contract, run against both implementations (SegmentedLog on disk, MemoryLog)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from boomscooter.errors import (
    BatchDecodeError,
    BatchEncodeError,
    CorruptLogError,
    LogClosedError,
    SeqnoGapError,
    SeqnoOutOfRangeError,
)
from boomscooter.storage import (
    Batch,
    Entry,
    FsyncMode,
    FsyncPolicy,
    Log,
    LogConfig,
    MemoryLog,
    Record,
    SegmentedLog,
    encode_batch,
)

from support.storage import quiet_logs, random_entries, small_config

MakeLog = Callable[..., Log]


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with quiet_logs():
        yield


class FakeClock:
    def __init__(self, now_ms: int = 1_000_000) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


@pytest.fixture(params=["segmented", "memory"])
def make_log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeLog]:
    logs: list[Log] = []

    def make(config: LogConfig | None = None, clock: FakeClock | None = None) -> Log:
        config = config or small_config()
        log: Log
        if request.param == "segmented":
            log = SegmentedLog.open(tmp_path / f"log{len(logs)}", config, clock_ms=clock)
        else:
            log = MemoryLog(config, clock_ms=clock)
        logs.append(log)
        return log

    yield make
    for log in logs:
        log.close()


def fill(log: Log, batches: int, *, size: int = 5, seed: int = 0, ts: int = 1_000) -> list[Batch]:
    rng = random.Random(seed)
    out = []
    for i in range(batches):
        out.append(
            log.append(
                random_entries(rng, rng.randrange(1, size + 1), timestamp_ms=ts + 100 * i), epoch=1
            )
        )
    return out


def all_records(batches: list[Batch]) -> list[Record]:
    return [r for b in batches for r in b.records()]


def test_empty_log(make_log: MakeLog) -> None:
    log = make_log()
    assert (log.first_seqno, log.last_seqno, log.next_seqno) == (1, 0, 1)
    assert log.read_batches(1) == []
    assert list(log.read(1)) == []
    assert log.seqno_for_time(0) is None
    assert log.segment_count == 1
    assert log.total_bytes == 32
    with pytest.raises(SeqnoOutOfRangeError):
        log.read_batches(0)


def test_appends_get_contiguous_seqnos_and_read_back(make_log: MakeLog) -> None:
    log = make_log()
    first = log.append([Entry(5, b"a"), Entry(6, b"b", "ch", b"k")], epoch=3)
    second = log.append([Entry(7, b"c")], epoch=4)
    assert (first.base_seqno, first.last_seqno, first.epoch) == (1, 2, 3)
    assert (second.base_seqno, second.epoch) == (3, 4)
    assert (log.first_seqno, log.last_seqno, log.next_seqno) == (1, 3, 4)
    assert list(log.read(1)) == [
        Record(1, 5, None, None, b"a"),
        Record(2, 6, "ch", b"k", b"b"),
        Record(3, 7, None, None, b"c"),
    ]
    assert log.read_batches(1) == [first, second]


def test_many_segments_read_back_exactly(make_log: MakeLog) -> None:
    log = make_log()
    batches = fill(log, 200)
    assert log.segment_count > 10
    assert list(log.read(1)) == all_records(batches)
    assert log.read_batches(1, max_bytes=10**9) == batches
    assert log.total_bytes == 32 * log.segment_count + sum(len(b.data) for b in batches)


def test_read_batches_bounds(make_log: MakeLog) -> None:
    log = make_log()
    batches = fill(log, 60)
    middle = batches[30]
    # From inside a batch: the batch holding the seqno comes first.
    assert log.read_batches(middle.last_seqno, max_bytes=1)[0] == middle
    # to_seqno is inclusive and selects whole batches.
    got = log.read_batches(middle.base_seqno, to_seqno=batches[33].base_seqno, max_bytes=10**9)
    assert got == batches[30:34]
    # A budget smaller than one batch still returns one; otherwise it is never exceeded.
    assert log.read_batches(1, max_bytes=1) == batches[:1]
    budget = sum(len(b.data) for b in batches[:7]) + 1
    assert log.read_batches(1, max_bytes=budget) == batches[:7]
    assert log.read_batches(log.next_seqno) == []
    assert log.read_batches(5, to_seqno=4) == []


def test_record_reads_respect_from_and_to(make_log: MakeLog) -> None:
    log = make_log()
    records = all_records(fill(log, 40))
    assert list(log.read(7, to_seqno=23)) == records[6:23]
    assert list(log.read(records[-1].seqno)) == records[-1:]
    assert list(log.read(log.next_seqno)) == []
    some = list(log.read(1, max_bytes=1))
    assert some and some == records[: len(some)]


def test_append_batch_takes_only_the_continuation(make_log: MakeLog) -> None:
    log = make_log()
    fill(log, 3)
    following = encode_batch([Entry(1, b"x"), Entry(2, b"y")], base_seqno=log.next_seqno, epoch=2)
    stored = log.append_batch(following.data)
    assert stored == following
    assert list(log.read(following.base_seqno)) == list(following.records())
    for base in (log.next_seqno + 1, log.next_seqno - 1):
        with pytest.raises(SeqnoGapError):
            log.append_batch(encode_batch([Entry(1, b"z")], base_seqno=base, epoch=2))
    corrupt = bytearray(encode_batch([Entry(1, b"z")], base_seqno=log.next_seqno, epoch=2).data)
    corrupt[-1] ^= 0x40
    with pytest.raises(BatchDecodeError):
        log.append_batch(bytes(corrupt))
    assert log.last_seqno == following.last_seqno


def test_batches_above_the_limit_are_refused(make_log: MakeLog) -> None:
    log = make_log(small_config(max_batch_bytes=200))
    with pytest.raises(BatchEncodeError, match="max_batch_bytes"):
        log.append([Entry(1, b"x" * 200)], epoch=1)
    assert log.last_seqno == 0


def test_roll_by_size_and_oversized_batches(make_log: MakeLog) -> None:
    log = make_log(small_config(segment_bytes=500, max_batch_bytes=4096))
    log.append([Entry(1, b"x" * 100)], epoch=1)
    log.append([Entry(1, b"x" * 100)], epoch=1)
    assert log.segment_count == 1
    log.append([Entry(1, b"x" * 300)], epoch=1)  # would pass 500 bytes: new segment
    assert log.segment_count == 2
    log.append([Entry(1, b"x" * 1000)], epoch=1)  # larger than a segment: one of its own
    log.append([Entry(1, b"y")], epoch=1)
    assert log.segment_count == 4
    assert [r.payload[:1] for r in log.read(1)] == [b"x", b"x", b"x", b"x", b"y"]


def test_explicit_roll(make_log: MakeLog) -> None:
    log = make_log()
    log.roll()  # empty active segment: nothing to seal
    assert log.segment_count == 1
    fill(log, 1)
    log.roll()
    assert log.segment_count == 2
    log.roll()
    assert log.segment_count == 2


def test_roll_by_age(make_log: MakeLog) -> None:
    clock = FakeClock(10_000)
    log = make_log(small_config(segment_ms=1_000, segment_bytes=10**6), clock)
    log.append([Entry(10_000, b"a")], epoch=1)
    clock.now_ms = 10_999
    log.append([Entry(10_999, b"b")], epoch=1)
    assert log.segment_count == 1
    clock.now_ms = 11_000  # the segment's first record is now 1 s old
    log.append([Entry(11_000, b"c")], epoch=1)
    assert log.segment_count == 2


def test_roll_by_age_ignores_record_timestamps(make_log: MakeLog) -> None:
    """Age is wall-clock time since the segment's first append: records stamped long ago (a
    replica catching up, a producer with a slow clock) or in the future roll nothing."""
    clock = FakeClock(1_800_000_000_000)
    log = make_log(small_config(segment_ms=60_000, segment_bytes=10**6), clock)
    for i in range(20):
        log.append([Entry(1_700_000_000_000 + i, b"2023")], epoch=1)
        log.append([Entry(1_900_000_000_000 + i, b"2030")], epoch=1)
        clock.now_ms += 1_000
    assert log.segment_count == 1
    clock.now_ms = 1_800_000_060_000  # a minute after the first append
    log.append([Entry(0, b"x")], epoch=1)
    assert log.segment_count == 2
    clock.now_ms += 59_999
    log.append([Entry(0, b"y")], epoch=1)
    assert log.segment_count == 2


def test_old_timestamps_do_not_roll_under_the_default_config(make_log: MakeLog) -> None:
    log = make_log(LogConfig(fsync=FsyncPolicy(mode=FsyncMode.NEVER)))  # wall clock, 7 days
    for i in range(20):
        log.append([Entry(1_700_000_000_000 + i, b"x" * 100)], epoch=1)
    assert log.segment_count == 1


def test_retention_by_bytes(make_log: MakeLog) -> None:
    log = make_log(small_config(retention_bytes=5000))
    records = all_records(fill(log, 150))
    total_before = log.total_bytes
    deleted = log.apply_retention()
    assert deleted > 0
    assert log.total_bytes <= 5000 < total_before
    first = log.first_seqno
    assert first > 1
    assert list(log.read(first)) == records[first - 1 :]
    with pytest.raises(SeqnoOutOfRangeError):
        log.read_batches(first - 1)
    with pytest.raises(SeqnoOutOfRangeError):
        list(log.read(1))
    assert log.apply_retention() == 0


def test_retention_never_deletes_the_active_segment(make_log: MakeLog) -> None:
    log = make_log(small_config(retention_bytes=0))
    fill(log, 50)
    log.apply_retention()
    assert log.segment_count == 1
    assert log.last_seqno >= log.first_seqno
    log.roll()
    log.apply_retention()
    assert log.first_seqno == log.next_seqno  # empty, and says where it continues
    assert log.read_batches(log.first_seqno) == []
    batch = log.append([Entry(1, b"after")], epoch=1)
    assert batch.base_seqno == log.first_seqno


def test_retention_by_age(make_log: MakeLog) -> None:
    clock = FakeClock(100_000)
    log = make_log(small_config(retention_ms=10_000), clock)
    for ts in (50_000, 60_000, 95_000, 99_000):
        log.append([Entry(ts, b"x")], epoch=1)
        log.roll()
    log.append([Entry(99_500, b"y")], epoch=1)
    # Sealed segments hold 50 s, 60 s, 95 s, 99 s; newer than 90 s are kept.
    assert log.apply_retention() == 2
    assert log.first_seqno == 3
    assert log.apply_retention(now_ms=120_000) == 2  # an explicit now
    assert log.first_seqno == 5


def test_seqno_for_time(make_log: MakeLog) -> None:
    log = make_log()
    log.append([Entry(100, b""), Entry(200, b""), Entry(150, b"")], epoch=1)  # not monotonic
    log.roll()
    log.append([Entry(120, b""), Entry(300, b"")], epoch=1)
    log.append([Entry(300, b""), Entry(400, b"")], epoch=1)
    assert log.seqno_for_time(0) == 1
    assert log.seqno_for_time(100) == 1
    assert log.seqno_for_time(101) == 2
    assert log.seqno_for_time(201) == 5
    assert log.seqno_for_time(300) == 5
    assert log.seqno_for_time(301) == 7
    assert log.seqno_for_time(401) is None


def test_seqno_for_time_across_many_segments(make_log: MakeLog) -> None:
    log = make_log()
    records = all_records(fill(log, 120))
    for target in (0, 1_000, 5_555, 9_000, 11_950, records[-1].timestamp_ms):
        expected = next((r.seqno for r in records if r.timestamp_ms >= target), None)
        assert log.seqno_for_time(target) == expected
    assert log.seqno_for_time(records[-1].timestamp_ms + 1) is None


def test_truncate_after(make_log: MakeLog) -> None:
    log = make_log()
    batches = fill(log, 80)
    records = all_records(batches)
    segments = log.segment_count
    log.truncate_after(records[-1].seqno)  # nothing after the last: no-op
    assert log.last_seqno == records[-1].seqno
    boundary = batches[60].last_seqno
    log.truncate_after(boundary)
    assert log.last_seqno == boundary
    assert list(log.read(1)) == records[:boundary]
    cut = next(b for b in batches[15:] if b.record_count > 1)  # cut after its first record
    inside = cut.base_seqno
    log.truncate_after(inside)
    assert log.segment_count < segments
    assert list(log.read(1)) == records[:inside]
    assert log.read_batches(inside)[-1].epoch == cut.epoch
    after = log.append([Entry(1, b"new")], epoch=2)
    assert after.base_seqno == inside + 1
    assert list(log.read(inside + 1)) == [Record(inside + 1, 1, None, None, b"new")]


def test_truncate_to_nothing_and_below(make_log: MakeLog) -> None:
    log = make_log(small_config(retention_bytes=3000))
    fill(log, 80)
    log.apply_retention()
    first = log.first_seqno
    with pytest.raises(SeqnoOutOfRangeError):
        log.truncate_after(first - 2)
    log.truncate_after(first - 1)
    assert (log.first_seqno, log.last_seqno, log.next_seqno) == (first, first - 1, first)
    assert log.segment_count == 1
    assert log.append([Entry(1, b"x")], epoch=5).base_seqno == first


def test_last_epoch_follows_appends_and_truncations(make_log: MakeLog) -> None:
    log = make_log()
    assert log.last_epoch == 0
    log.append([Entry(1, b"a"), Entry(2, b"b")], epoch=3)
    assert log.last_epoch == 3
    log.append([Entry(3, b"c")], epoch=7)
    assert log.last_epoch == 7
    log.truncate_after(1)  # inside the epoch-3 batch
    assert (log.last_seqno, log.last_epoch) == (1, 3)
    log.truncate_after(0)
    assert log.last_epoch == 0


def test_rebase_starts_again_empty_at_a_later_seqno(make_log: MakeLog) -> None:
    log = make_log()
    fill(log, 80)
    assert log.segment_count > 1
    log.rebase(5000)
    assert (log.first_seqno, log.last_seqno, log.next_seqno) == (5000, 4999, 5000)
    assert (log.segment_count, log.total_bytes, log.last_epoch) == (1, 32, 0)
    assert log.read_batches(5000) == []
    with pytest.raises(SeqnoOutOfRangeError):
        log.read_batches(1)
    with pytest.raises(SeqnoGapError):
        log.append_batch(encode_batch([Entry(1, b"x")], base_seqno=1, epoch=1))
    batch = log.append_batch(encode_batch([Entry(1, b"x")], base_seqno=5000, epoch=9))
    assert (log.read_batches(5000), log.last_epoch) == ([batch], 9)
    with pytest.raises(SeqnoOutOfRangeError):
        log.rebase(0)


def segment_copy(tmp_path: Path, batches: list[Batch]) -> tuple[Path, int]:
    """A sealed segment of another node, as a segment cast delivers it: its file's bytes."""
    with SegmentedLog.open(tmp_path / "source", small_config(segment_bytes=1 << 20)) as source:
        for batch in batches:
            source.append_batch(batch)
        source.sync()
        name, _ = source.segment_files()[0]
    return tmp_path / "source" / name, batches[0].base_seqno


def test_import_segment_appends_what_continues_the_log(make_log: MakeLog, tmp_path: Path) -> None:
    other = MemoryLog(small_config(segment_bytes=1 << 20))
    batches = fill(other, 30)
    path, base = segment_copy(tmp_path, batches)
    log = make_log()
    for batch in batches[:10]:  # it holds the first ten already
        log.append_batch(batch)
    imported = log.import_segment(str(path), base)
    assert imported == sum(b.record_count for b in batches[10:])
    assert log.read_batches(1, max_bytes=10**9) == batches
    assert log.import_segment(str(path), base) == 0  # all held: nothing more


def test_import_segment_refuses_a_damaged_file(make_log: MakeLog, tmp_path: Path) -> None:
    batches = fill(MemoryLog(small_config(segment_bytes=1 << 20)), 5)
    path, base = segment_copy(tmp_path, batches)
    log = make_log()
    with pytest.raises(CorruptLogError):
        log.import_segment(str(path), base + 1)  # its header names another base
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last batch
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptLogError):
        log.import_segment(str(path), base)


def test_durable_seqno_after_sync(make_log: MakeLog) -> None:
    log = make_log()
    fill(log, 10)
    log.sync()
    assert log.durable_seqno == log.last_seqno


def test_closed_log_refuses_everything(make_log: MakeLog) -> None:
    log = make_log()
    fill(log, 2)
    log.close()
    log.close()  # idempotent
    calls: list[Callable[[], Any]] = [
        lambda: log.append([Entry(1, b"")], epoch=1),
        lambda: log.read_batches(1),
        lambda: log.read(1),
        lambda: log.truncate_after(0),
        lambda: log.apply_retention(),
        lambda: log.roll(),
        lambda: log.seqno_for_time(0),
        lambda: log.sync(),
    ]
    for call in calls:
        with pytest.raises(LogClosedError):
            call()


def test_both_implementations_store_identical_batches(tmp_path: Path) -> None:
    """The same operations give byte-identical batches and the same segment layout."""
    config = small_config(retention_bytes=6000)
    clock = FakeClock()
    disk = SegmentedLog.open(tmp_path / "log", config, clock_ms=clock)
    memory = MemoryLog(config, clock_ms=clock)
    rng = random.Random(7)
    try:
        for step in range(300):
            entries = random_entries(rng, rng.randrange(1, 6), timestamp_ms=step)
            for log in (disk, memory):
                log.append(entries, epoch=1 + step // 100)
            if step % 37 == 0:
                cut = rng.randrange(
                    max(disk.first_seqno - 1, disk.last_seqno - 30), disk.last_seqno + 1
                )
                disk.truncate_after(cut)
                memory.truncate_after(cut)
            if step % 53 == 0:
                assert disk.apply_retention() == memory.apply_retention()
        for attr in ("first_seqno", "last_seqno", "total_bytes", "segment_count"):
            assert getattr(disk, attr) == getattr(memory, attr), attr
        first = disk.first_seqno
        assert disk.read_batches(first, max_bytes=10**9) == memory.read_batches(
            first, max_bytes=10**9
        )
    finally:
        disk.close()
