"""truncate_after under crashes: the process dies at every file system call the truncation
makes (and in the middle of every write), and reopening must always find a consistent log
that still holds every kept record — the old log, the truncated one, or a prefix of the
old one between the two. The order of the calls is checked too, for what a crash test in
one process cannot see: that a power loss cannot bring deleted segments back or persist a
rename before the renamed file's bytes."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from boomscooter.storage import Entry, FsyncMode, FsyncPolicy, LogConfig, Record, SegmentedLog

from support.storage import Crash, Syscalls, abandon, quiet_logs

ALWAYS = FsyncPolicy(mode=FsyncMode.ALWAYS)
CONFIG = LogConfig(segment_bytes=2048, segment_ms=None, index_interval_bytes=200, fsync=ALWAYS)


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with quiet_logs():
        yield


def build(directory: Path, batch_sizes: list[int]) -> list[Record]:
    """A log of batches of the given record counts (100-byte payloads)."""
    records: list[Record] = []
    with SegmentedLog.open(directory, CONFIG) as log:
        for size in batch_sizes:
            base = log.next_seqno
            entries = [Entry(base + i, bytes([(base + i) % 251]) * 100) for i in range(size)]
            records += log.append(entries, epoch=base % 7).records()
    return records


# (batch sizes, truncate after): a cut inside the only batch (the reviewer's case: six
# records, truncate_after(5)); inside a batch of a sealed segment, dropping later segments;
# at a batch boundary, dropping later segments.
CASES = {
    "inside_the_only_batch": ([6], 5),
    "inside_a_sealed_segment": ([3] * 24, 20),
    "at_a_boundary_of_a_sealed_segment": ([3] * 24, 21),
}


def reopen_and_check(directory: Path, records: list[Record], seqno: int) -> None:
    with SegmentedLog.open(directory, CONFIG) as log:
        assert log.last_seqno >= seqno, "kept records were lost"
        assert list(log.read(1)) == records[: log.last_seqno]  # a prefix of the old log
        log.truncate_after(seqno)  # what the replica does next: repeat the truncation
        assert list(log.read(1)) == records[:seqno]
        appended = log.append([Entry(1, b"after")], epoch=9)
        assert appended.base_seqno == seqno + 1
    with SegmentedLog.open(directory, CONFIG) as log:
        assert log.recovery.kinds() == []
        assert list(log.read(1)) == [*records[:seqno], *appended.records()]


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_a_crash_at_any_step_keeps_every_kept_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    sizes, seqno = CASES[case]
    pristine = tmp_path / "pristine"
    records = build(pristine, sizes)
    counting = tmp_path / "counting"
    shutil.copytree(pristine, counting)
    with SegmentedLog.open(counting, CONFIG) as log, monkeypatch.context() as patch:
        steps = Syscalls(patch)
        log.truncate_after(seqno)
    assert steps.calls, "truncate_after made no file system call"
    crashes = [(n, torn) for n in range(1, len(steps.calls) + 1) for torn in (False, True)]
    for n, torn in crashes:
        directory = tmp_path / f"crash{n}{'torn' if torn else ''}"
        shutil.copytree(pristine, directory)
        log = SegmentedLog.open(directory, CONFIG)
        with monkeypatch.context() as patch:
            Syscalls(patch, crash_at=n, torn=torn)
            with pytest.raises(Crash):
                log.truncate_after(seqno)
        abandon(log)
        reopen_and_check(directory, records, seqno)


def test_the_shortened_batch_is_renamed_into_place_only_once_it_is_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build(tmp_path, [3] * 24)
    with SegmentedLog.open(tmp_path, CONFIG) as log:
        name = log.segment_files()[1][0]
        with monkeypatch.context() as patch:
            calls = Syscalls(patch)
            log.truncate_after(int(name[:20]) + 4)  # inside the second batch of segment 2
        assert log.segment_count == 2
    directory = f"{tmp_path}/"
    on_segment = [(c, t) for c, t in calls.calls if name in t or t == directory]
    unlinks = [i for i, (c, t) in enumerate(calls.calls) if c == "unlink" and t.endswith(".log")]
    rename = calls.calls.index(("rename", f"{tmp_path}/{name}.tmp -> {tmp_path}/{name}"))
    # The copy is complete and on disk before it replaces the segment, after every deletion.
    assert on_segment[-5:] == [
        ("copy_file_range", f"{tmp_path}/{name}.tmp"),
        ("pwrite", f"{tmp_path}/{name}.tmp"),
        ("fdatasync", f"{tmp_path}/{name}.tmp"),
        ("rename", f"{tmp_path}/{name}.tmp -> {tmp_path}/{name}"),
        ("fsync", directory),
    ]
    assert unlinks and max(unlinks) < rename


def test_each_deleted_segment_is_made_durable_before_the_next_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power loss must not bring a deleted later segment back behind a missing one (a
    seqno gap refuses to open): the directory is fsynced right after each deletion."""
    build(tmp_path, [3] * 24)
    with SegmentedLog.open(tmp_path, CONFIG) as log:
        segments = log.segment_count
        assert segments >= 4
        with monkeypatch.context() as patch:
            calls = Syscalls(patch)
            log.truncate_after(3)  # the end of the first batch: every later segment goes
        assert log.segment_count == 1
    directory = f"{tmp_path}/"
    relevant = [
        (c, "dir" if t == directory else "log" if t.endswith(".log") else "other")
        for c, t in calls.calls
        if c in ("unlink", "fsync", "ftruncate") and (t == directory or t.endswith(".log"))
    ]
    assert relevant == [("unlink", "log"), ("fsync", "dir")] * (segments - 1) + [
        ("ftruncate", "log")
    ]
    assert calls.calls[-1][0] == "fdatasync"  # the cut itself is synced


def test_truncating_at_a_boundary_cuts_in_place(tmp_path: Path) -> None:
    records = build(tmp_path, [3] * 4)
    with SegmentedLog.open(tmp_path, CONFIG) as log:
        inode = (tmp_path / log.segment_files()[-1][0]).stat().st_ino
        log.truncate_after(6)
        assert (tmp_path / log.segment_files()[-1][0]).stat().st_ino == inode
        assert list(log.read(1)) == records[:6]
        assert log.durable_seqno == 6
