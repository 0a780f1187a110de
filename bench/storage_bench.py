"""Storage benchmark: SegmentedLog appends and reads beside plain file I/O of the same bytes.

Run: ``python -m bench.storage_bench [--quick] [--repeats N] [--dir DIR] [--json OUT]``
(``--dir /dev/shm`` measures the CPU cost alone: tmpfs has no writeback and no fsync).

Appends: for 100-byte and 1 KiB records in batches of 1, 100 and 1000, under fsync
``never``, ``interval`` (100 ms) and ``always``, the clock runs around the ``append`` calls
only (the producer's entries are built before, as a server receives them already decoded).
The ceiling beside each row writes the very bytes the log stored (the encoded batches), one
``write`` per batch, with the same fsync rule: after every write (``always``); from a
background thread at most every 100 ms while writes are unsynced, as the log's syncer does
(``interval``: the writing loop never waits for a sync itself); never.

Every figure is the best of ``--repeats`` runs (log and plain interleaved), because a
shared host's noise only ever slows a run down.

Reads: a log of 1M 100-byte records in batches of 1000 is read back from the page cache
batch by batch (``read_batches``, 1 MiB at a time: CRC-checked bytes ready to send) and
record by record (``read``: Record tuples), beside a plain 1 MiB ``pread`` loop over the
same segment files.

Goals (issue 3): batched 100-B appends ≥ 1M records/s with fsync=interval; record-level
read ≥ 1M records/s; batch-level read ≥ 1 GB/s and within 2× of the plain read. The run
ends by saying which goals this run met.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import bootcast.logs
from boomscooter.storage import Entry, FsyncMode, FsyncPolicy, LogConfig, SegmentedLog

INTERVAL_MS = 100


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    test: str
    records: int
    seconds: float
    bytes: int
    ceiling_seconds: float
    record_bytes: int = 0  # appends: the row's record size, batch size and fsync policy
    batch: int = 0
    fsync: str = ""

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6

    @property
    def ceiling_mb_per_s(self) -> float:
        return self.bytes / self.ceiling_seconds / 1e6

    @property
    def ratio(self) -> float:
        """Log throughput as a fraction of the plain file's."""
        return self.ceiling_seconds / self.seconds


def policy(name: str) -> FsyncPolicy:
    return FsyncPolicy(mode=FsyncMode(name), interval_ms=INTERVAL_MS)


