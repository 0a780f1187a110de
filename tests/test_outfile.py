"""The fetch's output file: mapped writes, space reservation, write-back errors."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from bootcast.errors import FetchError
from bootcast.outfile import MappedWriter, PrefixHash, Writer


def test_mapped_writes_reach_the_file_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 10)
        writer = MappedWriter(fd, str(path), 10)
        writer.write(7, memoryview(b"xyz"))
        writer.write(0, memoryview(b"ab"))
        assert writer.read(0, 3) == b"ab\0"
        writer.wait_synced()
        assert path.read_bytes() == b"ab\0\0\0\0\0xyz"
    finally:
        os.close(fd)


def test_a_full_disk_is_a_clear_error_before_anything_is_received(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(FetchError, match="not enough space for 4096 bytes"):
            MappedWriter(fd, "out", 4096)
    finally:
        os.close(fd)


def test_filesystems_without_fallocate_still_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 4)
        writer = MappedWriter(fd, "out", 4)
        writer.write(0, memoryview(b"data"))
        writer.wait_synced()
        assert (tmp_path / "out").read_bytes() == b"data"
    finally:
        os.close(fd)


@pytest.mark.parametrize("mapped", [True, False])
def test_prefix_hash_catches_up_from_the_file(tmp_path: Path, mapped: bool) -> None:
    import hashlib

    data = os.urandom(10 * 100 + 37)
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, len(data))
        writer = MappedWriter(fd, "out", len(data)) if mapped else Writer(fd, "out")
        hasher = PrefixHash(fd, 100)
        have = bytearray(12)
        have[0] = 1
        for index in (1, 2, 4, 3, 5, 6, 7, 8, 9, 10, 11):
            offset = (index - 1) * 100
            writer.write(offset, memoryview(data[offset : offset + 100]))
            have[index] = 1
            writer.flush()
            hasher.catch_up(have, 11, limit_bytes=200)
        writer.wait_synced()
        assert hasher.finish(len(data)) == hashlib.sha256(data).hexdigest()
    finally:
        os.close(fd)
