"""The bootcast data-plane page: the wire format of one UDP datagram (sans-I/O).

Layout (all integers unsigned 32-bit, network byte order)::

    +--------+--------+---------+--------+-----------------+-----------------+
    | size   | index  | cast_id | crc32c | payload (size)  | trailer (opt.)  |
    +--------+--------+---------+--------+-----------------+-----------------+

* ``size``: payload bytes in this page (0 ≤ size ≤ PAGESIZE).
* ``index``: page index, starting at 1; in file mode page *i* holds the file's bytes
  ``(i-1)*PAGESIZE … (i-1)*PAGESIZE+size``.
* ``cast_id``: reserved in the original spec; we stamp the cast id so a receiver drops stray
  pages of another cast (or an older epoch of the log) that reach the same port.
* ``crc32c``: reserved in the original spec; CRC32C (Castagnoli) of the payload.

A page may carry bytes after the payload. Ours carry a 4-byte trailer
``0xBC, version=1, flags, 0`` whose flag bit 0 marks a *repair* (a resend outside the
carousel order), which lets our receivers keep gap detection exact; bit 2, on a repair,
says the carousel is paused (a receiver then knows the pass is over and asks for all it
lacks, instead of inferring it from a quiet carousel). Bit 1 marks parity (``parity.py``).
A spec-only receiver ignores the trailer. The trailer is advisory: it is never used to accept data.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import NamedTuple

import crc32c as _crc32c

HEADER = struct.Struct("!IIII")
HEADER_BYTES = HEADER.size
TRAILER = struct.Struct("!BBBB")
TRAILER_BYTES = TRAILER.size
TRAILER_MAGIC = 0xBC
TRAILER_VERSION = 1
FLAG_REPAIR = 0x01
FLAG_CAROUSEL_DONE = 0x04  # on a repair: the carousel is paused (every NACK client had a pass)
MAX_PAGE_SIZE = 65507 - HEADER_BYTES - TRAILER_BYTES  # largest UDP/IPv4 payload


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC32C of ``data`` (C implementation from the ``crc32c`` package)."""
    return int(_crc32c.crc32c(data))


class DropReason(enum.Enum):
    """Why a received datagram was not used. Counted per reason by receivers."""

    SHORT = "short"  # fewer bytes than a header
    TRUNCATED = "truncated"  # header says more payload than arrived
    OVERSIZED = "oversized"  # size larger than the cast's PAGESIZE
    BAD_INDEX = "bad_index"  # index 0 or beyond PAGES
    FOREIGN = "foreign"  # another cast id
    BAD_CRC = "bad_crc"  # payload does not match its CRC32C
    BAD_SIZE = "bad_size"  # size does not match the page's place in the file
    DUPLICATE = "duplicate"  # already held
    BAD_PARITY = "bad_parity"  # a datagram on the parity port that is not a valid symbol


class PageHeader(NamedTuple):
    size: int
    page_index: int
    cast_id: int
    crc: int


@dataclass(frozen=True, slots=True)
class Page:
    """A decoded page. ``payload`` is a view into the datagram (no copy)."""

    index: int
    cast_id: int
    crc: int
    payload: memoryview
    repair: bool


class PageError(Exception):
    """A datagram is not a valid page; ``reason`` says why."""

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason


def encode(
    index: int,
    cast_id: int,
    payload: bytes | memoryview,
    *,
    crc: int | None = None,
    repair: bool = False,
    trailer: bool = True,
) -> bytes:
    """Encode one page. ``crc`` may be precomputed (file casts compute each page's once)."""
    if not 1 <= index <= 0xFFFFFFFF:
        raise ValueError(f"page index out of range: {index}")
    if not 0 <= cast_id <= 0xFFFFFFFF:
        raise ValueError(f"cast id out of range: {cast_id}")
    size = len(payload)
    if size > MAX_PAGE_SIZE:
        raise ValueError(f"payload of {size} bytes exceeds the largest page")
    if crc is None:
        crc = crc32c(payload)
    head = HEADER.pack(size, index, cast_id, crc)
    if not trailer:
        return head + bytes(payload)
    tail = TRAILER.pack(TRAILER_MAGIC, TRAILER_VERSION, FLAG_REPAIR if repair else 0, 0)
    return b"".join((head, payload, tail))


def decode_header(datagram: bytes | bytearray | memoryview) -> PageHeader:
    if len(datagram) < HEADER_BYTES:
        raise PageError(DropReason.SHORT, f"{len(datagram)} bytes")
    return PageHeader._make(HEADER.unpack_from(datagram))


def decode(
    datagram: bytes | bytearray | memoryview,
    *,
    cast_id: int | None = None,
    page_size: int | None = None,
    verify_crc: bool = True,
) -> Page:
    """Decode and check one datagram; raise :class:`PageError` with the drop reason."""
    view = memoryview(datagram)
    size, index, got_cast, crc = decode_header(view)
    if page_size is not None and size > page_size:
        raise PageError(DropReason.OVERSIZED, f"size {size} > page size {page_size}")
    end = HEADER_BYTES + size
    if len(view) < end:
        raise PageError(DropReason.TRUNCATED, f"size {size}, {len(view) - HEADER_BYTES} sent")
    if cast_id is not None and got_cast != cast_id:
        raise PageError(DropReason.FOREIGN, f"cast {got_cast:#x}")
    if index == 0:
        raise PageError(DropReason.BAD_INDEX, "index 0")
    payload = view[HEADER_BYTES:end]
    if verify_crc and crc32c(payload) != crc:
        raise PageError(DropReason.BAD_CRC, f"page {index}")
    repair = False
    if len(view) >= end + TRAILER_BYTES:
        magic, version, flags, _ = TRAILER.unpack_from(view, end)
        if magic == TRAILER_MAGIC and version == TRAILER_VERSION:
            repair = bool(flags & FLAG_REPAIR)
    return Page(index=index, cast_id=got_cast, crc=crc, payload=payload, repair=repair)


def page_count(size_bytes: int, page_size_bytes: int) -> int:
    """``PAGES = ceil(size / PAGESIZE)``: 0 for an empty file, k for exactly k·PAGESIZE."""
    if size_bytes < 0 or page_size_bytes <= 0:
        raise ValueError("size must be ≥ 0 and page size > 0")
    return -(-size_bytes // page_size_bytes)


def page_span(index: int, size_bytes: int, page_size_bytes: int) -> tuple[int, int]:
    """(offset, length) of page ``index`` (1-based) in a file of ``size_bytes``."""
    offset = (index - 1) * page_size_bytes
    return offset, max(0, min(page_size_bytes, size_bytes - offset))