def appends_for(batch: int, fsync: str, quick: bool) -> int:
    if fsync == "always":
        return 200 if quick else 1500
    records = (100_000 if quick else 1_000_000) if batch > 1 else (20_000 if quick else 200_000)
    return max(1, records // batch)


def bench_append(
    work: Path, record_bytes: int, batch: int, fsync: str, quick: bool, repeats: int
) -> Row:
    directory = work / f"append-{record_bytes}-{batch}-{fsync}"
    entries = [Entry(1_700_000_000_000 + i, os.urandom(record_bytes)) for i in range(batch)]
    count = appends_for(batch, fsync, quick)
    config = LogConfig(fsync=policy(fsync))
    best = ceiling = float("inf")
    for _ in range(repeats):  # best of N, log and plain interleaved: the host is shared
        with SegmentedLog.open(directory, config) as log:
            append = log.append
            started = time.perf_counter()
            for _ in range(count):
                append(entries, epoch=1)
            best = min(best, time.perf_counter() - started)
            stored = log.total_bytes
            sample = log.read_batches(1, max_bytes=1)[0].data
        shutil.rmtree(directory)
        ceiling = min(ceiling, plain_write(work / "plain.bin", sample, count, fsync))
    return Row(
        test=f"append {record_bytes:>4} B x{batch:<4} fsync={fsync}",
        records=count * batch,
        seconds=best,
        bytes=stored,
        ceiling_seconds=ceiling,
        record_bytes=record_bytes,
        batch=batch,
        fsync=fsync,
    )


class IntervalSyncer:
    """The plain file's counterpart of the log's interval syncer: a thread that fdatasyncs
    a duplicate descriptor at most every ``INTERVAL_MS`` while writes are unsynced."""

    def __init__(self, fd: int) -> None:
        self.fd = os.dup(fd)
        self.written = self.synced = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="plain-fsync", daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(INTERVAL_MS / 1000):
            target = self.written
            if target > self.synced:
                os.fdatasync(self.fd)
                self.synced = target

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        os.close(self.fd)


def plain_write(path: Path, data: bytes | memoryview, count: int, fsync: str) -> float:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    syncer = IntervalSyncer(fd) if fsync == "interval" else None
    try:
        started = time.perf_counter()
        for i in range(count):
            os.write(fd, data)
            if fsync == "always":
                os.fdatasync(fd)
            elif syncer is not None:
                syncer.written = i + 1
        return time.perf_counter() - started
    finally:
        if syncer is not None:
            syncer.close()
        os.close(fd)
        os.unlink(path)


def bench_reads(work: Path, quick: bool, repeats: int) -> list[Row]:
    records = 100_000 if quick else 1_000_000
    batch = 1000
    directory = work / "read"
    entries = [Entry(1_700_000_000_000 + i, os.urandom(100)) for i in range(batch)]
    config = LogConfig(fsync=policy("never"))
    with SegmentedLog.open(directory, config) as log:
        for _ in range(records // batch):
            log.append(entries, epoch=1)
    files = sorted(directory.glob("*.log"))
    plain_read(files)  # warm the page cache
    ceiling = batch_s = record_s = float("inf")
    with SegmentedLog.open(directory, config) as log:
        total = log.total_bytes
        for _ in range(max(repeats, 3)):
            ceiling = min(ceiling, plain_read(files))
            batch_s = min(batch_s, time_batch_read(log))
            seconds, count = time_record_read(log)
            assert count == records
            record_s = min(record_s, seconds)
    rows = []
    rows.append(
        Row(
            test="read batches (1 MiB per call)",
            records=records,
            seconds=batch_s,
            bytes=total,
            ceiling_seconds=ceiling,
        )
    )
    rows.append(
        Row(
            test="read records",
            records=records,
            seconds=record_s,
            bytes=total,
            ceiling_seconds=ceiling,
        )
    )
    shutil.rmtree(directory)
    return rows


def plain_read(files: list[Path]) -> float:
    started = time.perf_counter()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            position = 0
            while chunk := os.pread(fd, 1 << 20, position):
                position += len(chunk)
        finally:
            os.close(fd)
    return time.perf_counter() - started


def time_batch_read(log: SegmentedLog) -> float:
    started = time.perf_counter()
    seqno = log.first_seqno
    while batches := log.read_batches(seqno, max_bytes=1 << 20):
        seqno = batches[-1].next_seqno
    return time.perf_counter() - started


def time_record_read(log: SegmentedLog) -> tuple[float, int]:
    started = time.perf_counter()
    count = sum(1 for _record in log.read(log.first_seqno))
    return time.perf_counter() - started, count


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'test':<34} {'records':>9} {'rec/s':>11} {'MB/s':>9} {'plain MB/s':>11} {'vs plain':>9}"
    )
    print("plain: the same bytes written with os.write (fsync=interval: synced from a thread,")
    print("as the log does) or read with 1 MiB preads; vs plain: log speed / plain speed")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.test:<34} {row.records:>9} {row.records_per_s:>11,.0f} {row.mb_per_s:>9,.1f} "
            f"{row.ceiling_mb_per_s:>11,.1f} {row.ratio:>8.0%}"
        )


def goals(rows: list[Row]) -> list[tuple[str, bool]]:
    """Each goal of issue 3 with this run's figures, and whether they meet it."""
    out = []
    batched = [r for r in rows if (r.record_bytes, r.fsync) == (100, "interval") and r.batch > 1]
    for row in batched:
        out.append(
            (
                f"100-B appends x{row.batch} with fsync=interval >= 1M records/s: "
                f"{row.records_per_s:,.0f}",
                row.records_per_s >= 1e6,
            )
        )
    by_test = {r.test: r for r in rows}
    records = by_test["read records"]
    out.append(
        (
            f"record-level read >= 1M records/s: {records.records_per_s:,.0f}",
            records.records_per_s >= 1e6,
        )
    )
    batches = by_test["read batches (1 MiB per call)"]
    out.append(
        (
            f"batch-level read >= 1 GB/s: {batches.mb_per_s / 1000:.2f} GB/s",
            batches.mb_per_s >= 1000,
        )
    )
    out.append(
        (
            f"batch-level read within 2x of the plain read: {batches.ratio:.0%} of its speed",
            batches.ratio >= 0.5,
        )
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (smaller counts)")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument(
        "--repeats", type=int, help="runs per row, best kept (default 3, 1 with --quick)"
    )
    args = parser.parse_args(argv)
    bootcast.logs.configure(level="warning")
    work = Path(tempfile.mkdtemp(prefix="storage-bench-", dir=args.dir))
    print(
        f"boomscooter storage benchmark: commit {commit()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, work dir on {work}"
    )
    repeats = args.repeats or (1 if args.quick else 3)
    rows: list[Row] = []
    try:
        for record_bytes in (100, 1024):
            for batch in (1, 100, 1000):
                for fsync in ("never", "interval", "always"):
                    row = bench_append(work, record_bytes, batch, fsync, args.quick, repeats)
                    rows.append(row)
        rows += bench_reads(work, args.quick, repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    print("\nGoals (issue 3):")
    results = goals(rows)
    for text, met in results:
        print(f"  {'met    ' if met else 'NOT MET'}  {text}")
    if args.json:
        data = [
            {**asdict(r), "records_per_s": r.records_per_s, "mb_per_s": r.mb_per_s} for r in rows
        ]
        data += [{"goal": text, "met": met} for text, met in results]
        args.json.write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
