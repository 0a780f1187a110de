"""Crash test: a child process appends with fsync=always and is SIGKILLed at a random
moment, 50 times over the same directory. After every kill the log must reopen (torn
tails are truncated, nothing is refused), hold every batch whose append had returned, and
be a prefix of what the children attempted — record contents are a pure function of the
seqno, so "what was attempted" is known without asking the child.

The child reports each returned append by appending a line to an ack file *after* the
append returned; the page cache outlives a SIGKILL, so a line in the file proves the
append returned. Payloads of up to 6 KB make multi-page writes, which the kernel can cut
short when the kill arrives mid-write: that is the torn tail recovery must handle.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from storage_support import quiet_logs

from boomscooter.storage import (
    FsyncMode,
    FsyncPolicy,
    LogConfig,
    Record,
    RecoveryKind,
    SegmentedLog,
)


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with quiet_logs():
        yield


REPO = Path(__file__).resolve().parent.parent
KILLS = 50

CHILD = r"""
import os, sys, random, hashlib
import bootcast.logs
from boomscooter.storage import Entry, FsyncMode, FsyncPolicy, LogConfig, SegmentedLog

bootcast.logs.configure(level="warning")  # no structlog import unless something is wrong

def entry(seqno):
    digest = hashlib.blake2b(seqno.to_bytes(8, "little"), digest_size=16).digest()
    size = (10, 100, 1000, 6000)[seqno % 4]
    channel = None if seqno % 3 else f"c{seqno % 5}"
    return Entry(seqno, (digest * (size // 16 + 1))[:size], channel, None)

directory, acks, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = LogConfig(
    segment_bytes=32 << 10,
    segment_ms=None,
    index_interval_bytes=1024,
    fsync=FsyncPolicy(mode=FsyncMode.ALWAYS),
)
log = SegmentedLog.open(directory, config)
ack = os.open(acks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(1, b"ready\n")
rng = random.Random(seed)
while True:
    base = log.next_seqno
    batch = log.append([entry(s) for s in range(base, base + rng.randrange(1, 9))], epoch=1)
    os.write(ack, f"{batch.last_seqno}\n".encode())
"""


def expected_payload(seqno: int) -> tuple[bytes, str | None]:
    import hashlib

    digest = hashlib.blake2b(seqno.to_bytes(8, "little"), digest_size=16).digest()
    size = (10, 100, 1000, 6000)[seqno % 4]
    return (digest * (size // 16 + 1))[:size], (None if seqno % 3 else f"c{seqno % 5}")


def check_record(record: Record) -> None:
    payload, channel = expected_payload(record.seqno)
    assert record == Record(record.seqno, record.seqno, channel, None, payload)


def acked(path: Path) -> int:
    if not path.exists():
        return 0
    lines = path.read_text().split("\n")[:-1]  # a line cut by the kill has no newline
    return max((int(line) for line in lines), default=0)


@pytest.mark.slow
def test_sigkill_never_loses_an_acknowledged_append(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    config = LogConfig(
        segment_bytes=32 << 10,
        segment_ms=None,
        index_interval_bytes=1024,
        fsync=FsyncPolicy(mode=FsyncMode.NEVER),
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(20251126)
    verified = 0
    truncations = 0
    started = time.monotonic()
    for kill in range(KILLS):
        acks = tmp_path / f"acks{kill}"
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(directory), str(acks), str(kill)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env=env,
        )
        try:
            assert child.stdout is not None
            ready = child.stdout.readline()
            assert ready == b"ready\n", child.communicate()[1].decode()
            time.sleep(rng.uniform(0.0, 0.08))
        finally:
            child.send_signal(signal.SIGKILL)
            child.communicate()
        assert child.returncode == -signal.SIGKILL
        returned = acked(acks)
        with SegmentedLog.open(directory, config) as log:
            truncations += log.recovery.kinds().count(RecoveryKind.TRUNCATED)
            assert log.first_seqno == 1
            assert log.last_seqno >= returned, f"kill {kill}: lost acknowledged appends"
            # Re-check a margin before what earlier rounds verified, then everything new.
            start = max(1, verified - 20)
            seqnos = []
            for record in log.read(start):
                check_record(record)
                seqnos.append(record.seqno)
            assert seqnos == list(range(start, log.last_seqno + 1))
            verified = log.last_seqno
    with SegmentedLog.open(directory, config) as log:
        seqnos = []
        for record in log.read(1):
            check_record(record)
            seqnos.append(record.seqno)
        assert seqnos == list(range(1, verified + 1))
        assert log.last_seqno == verified
    assert verified > KILLS  # the children really appended
    print(f"{KILLS} kills, {verified} records, {truncations} torn tails truncated")
    assert time.monotonic() - started < 120
