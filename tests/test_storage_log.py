"""SegmentedLog specifics: files on disk, the directory lock, fsync policies, failed writes
and fsyncs, bounded read handles, configuration checks, and the format documentation."""

from __future__ import annotations

import errno
import itertools
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import boomscooter.storage
from boomscooter.errors import ConfigError, LogClosedError, LogLockedError, StorageIOError
from boomscooter.storage import (
    Entry,
    FsyncMode,
    FsyncPolicy,
    LogConfig,
    LogReader,
    open_log,
)
from boomscooter.storage.index import IndexFiles, load_index

from support.storage import NEVER, Syscalls, quiet_logs, random_entries, small_config
from support.waiting import PATIENCE_S, eventually_blocking

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with quiet_logs():
        yield


def test_files_are_named_by_base_seqno_and_carry_the_magic(tmp_path: Path) -> None:
    with open_log(tmp_path, small_config()) as log:
        for i in range(30):
            log.append([Entry(i, b"x" * 100)], epoch=1)
        files = log.segment_files()
    names = sorted(n for n in os.listdir(tmp_path) if n.endswith(".log"))
    assert [name for name, _size in files] == names
    assert names[0] == "00000000000000000001.log"
    for name, size in files:
        data = (tmp_path / name).read_bytes()
        assert len(data) == size
        assert data[:8] == b"BOOMSEG\n"
        assert int.from_bytes(data[16:24], "little") == int(name[:20])


def test_sealed_segments_get_index_files_that_describe_them(tmp_path: Path) -> None:
    with open_log(tmp_path, small_config()) as log:
        for i in range(40):
            log.append(random_entries(random.Random(i), 3), epoch=1)
        files = log.segment_files()
    for (name, size), (following, _) in itertools.pairwise(files):
        base = int(name[:20])
        index = load_index(
            IndexFiles(
                offsets=(tmp_path / name.replace(".log", ".index")).read_bytes(),
                times=(tmp_path / name.replace(".log", ".timeindex")).read_bytes(),
            ),
            base_seqno=base,
            segment_bytes=size,
            interval_bytes=200,
            start=32,
        )
        assert index.next_seqno == int(following[:20])
    active = files[-1][0]
    assert not (tmp_path / active.replace(".log", ".index")).exists()


def test_one_writer_per_directory(tmp_path: Path) -> None:
    with open_log(tmp_path, small_config()) as log:
        log.append([Entry(1, b"a")], epoch=1)
        with pytest.raises(LogLockedError):
            open_log(tmp_path, small_config())
        with LogReader(tmp_path) as reader:  # readers take no lock
            assert [r.payload for r in reader.read()] == [b"a"]
    with open_log(tmp_path, small_config()) as log:  # released on close
        assert log.last_seqno == 1


def test_a_new_data_directory_is_made_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        calls = Syscalls(patch)
        open_log(tmp_path / "a" / "b", small_config()).close()
    directory_syncs = [target for name, target in calls.calls if name == "fsync"]
    # Each created directory's parent, top down, before anything is created inside.
    assert directory_syncs[:2] == [f"{tmp_path}/", f"{tmp_path}/a/"]
    with monkeypatch.context() as patch:
        calls = Syscalls(patch)
        open_log(tmp_path / "a" / "b", small_config()).close()  # exists: nothing to sync
    assert f"{tmp_path}/a/" not in [target for _name, target in calls.calls]


def test_fsync_always_makes_every_append_durable(tmp_path: Path) -> None:
    config = small_config(fsync=FsyncPolicy(mode=FsyncMode.ALWAYS))
    with open_log(tmp_path, config) as log:
        for i in range(5):
            log.append([Entry(i, b"x")], epoch=1)
            assert log.durable_seqno == log.last_seqno


