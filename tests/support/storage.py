"""Helpers shared by the storage tests: an encoder written from the format specification
alone (to check the codec against), entry generators, small-segment configurations, log
capture, and a recorder of the file system calls the log makes (which can also simulate a
crash at any one of them)."""

from __future__ import annotations

import os
import random
import stat
import struct
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import crc32c
import pytest
from structlog.testing import capture_logs

import bootcast.logs
from boomscooter.storage import Entry, FsyncMode, FsyncPolicy, LogConfig, SegmentedLog
from boomscooter.storage.descriptors import DescriptorCache

NEVER = FsyncPolicy(mode=FsyncMode.NEVER)


def small_config(**overrides: Any) -> LogConfig:
    """Tiny segments and a dense index, no fsync, no age rules: many rolls, fast tests."""
    options: dict[str, Any] = {
        "segment_bytes": 2048,
        "segment_ms": None,
        "index_interval_bytes": 200,
        "fsync": NEVER,
    }
    options.update(overrides)
    return LogConfig(**options)


def spec_encode(entries: Sequence[Entry], *, base_seqno: int, epoch: int) -> bytes:
    """A batch encoded straight from the specification in boomscooter.storage's docstring,
    record by record, sharing no code with the codec under test."""
    n = len(entries)
    has_channels = any(e.channel is not None for e in entries)
    has_keys = any(e.key is not None for e in entries)
    body = b"".join(struct.pack("<Q", e.timestamp_ms) for e in entries)
    body += b"".join(struct.pack("<I", len(e.payload)) for e in entries)
    channels = [e.channel.encode() if e.channel is not None else None for e in entries]
    if has_channels:
        body += b"".join(struct.pack("<H", 0xFFFF if c is None else len(c)) for c in channels)
    if has_keys:
        body += b"".join(
            struct.pack("<I", 0xFFFFFFFF if e.key is None else len(e.key)) for e in entries
        )
    if has_channels:
        body += b"".join(c or b"" for c in channels)
    if has_keys:
        body += b"".join(e.key or b"" for e in entries)
    body += b"".join(e.payload for e in entries)
    length = 48 + len(body)
    attributes = (1 if has_channels else 0) | (2 if has_keys else 0)
    timestamps = [e.timestamp_ms for e in entries]
    rest = struct.pack(
        "<BBHIQQQII", 0xB5, 1, attributes, n, base_seqno, timestamps[0], max(timestamps), epoch, 0
    )
    crc = crc32c.crc32c(rest + body, crc32c.crc32c(struct.pack("<I", length)))
    return struct.pack("<II", length, crc) + rest + body


def random_entries(rng: random.Random, count: int, *, timestamp_ms: int = 1_000) -> list[Entry]:
    """Entries with a mix of channels, keys and payload sizes (some empty)."""
    entries = []
    for i in range(count):
        channel = rng.choice([None, None, "", "orders", "orders.eu", "ünïcode"])
        key = rng.choice([None, None, b"", b"k%d" % rng.randrange(100)])
        payload = rng.randbytes(rng.choice([0, 1, 10, 100, 300]))
        entries.append(Entry(timestamp_ms + i, payload, channel, key))
    return entries


@contextmanager
def captured_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """structlog events emitted inside the block (bootcast.logs configures structlog lazily
    on the first event, which would replace the capture: configure it first)."""
    bootcast.logs._apply()
    with capture_logs() as events:
        yield events


@contextmanager
def quiet_logs() -> Iterator[None]:
    """Only warnings and errors (tests roll hundreds of segments, each an info event)."""
    bootcast.logs.configure(level="warning")
    try:
        yield
    finally:
        bootcast.logs.reset()


class Crash(BaseException):
    """A simulated crash at a system call: a BaseException, so no ``except OSError``
    cleanup in the code under test runs, as when the process dies there."""


_PATH_CALLS = ("rename", "unlink")
_FD_CALLS = ("pwrite", "fdatasync", "fsync", "ftruncate", "copy_file_range")


class Syscalls:
    """Record ``(call, file)`` for the file system calls the storage code makes, in order.
    A directory is named with a trailing ``/``; ``rename`` as ``"old -> new"``;
    ``copy_file_range`` by its destination.

    ``crash_at=n`` raises :class:`Crash` instead of making call number ``n`` (from 1);
    with ``torn=True`` a ``pwrite`` or ``copy_file_range`` crashed at writes half its bytes
    first (a write cut short)."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, *, crash_at: int | None = None, torn: bool = False
    ) -> None:
        self.calls: list[tuple[str, str]] = []
        self.crash_at = crash_at
        self.torn = torn
        for name in (*_PATH_CALLS, *_FD_CALLS):
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            if name == "rename":
                target = f"{os.fspath(args[0])} -> {os.fspath(args[1])}"
            elif name in _PATH_CALLS:
                target = os.fspath(args[0])
            else:
                fd = args[1] if name == "copy_file_range" else args[0]  # its destination
                target = os.readlink(f"/proc/self/fd/{fd}")
                if stat.S_ISDIR(os.fstat(fd).st_mode):
                    target += "/"
            self.calls.append((name, target))
            if len(self.calls) == self.crash_at:
                if self.torn and name == "pwrite":
                    data = bytes(args[1])
                    real(args[0], data[: len(data) // 2], args[2])
                elif self.torn and name == "copy_file_range":
                    real(args[0], args[1], args[2] // 2, *args[3:])
                raise Crash(f"crash at {name} {target}")
            return real(*args)

        return call

    def names(self, *, of: str | None = None) -> list[str]:
        """The calls, or those whose file name ends with ``of``."""
        return [name for name, target in self.calls if of is None or target.endswith(of)]


def abandon(log: SegmentedLog) -> None:
    """Drop a log after a simulated crash: close its descriptors (releasing the directory
    lock) without syncing or writing anything."""
    if log._syncer is not None:
        log._syncer.stop(wait=False)
    for fd in (log._active_fd, *log._read_fds.descriptors(), log._lock_fd):
        with suppress(OSError):
            os.close(fd)
    log._read_fds = DescriptorCache(log.config.max_open_segments)
    log._closed = True
