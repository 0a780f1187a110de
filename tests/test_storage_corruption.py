"""The corruption table: write a log, damage its files one named way, reopen, and check the
outcome — truncated, rebuilt or refused — and that appending works afterwards (after the
operator's repair for refused cases)."""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from boomscooter.errors import CorruptLogError
from boomscooter.storage import Entry, LogConfig, RecoveryKind, SegmentedLog
from boomscooter.storage.batch import Record, decode_header
from boomscooter.storage.index import SegmentIndex

from support.storage import captured_logs, quiet_logs, random_entries, small_config

CONFIG = small_config(segment_bytes=2048, index_interval_bytes=300)


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with quiet_logs():
        yield


@dataclass(frozen=True, slots=True)
class Extent:
    """Where one written batch lives."""

    file: str
    offset: int
    length: int
    base_seqno: int
    last_seqno: int


@dataclass(slots=True)
class Written:
    directory: Path
    records: list[Record]
    extents: list[Extent]
    files: list[str] = field(default_factory=list)  # segment files, oldest first

    def path(self, name: str) -> Path:
        return self.directory / name

    def in_file(self, name: str) -> list[Extent]:
        return [e for e in self.extents if e.file == name]

    @property
    def active(self) -> str:
        return self.files[-1]

    @property
    def last_seqno(self) -> int:
        return self.records[-1].seqno


def write_log(directory: Path) -> Written:
    """Several sealed segments and an active one holding at least 1200 bytes of batches."""
    rng = random.Random(42)
    log = SegmentedLog.open(directory, CONFIG)
    records: list[Record] = []
    while log.segment_count < 5 or log.segment_files()[-1][1] < 1200:
        batch = log.append(random_entries(rng, rng.randrange(1, 4)), epoch=1)
        records += batch.records()
    log.close()
    written = Written(directory=directory, records=records, extents=[])
    written.files = sorted(n for n in os.listdir(directory) if n.endswith(".log"))
    for name in written.files:
        data = (directory / name).read_bytes()
        offset = 32
        while offset < len(data):
            (length,) = struct.unpack_from("<I", data, offset)
            count, base = struct.unpack_from("<IQ", data, offset + 12)
            written.extents.append(Extent(name, offset, length, base, base + count - 1))
            offset += length
    return written


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@dataclass(frozen=True, slots=True, kw_only=True)
class Expect:
    last_seqno: int  # after reopening (after the repair, for refused cases)
    actions: frozenset[RecoveryKind] = frozenset()
    refused_at: tuple[str, int] | None = None  # (file, offset) named by CorruptLogError


# Each corruption damages a freshly written log and says what reopening must do.


def truncate_mid_batch(w: Written) -> Expect:
    last = w.in_file(w.active)[-1]
    os.truncate(w.path(w.active), last.offset + last.length // 2)
    return Expect(last_seqno=last.base_seqno - 1, actions=frozenset({RecoveryKind.TRUNCATED}))


def zero_last_sector(w: Written) -> Expect:
    path = w.path(w.active)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size - 512)
        f.write(bytes(512))
    first_hit = next(e for e in w.in_file(w.active) if e.offset + e.length > size - 512)
    return Expect(last_seqno=first_hit.base_seqno - 1, actions=frozenset({RecoveryKind.TRUNCATED}))


def zero_preallocated_tail(w: Written) -> Expect:
    with open(w.path(w.active), "ab") as f:
        f.write(bytes(8192))
    return Expect(last_seqno=w.last_seqno, actions=frozenset({RecoveryKind.TRUNCATED}))


def flip_bit_in_active_tail(w: Written) -> Expect:
    last = w.in_file(w.active)[-1]
    flip_bit(w.path(w.active), last.offset + last.length - 1)
    return Expect(last_seqno=last.base_seqno - 1, actions=frozenset({RecoveryKind.TRUNCATED}))


