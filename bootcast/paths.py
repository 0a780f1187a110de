"""Confining requested paths to the served directory.

A request path is accepted only if it is relative, has no empty, ``.`` or ``..`` segment,
no NUL or backslash, and its fully resolved location (symlinks followed) is a regular file
inside the resolved root. Everything else is :class:`~bootcast.errors.PathRejected`, which
the server answers with 404 so that nothing about the disk outside the root leaks.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import PathRejected

MAX_PATH_BYTES = 4096


def check_request_path(path: str) -> str:
    """Syntactic checks on the already percent-decoded request path."""
    if not path:
        raise PathRejected("empty path")
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise PathRejected("path too long")
    if "\x00" in path or "\\" in path:
        raise PathRejected("NUL or backslash in path")
    if path.startswith("/"):
        raise PathRejected("absolute path")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise PathRejected(f"bad path segment {segment!r}")
    return path


def resolve(root: Path, path: str) -> Path:
    """The real path of ``root/path``, if it is a regular file inside the real root."""
    check_request_path(path)
    real_root = root.resolve(strict=True)
    try:
        real = (real_root / path).resolve(strict=True)
    except (OSError, RuntimeError):
        raise PathRejected("no such file") from None
    if real != real_root and real_root not in real.parents:
        raise PathRejected("outside the served directory")
    try:
        st = real.stat()
    except OSError:
        raise PathRejected("no such file") from None
    if not stat.S_ISREG(st.st_mode):
        raise PathRejected("not a regular file")
    return real


def open_confined(root: Path, path: str) -> tuple[Path, int]:
    """Resolve and open read-only, refusing a final symlink swapped in after resolving."""
    real = resolve(root, path)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        raise PathRejected("cannot open") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PathRejected("not a regular file")
    return real, fd
