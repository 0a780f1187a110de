"""Helpers shared by the storage tests: an encoder written from the format specification
alone (to check the codec against), entry generators, small-segment configurations, and
log capture."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any

import crc32c
from structlog.testing import capture_logs

import bootcast.logs
from boomscooter.storage import Entry, FsyncMode, FsyncPolicy, LogConfig

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
        bootcast.logs.configure()