def flip_bit_mid_active(w: Written) -> Expect:
    victim = w.in_file(w.active)[0]
    flip_bit(w.path(w.active), victim.offset + victim.length - 1)
    return Expect(
        last_seqno=victim.base_seqno - 1,
        actions=frozenset({RecoveryKind.REPAIRED}),
        refused_at=(w.active, victim.offset),
    )


def flip_bit_in_sealed_segment(w: Written) -> Expect:
    name = w.files[1]
    victim = w.in_file(name)[1]
    flip_bit(w.path(name), victim.offset + 50)
    return Expect(
        last_seqno=victim.base_seqno - 1,
        actions=frozenset({RecoveryKind.REPAIRED, RecoveryKind.SEGMENT_DELETED}),
        refused_at=(name, victim.offset),
    )


def flip_bit_in_sealed_length(w: Written) -> Expect:
    name = w.files[0]
    victim = w.in_file(name)[-1]  # the last batch of a sealed segment: still refused
    flip_bit(w.path(name), victim.offset)
    return Expect(
        last_seqno=victim.base_seqno - 1,
        actions=frozenset({RecoveryKind.REPAIRED, RecoveryKind.SEGMENT_DELETED}),
        refused_at=(name, victim.offset),
    )


def garbage_after_sealed_segment(w: Written) -> Expect:
    name = w.files[0]
    size = w.path(name).stat().st_size
    with open(w.path(name), "ab") as f:
        f.write(random.Random(1).randbytes(100))
    return Expect(
        last_seqno=w.in_file(name)[-1].last_seqno,
        actions=frozenset({RecoveryKind.REPAIRED, RecoveryKind.SEGMENT_DELETED}),
        refused_at=(name, size),
    )


def bad_sealed_header(w: Written) -> Expect:
    name = w.files[2]
    flip_bit(w.path(name), 3)
    return Expect(
        last_seqno=w.in_file(name)[0].base_seqno - 1,
        actions=frozenset({RecoveryKind.SEGMENT_DELETED}),
        refused_at=(name, 0),
    )


def empty_sealed_segment_file(w: Written) -> Expect:
    name = w.files[1]
    os.truncate(w.path(name), 0)
    return Expect(
        last_seqno=w.in_file(name)[0].base_seqno - 1,
        actions=frozenset({RecoveryKind.SEGMENT_DELETED}),
        refused_at=(name, 0),
    )


def missing_middle_segment(w: Written) -> Expect:
    name = w.files[2]
    os.unlink(w.path(name))
    return Expect(
        last_seqno=w.in_file(name)[0].base_seqno - 1,
        actions=frozenset({RecoveryKind.SEGMENT_DELETED}),
        refused_at=(w.files[3], 0),
    )


def empty_segment_file(w: Written) -> Expect:
    (w.directory / f"{w.last_seqno + 1:020d}.log").write_bytes(b"")
    return Expect(last_seqno=w.last_seqno, actions=frozenset({RecoveryKind.HEADER_REWRITTEN}))


def unfinished_segment_header(w: Written) -> Expect:
    (w.directory / f"{w.last_seqno + 1:020d}.log").write_bytes(b"BOOMSEG\n\x01")
    return Expect(last_seqno=w.last_seqno, actions=frozenset({RecoveryKind.HEADER_REWRITTEN}))


def delete_index(w: Written) -> Expect:
    os.unlink(w.path(w.files[1].replace(".log", ".index")))
    return Expect(last_seqno=w.last_seqno, actions=frozenset({RecoveryKind.INDEX_REBUILT}))


def stale_index(w: Written) -> Expect:
    for suffix in (".index", ".timeindex"):
        other = w.path(w.files[0].replace(".log", suffix)).read_bytes()
        w.path(w.files[1].replace(".log", suffix)).write_bytes(other)
    return Expect(last_seqno=w.last_seqno, actions=frozenset({RecoveryKind.INDEX_REBUILT}))