def test_fsync_always_writes_then_syncs_before_the_append_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The call order of the append path: one pwrite of the batch, then fdatasync of the
    same file, and only after that does the log show the batch."""
    config = small_config(segment_bytes=10**6, fsync=FsyncPolicy(mode=FsyncMode.ALWAYS))
    with open_log(tmp_path, config) as log:
        segment = f"{tmp_path}/{log.segment_files()[-1][0]}"
        seen_at_sync: list[int] = []
        real_fdatasync = os.fdatasync

        def fdatasync(fd: int) -> None:
            seen_at_sync.append(log.last_seqno)
            real_fdatasync(fd)

        with monkeypatch.context() as patch:
            patch.setattr(os, "fdatasync", fdatasync)
            calls = Syscalls(patch)
            for i in range(3):
                log.append([Entry(i, b"x" * 100)], epoch=1)
                assert log.durable_seqno == log.last_seqno == i + 1
        assert calls.calls == [("pwrite", segment), ("fdatasync", segment)] * 3
        assert seen_at_sync == [0, 1, 2]  # not yet advanced while syncing


def test_a_roll_syncs_the_sealed_segment_and_makes_the_new_one_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = small_config(segment_bytes=10**6, fsync=FsyncPolicy(mode=FsyncMode.ALWAYS))
    with open_log(tmp_path, config) as log:
        log.append([Entry(1, b"a")], epoch=1)
        with monkeypatch.context() as patch:
            calls = Syscalls(patch)
            log.roll()
        sealed, new = (f"{tmp_path}/{name}" for name, _size in log.segment_files())
    assert [c for c in calls.calls if not c[1].endswith("index")] == [
        ("fdatasync", sealed),
        ("pwrite", f"{new}.tmp"),
        ("fdatasync", f"{new}.tmp"),
        ("rename", f"{new}.tmp -> {new}"),
        ("fsync", f"{tmp_path}/"),
    ]


def test_fsync_interval_catches_up_in_the_background(tmp_path: Path) -> None:
    config = small_config(
        segment_bytes=10**6, fsync=FsyncPolicy(mode=FsyncMode.INTERVAL, interval_ms=20)
    )
    with open_log(tmp_path, config) as log:
        log.append([Entry(1, b"x")], epoch=1)
        eventually_blocking(lambda: log.durable_seqno == 1, "the background sync")
        assert log.durable_seqno == log.last_seqno == 1


def test_fsync_never_waits_for_sync(tmp_path: Path) -> None:
    with open_log(tmp_path, small_config(segment_bytes=10**6, fsync=NEVER)) as log:
        log.append([Entry(1, b"x")], epoch=1)
        assert log.durable_seqno == 0
        log.sync()
        assert log.durable_seqno == 1


def test_truncation_lowers_the_durable_seqno(tmp_path: Path) -> None:
    with open_log(tmp_path, small_config(fsync=FsyncPolicy(mode=FsyncMode.ALWAYS))) as log:
        for i in range(10):
            log.append([Entry(i, b"x")], epoch=1)
        log.truncate_after(4)
        assert log.durable_seqno == 4


def test_a_failed_write_is_cut_off_and_the_log_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_log(tmp_path, small_config(segment_bytes=10**6)) as log:
        log.append([Entry(1, b"a")], epoch=1)
        name, size = log.segment_files()[-1]
        real_pwrite = os.pwrite

        def full_disk(fd: int, data: Any, position: int) -> int:
            real_pwrite(fd, bytes(data)[:10], position)  # a partial write, then the error
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "pwrite", full_disk)
        with pytest.raises(StorageIOError, match="No space"):
            log.append([Entry(2, b"b")], epoch=1)
        monkeypatch.undo()
        assert (tmp_path / name).stat().st_size == size
        assert log.last_seqno == 1
        log.append([Entry(3, b"c")], epoch=1)
        assert [r.payload for r in log.read(1)] == [b"a", b"c"]
    with open_log(tmp_path, small_config(segment_bytes=10**6)) as log:
        assert log.recovery.kinds() == []


def test_a_failed_fsync_poisons_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = small_config(segment_bytes=10**6, fsync=FsyncPolicy(mode=FsyncMode.ALWAYS))
    log = open_log(tmp_path, config)
    log.append([Entry(1, b"a")], epoch=1)
    name, size = log.segment_files()[-1]

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(StorageIOError, match="Input/output"):
        log.append([Entry(2, b"b")], epoch=1)
    monkeypatch.undo()
    # The batch whose fsync failed is not in the log: not readable, cut off the file.
    assert log.last_seqno == log.durable_seqno == 1
    assert [r.payload for r in log.read(1)] == [b"a"]
    assert (tmp_path / name).stat().st_size == size
    with pytest.raises(LogClosedError, match=r"failed earlier.*opened again"):
        log.append([Entry(3, b"c")], epoch=1)
    log.close()
    with open_log(tmp_path, config) as log:  # the retry after the reopen stores it once
        assert log.recovery.kinds() == []
        assert log.last_seqno == 1
        log.append([Entry(2, b"b")], epoch=1)
        assert [r.payload for r in log.read(1)] == [b"a", b"b"]


def test_roll_by_age_after_a_reopen_counts_from_the_file_mtime(tmp_path: Path) -> None:
    now = [1_800_000_000_000]
    config = small_config(segment_ms=60_000, segment_bytes=10**6)
    with open_log(tmp_path, config, clock_ms=lambda: now[0]) as log:
        log.append([Entry(1, b"a")], epoch=1)
        name = log.segment_files()[-1][0]
    written_ns = now[0] * 1_000_000
    os.utime(tmp_path / name, ns=(written_ns, written_ns))
    now[0] += 50_000
    with open_log(tmp_path, config, clock_ms=lambda: now[0]) as log:
        log.append([Entry(2, b"b")], epoch=1)
        assert log.segment_count == 1  # 50 s since the last write before the restart
        now[0] += 10_000
        log.append([Entry(3, b"c")], epoch=1)
        assert log.segment_count == 2
        assert log.segment_files()[-1][0] == f"{3:020d}.log"


def test_read_handles_on_sealed_segments_are_bounded(tmp_path: Path) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with open_log(tmp_path, small_config(max_open_segments=3)) as log:
        for i in range(200):
            log.append([Entry(i, b"x" * 200)], epoch=1)
        assert log.segment_count > 20
        before = open_fds()
        assert len(list(log.read(1))) == 200
        assert open_fds() - before <= 3


def test_fsync_policy_parsing() -> None:
    assert FsyncPolicy.parse("always") == FsyncPolicy(mode=FsyncMode.ALWAYS)
    assert FsyncPolicy.parse("never").mode is FsyncMode.NEVER
    assert FsyncPolicy.parse("interval:250") == FsyncPolicy(
        mode=FsyncMode.INTERVAL, interval_ms=250
    )
    for bad in ("sometimes", "always:5", "interval:x", "interval:0"):
        with pytest.raises(ConfigError):
            FsyncPolicy.parse(bad)


@pytest.mark.parametrize(
    "overrides",
    [
        {"segment_bytes": 10},
        {"segment_bytes": 1 << 32},
        {"max_batch_bytes": 10},
        {"index_interval_bytes": 0},
        {"retention_bytes": -1},
        {"max_open_segments": 0},
    ],
)
def test_config_checks_itself(overrides: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        LogConfig(**overrides)


def test_the_format_document_repeats_the_specification() -> None:
    """docs/storage-format.md and the module docstring give the same constants."""
    spec = boomscooter.storage.__doc__ or ""
    doc = (REPO / "docs" / "storage-format.md").read_text()
    for fact in (
        'b"BOOMSEG\\n"',
        'b"BOOMIDX\\n"',
        'b"BOOMTIX\\n"',
        "0xB5",
        "0xFFFF",
        "0xFFFFFFFF",
        "00000000000000000001.log",
        "boomscooter.lock",
        "32-byte",
        "56-byte",
        "CRC32C of bytes [0, 4) followed by bytes [8, length)",
    ):
        assert fact in spec, fact
        assert fact in doc, fact


def test_the_interval_syncer_always_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop that came while the syncer had just woken for an append used to lose its
    wake-up to the syncer's clear: close() then hung forever (seen once in 10 suite runs
    under load). Here the stop lands in exactly that window: the syncer's first look at
    the clock, between its check of the stop and its clear."""
    from boomscooter.storage import syncer as syncer_module

    class StopInTheWindow:
        def __init__(self) -> None:
            self.syncer: syncer_module.IntervalSyncer | None = None

        def monotonic(self) -> float:
            if self.syncer is not None:
                self.syncer.stop(wait=False)
                self.syncer = None
            return time.monotonic()

    clock = StopInTheWindow()
    monkeypatch.setattr(syncer_module, "time", clock)
    syncer = syncer_module.IntervalSyncer(0.0, lambda: None, lambda: True)
    clock.syncer = syncer
    syncer.dirty()
    syncer._thread.join(PATIENCE_S)
    assert not syncer._thread.is_alive(), "the syncer missed its stop"
