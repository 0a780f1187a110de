"""Crash test: a child process appends with fsync=always and is SIGKILLed, 50 times over
the same directory: every other time at a random moment, otherwise as soon as the newest
segment file is seen growing (a ``pwrite`` of a batch of a few MB is in progress). After
every kill the log must reopen (torn tails are truncated, nothing is refused), hold every
batch whose append had returned, and be a prefix of what the children attempted: record
contents are a pure function of the seqno and of the payload size the record's key names,
so "what was attempted" is known without asking the child.

The child reports each returned append by appending a line to an ack file *after* the
append returned; the page cache outlives a SIGKILL, so a line in the file proves the
append returned. Every batch holds one or two big payloads: 64 KiB when the kill comes at
a random moment, 4 MiB when it is aimed at a write, whose ``pwrite`` then lasts long
enough for the kill to stop it at a page boundary and leave a torn tail, which recovery
must truncate — the test asserts it saw some (at a random moment the child is far more
often in ``fdatasync`` or Python code). The child applies retention to keep the directory
small, so the log starts wherever retention left it.
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

from boomscooter.storage import (
    FsyncMode,
    FsyncPolicy,
    LogConfig,
    Record,
    RecoveryKind,
    SegmentedLog,
)

from support.storage import quiet_logs


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

def entry(seqno, big):
    # Every batch of 4 or more records holds one or two payloads of ``big`` bytes.
    digest = hashlib.blake2b(seqno.to_bytes(8, "little"), digest_size=16).digest()
    size = (10, 1000, 6000, big)[seqno % 4]
    channel = None if seqno % 3 else f"c{seqno % 5}"
    return Entry(seqno, (digest * (size // 16 + 1))[:size], channel, b"%d" % size)

directory, acks, seed, big = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config = LogConfig(
    segment_bytes=SEGMENT_BYTES,
    segment_ms=None,
    index_interval_bytes=1024,
    retention_bytes=RETENTION_BYTES,
    fsync=FsyncPolicy(mode=FsyncMode.ALWAYS),
)
log = SegmentedLog.open(directory, config)
ack = os.open(acks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(1, b"ready\n")
rng = random.Random(seed)
while True:
    base = log.next_seqno
    entries = [entry(s, big) for s in range(base, base + rng.randrange(4, 9))]
    batch = log.append(entries, epoch=1)
    os.write(ack, f"{batch.last_seqno}\n".encode())
    log.apply_retention()
"""
SEGMENT_BYTES = 4 << 20
RETENTION_BYTES = 16 << 20
CHILD = CHILD.replace("RETENTION_BYTES", str(RETENTION_BYTES)).replace(
    "SEGMENT_BYTES", str(SEGMENT_BYTES)
)


def expected_payload(seqno: int, size: int) -> tuple[bytes, str | None]:
    import hashlib

    digest = hashlib.blake2b(seqno.to_bytes(8, "little"), digest_size=16).digest()
    return (digest * (size // 16 + 1))[:size], (None if seqno % 3 else f"c{seqno % 5}")


def check_record(record: Record) -> None:
    assert record.key is not None
    size = int(record.key)  # the child's choice for this round, in the record itself
    assert size == (10, 1000, 6000, size)[record.seqno % 4]
    payload, channel = expected_payload(record.seqno, size)
    assert record == Record(record.seqno, record.seqno, channel, record.key, payload)


def wait_for_a_write(directory: Path, deadline: float) -> None:
    """Return as soon as the newest segment file grows (or a new one holds bytes past its
    header): a write is in progress, or has just finished."""
    newest, size = "", -1
    polls = 0
    while time.monotonic() < deadline:
        if polls % 64 == 0:  # look for a roll now and then: listing is slower than stat
            names = sorted(n for n in os.listdir(directory) if n.endswith(".log"))
            if names and names[-1] != newest:
                newest, size = names[-1], -1
        polls += 1
        try:
            now = os.stat(directory / newest).st_size
        except (FileNotFoundError, IsADirectoryError):
            polls = 0
            continue
        if size >= 0 and now != size and now > 32:
            return
        size = now


def acked(path: Path) -> int:
    if not path.exists():
        return 0
    lines = path.read_text().split("\n")[:-1]  # a line cut by the kill has no newline
    return max((int(line) for line in lines), default=0)


@pytest.mark.slow
def test_sigkill_never_loses_an_acknowledged_append(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    config = LogConfig(
        segment_bytes=SEGMENT_BYTES,
        segment_ms=None,
        index_interval_bytes=1024,
        fsync=FsyncPolicy(mode=FsyncMode.NEVER),
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(20251126)
    verified = 0
    truncations = 0
    for kill in range(KILLS):
        acks = tmp_path / f"acks{kill}"
        aimed = kill % 2 == 1  # kill while a big batch is being written
        big = 4 << 20 if aimed else 64 << 10
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(directory), str(acks), str(kill), str(big)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env=env,
        )
        try:
            assert child.stdout is not None
            ready = child.stdout.readline()
            assert ready == b"ready\n", child.communicate()[1].decode()
            if aimed:
                time.sleep(rng.uniform(0.0, 0.02))
                wait_for_a_write(directory, time.monotonic() + 2)
            else:
                time.sleep(rng.uniform(0.0, 0.08))
        finally:
            child.send_signal(signal.SIGKILL)
            child.communicate()
        assert child.returncode == -signal.SIGKILL
        returned = acked(acks)
        with SegmentedLog.open(directory, config) as log:
            truncations += log.recovery.kinds().count(RecoveryKind.TRUNCATED)
            assert log.last_seqno >= returned, f"kill {kill}: lost acknowledged appends"
            # Re-check a margin before what earlier rounds verified, then everything new.
            start = max(log.first_seqno, verified - 20)
            seqnos = []
            for record in log.read(start):
                check_record(record)
                seqnos.append(record.seqno)
            assert seqnos == list(range(start, log.last_seqno + 1))
            verified = log.last_seqno
    with SegmentedLog.open(directory, config) as log:
        seqnos = []
        for record in log.read(log.first_seqno):
            check_record(record)
            seqnos.append(record.seqno)
        assert seqnos == list(range(log.first_seqno, verified + 1))
        assert log.last_seqno == verified
    assert verified > KILLS  # the children really appended
    print(f"{KILLS} kills, {verified} records, {truncations} torn tails truncated")
    assert truncations > 0, "no kill landed mid-write: the torn-tail path was not exercised"