def stale_index_of_the_same_segment(w: Written) -> Expect:
    """The segment's own index from when it held fewer batches (a crash of an old writer
    between an append and the index rewrite, a restored backup): consistent, but stale."""
    name = w.files[1]
    index = SegmentIndex(
        base_seqno=int(name[:20]), start=32, interval_bytes=CONFIG.index_interval_bytes
    )
    data = w.path(name).read_bytes()
    for extent in w.in_file(name)[:-2]:
        index.add(extent.offset, decode_header(data, extent.offset))
    files = index.encode()
    w.path(name.replace(".log", ".index")).write_bytes(files.offsets)
    w.path(name.replace(".log", ".timeindex")).write_bytes(files.times)
    return Expect(last_seqno=w.last_seqno, actions=frozenset({RecoveryKind.INDEX_REBUILT}))


def truncated_index(w: Written) -> Expect:
    path = w.path(w.files[2].replace(".log", ".timeindex"))
    path.write_bytes(path.read_bytes()[:-5])
    return Expect(last_seqno=w.last_seqno, actions=frozenset({RecoveryKind.INDEX_REBUILT}))


def stray_files(w: Written) -> Expect:
    (w.directory / "notes.txt").write_text("operator notes")
    (w.directory / "12.log").write_bytes(b"not ours")
    (w.directory / "backup").mkdir()
    return Expect(last_seqno=w.last_seqno, actions=frozenset({RecoveryKind.STRAY_IGNORED}))


def leftover_temp_files(w: Written) -> Expect:
    (w.directory / f"{w.last_seqno + 1:020d}.log.tmp").write_bytes(b"BOOMSEG\n")
    (w.directory / w.files[0].replace(".log", ".index.tmp")).write_bytes(b"half")
    return Expect(last_seqno=w.last_seqno, actions=frozenset({RecoveryKind.TEMP_REMOVED}))


def index_of_the_active_segment(w: Written) -> Expect:
    for suffix in (".index", ".timeindex"):
        data = w.path(w.files[0].replace(".log", suffix)).read_bytes()
        w.path(w.active.replace(".log", suffix)).write_bytes(data)
    return Expect(last_seqno=w.last_seqno, actions=frozenset({RecoveryKind.INDEX_REMOVED}))


CORRUPTIONS: list[Callable[[Written], Expect]] = [
    truncate_mid_batch,
    zero_last_sector,
    zero_preallocated_tail,
    flip_bit_in_active_tail,
    flip_bit_mid_active,
    flip_bit_in_sealed_segment,
    flip_bit_in_sealed_length,
    garbage_after_sealed_segment,
    bad_sealed_header,
    empty_sealed_segment_file,
    missing_middle_segment,
    empty_segment_file,
    unfinished_segment_header,
    delete_index,
    stale_index,
    stale_index_of_the_same_segment,
    truncated_index,
    stray_files,
    leftover_temp_files,
    index_of_the_active_segment,
]


def check_reopened(log: SegmentedLog, w: Written, expect: Expect) -> None:
    assert log.last_seqno == expect.last_seqno
    assert list(log.read(1)) == w.records[: expect.last_seqno]
    assert expect.actions <= set(log.recovery.kinds()), log.recovery
    batch = log.append([Entry(7, b"after recovery")], epoch=2)
    assert batch.base_seqno == expect.last_seqno + 1
    assert list(log.read(batch.base_seqno)) == list(batch.records())


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_corruption(tmp_path: Path, corrupt: Callable[[Written], Expect]) -> None:
    w = write_log(tmp_path / "log")
    expect = corrupt(w)
    repair = False
    if expect.refused_at is not None:
        with pytest.raises(CorruptLogError) as info:
            SegmentedLog.open(w.directory, CONFIG)
        name, offset = expect.refused_at
        assert (os.path.basename(info.value.path), info.value.offset) == (name, offset)
        assert name in str(info.value) and f"offset {offset}" in str(info.value)
        assert "repair=True" in str(info.value)
        repair = True
    with SegmentedLog.open(w.directory, CONFIG, repair=repair) as log:
        check_reopened(log, w, expect)
        appended = log.last_seqno
    with SegmentedLog.open(w.directory, CONFIG) as log:  # a clean open now
        assert set(log.recovery.kinds()) <= {RecoveryKind.STRAY_IGNORED}
        assert log.last_seqno == appended


def test_torn_tail_warning_names_file_and_offset(tmp_path: Path) -> None:
    w = write_log(tmp_path / "log")
    last = w.in_file(w.active)[-1]
    os.truncate(w.path(w.active), last.offset + 10)
    cut = w.path(w.active).read_bytes()[last.offset :]
    with captured_logs() as events, SegmentedLog.open(w.directory, CONFIG):
        pass
    [event] = [e for e in events if e["event"] == "segment.truncated"]
    assert event["log_level"] == "warning"
    assert event["path"] == str(w.path(w.active))
    assert event["offset"] == last.offset
    assert "torn tail" in event["reason"]
    # The bytes cut off are kept beside the segment, and the next open passes over them.
    broken = w.path(f"{w.active}.{last.offset}.broken")
    assert broken.read_bytes() == cut and len(cut) == 10
    [kept] = [e for e in events if e["event"] == "segment.broken_kept"]
    assert kept["path"] == str(broken)
    with SegmentedLog.open(w.directory, CONFIG) as log:
        assert log.recovery.kinds() == []
        assert log.last_seqno == last.base_seqno - 1


def test_rebuilt_index_equals_the_original(tmp_path: Path) -> None:
    w = write_log(tmp_path / "log")
    index = w.path(w.files[1].replace(".log", ".index"))
    original = index.read_bytes()
    index.unlink()
    with SegmentedLog.open(w.directory, CONFIG):
        pass
    assert index.read_bytes() == original


def test_fast_open_trusts_good_indexes_and_reads_still_check_crcs(tmp_path: Path) -> None:
    w = write_log(tmp_path / "log")
    fast = LogConfig(
        segment_bytes=CONFIG.segment_bytes,
        segment_ms=None,
        index_interval_bytes=CONFIG.index_interval_bytes,
        fsync=CONFIG.fsync,
        verify_sealed=False,
    )
    name = w.files[1]
    victim = w.in_file(name)[1]
    flip_bit(w.path(name), victim.offset + victim.length - 1)  # a payload byte
    with SegmentedLog.open(w.directory, fast) as log:
        assert log.recovery.kinds() == []  # the index was trusted: payload not scanned
        assert log.last_seqno == w.last_seqno
        assert (
            list(log.read(1, to_seqno=victim.base_seqno - 1)) == w.records[: victim.base_seqno - 1]
        )
        with pytest.raises(CorruptLogError, match="CRC32C") as info:
            list(log.read(victim.base_seqno))
        assert info.value.offset == victim.offset
    with pytest.raises(CorruptLogError):
        SegmentedLog.open(w.directory, CONFIG)  # the full check on open finds it


@pytest.mark.parametrize("stale", [stale_index, stale_index_of_the_same_segment])
def test_fast_open_rebuilds_a_stale_index(
    tmp_path: Path, stale: Callable[[Written], Expect]
) -> None:
    w = write_log(tmp_path / "log")
    fast = small_config(segment_bytes=2048, index_interval_bytes=300, verify_sealed=False)
    stale(w)
    with SegmentedLog.open(w.directory, fast) as log:
        assert RecoveryKind.INDEX_REBUILT in log.recovery.kinds()
        assert list(log.read(1)) == w.records
    garbage_after_sealed_segment(w)
    with pytest.raises(CorruptLogError):  # the size no longer matches: a full scan
        SegmentedLog.open(w.directory, fast)


def test_stray_files_are_left_alone(tmp_path: Path) -> None:
    w = write_log(tmp_path / "log")
    stray_files(w)
    with SegmentedLog.open(w.directory, CONFIG) as log:
        strays = {os.path.basename(a.path) for a in log.recovery.actions}
        assert strays == {"notes.txt", "12.log", "backup"}
    assert (w.directory / "notes.txt").read_text() == "operator notes"
    assert (w.directory / "12.log").read_bytes() == b"not ours"
    assert (w.directory / "backup").is_dir()
