"""Parity repair: erasure-coded repair symbols for blocks of pages (sans-I/O).

Repeating lost pages is wasteful when several receivers lose *different* pages: eight
receivers each missing one page of a block need eight resends. Parity fixes that. The file's
pages are grouped into **blocks** of ``BLOCK_PAGES`` consecutive pages (the last block may be
shorter); page *i* is in block ``(i-1) // BLOCK_PAGES``. A block of *k* pages is treated as
*k* data symbols (each page zero-padded to PAGESIZE) of a systematic Reed–Solomon code with
``SYMBOLS`` = 256 symbols: symbols ``0 … k-1`` are the pages themselves, ``k … 255`` are
parity. Any *k* distinct symbols of a block rebuild all of its pages, so one parity symbol
repairs a different lost page at every receiver at once: a block costs as many repair
symbols as the *worst* receiver lost, not the sum. With independent loss *p*, the data sent
approaches ``1/(1-p)`` of the file (repeats need ≈ 2.2× at 20 % loss for 8 receivers).

Parity datagrams use the page header (``page.py``) with these meanings, and travel on their
own port (the cast's port + 1, same group), so a spec-only client never sees one::

    size    = PAGESIZE (every symbol is a whole padded page)
    index   = block number + 1
    cast_id = the cast id
    crc32c  = CRC32C of the symbol
    trailer = 0xBC, 1, flags (FLAG_PARITY; FLAG_CAROUSEL_DONE as on pages), symbol number

A client asks for parity by joining with ``X-Bootcast-Repair: nack, parity``; the server
then announces ``PARITY=<port>/<BLOCK_PAGES>`` in the join reply, and reads that client's
NACK ``MISSING`` ranges per block: a client lists, per block, only as many missing pages as
it still needs symbols (it holds some parity already). The server answers a block's need
with new parity symbols (never sent before for that block), or with the pages themselves
when the client lacks the whole block (a late joiner: no encoding work for the same cost).

The code is ``zfec`` (Tahoe-LAFS's C implementation of Rizzo's Reed–Solomon erasure code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .page import (
    FLAG_CAROUSEL_DONE,
    HEADER,
    HEADER_BYTES,
    TRAILER,
    TRAILER_BYTES,
    TRAILER_MAGIC,
    TRAILER_VERSION,
)
from .page import crc32c as _crc32c

BLOCK_PAGES = 16  # zfec costs grow with k per symbol; 16 keeps both ends cheap
SYMBOLS = 256  # zfec's limit on k + parity
FLAG_PARITY = 0x02


def block_of(index: int, block_pages: int = BLOCK_PAGES) -> int:
    """The block (0-based) of page ``index`` (1-based)."""
    return (index - 1) // block_pages


def block_span(block: int, pages: int, block_pages: int = BLOCK_PAGES) -> tuple[int, int]:
    """(first page, page count) of ``block`` in a file of ``pages`` pages."""
    first = block * block_pages + 1
    return first, max(0, min(block_pages, pages - first + 1))


def block_count(pages: int, block_pages: int = BLOCK_PAGES) -> int:
    return -(-pages // block_pages)


@dataclass(frozen=True, slots=True)
class Symbol:
    """A received parity symbol (checked: cast, block range, size, CRC)."""

    block: int
    number: int
    data: bytes
    carousel_done: bool = False


def encode_datagram(
    block: int, number: int, cast_id: int, symbol: bytes, *, carousel_done: bool = False
) -> bytes:
    head = HEADER.pack(len(symbol), block + 1, cast_id, _crc32c(symbol))
    flags = FLAG_PARITY | (FLAG_CAROUSEL_DONE if carousel_done else 0)
    tail = TRAILER.pack(TRAILER_MAGIC, TRAILER_VERSION, flags, number)
    return b"".join((head, symbol, tail))


def decode_datagram(
    data: bytes | memoryview, *, cast_id: int, page_size: int, blocks: int
) -> Symbol | None:
    """The symbol in a parity datagram, or None when it is not a valid one of this cast."""
    if len(data) != HEADER_BYTES + page_size + TRAILER_BYTES:
        return None
    size, index, got_cast, crc = HEADER.unpack_from(data)
    magic, version, flags, number = TRAILER.unpack_from(data, HEADER_BYTES + page_size)
    if (
        size != page_size
        or got_cast != cast_id
        or not 1 <= index <= blocks
        or magic != TRAILER_MAGIC
        or version != TRAILER_VERSION
        or not flags & FLAG_PARITY
    ):
        return None
    symbol = bytes(data[HEADER_BYTES : HEADER_BYTES + page_size])
    if _crc32c(symbol) != crc:
        return None
    return Symbol(index - 1, number, symbol, bool(flags & FLAG_CAROUSEL_DONE))


class _Codecs:
    """zfec encoders/decoders by k (building one costs ~0.5 ms: at most two k per file).
    zfec is imported on first use: a fetch that never needs parity starts faster."""

    def __init__(self) -> None:
        self._enc: dict[int, Any] = {}
        self._dec: dict[int, Any] = {}

    def encoder(self, k: int) -> Any:
        enc = self._enc.get(k)
        if enc is None:
            import zfec

            enc = self._enc[k] = zfec.Encoder(k, SYMBOLS)
        return enc

    def decoder(self, k: int) -> Any:
        dec = self._dec.get(k)
        if dec is None:
            import zfec

            dec = self._dec[k] = zfec.Decoder(k, SYMBOLS)
        return dec


_codecs = _Codecs()


def pad(pages: list[bytes], page_size: int) -> list[bytes]:
    """The block's data symbols: its pages, the last one zero-padded to ``page_size``."""
    if pages and len(pages[-1]) < page_size:
        pages = [*pages[:-1], pages[-1].ljust(page_size, b"\0")]
    return pages


def encode_symbols(data: list[bytes], numbers: list[int]) -> list[bytes]:
    """Parity symbols ``numbers`` (each k … 255) of a block whose padded pages are ``data``."""
    k = len(data)
    if not 1 <= k < SYMBOLS or any(not k <= n < SYMBOLS for n in numbers):
        raise ValueError(f"parity symbols of a {k}-page block are {k}..{SYMBOLS - 1}")
    return [bytes(s) for s in _codecs.encoder(k).encode(data, numbers)]


def decode_symbols(k: int, symbols: dict[int, bytes]) -> list[bytes]:
    """All ``k`` data symbols of a block from any ``k`` distinct symbols (number → bytes)."""
    if len(symbols) < k:
        raise ValueError(f"{len(symbols)} symbols cannot rebuild a {k}-page block")
    numbers = sorted(symbols)[:k]
    out = _codecs.decoder(k).decode([symbols[n] for n in numbers], numbers)
    return [bytes(s) for s in out]


__all__ = [
    "BLOCK_PAGES",
    "FLAG_PARITY",
    "SYMBOLS",
    "Symbol",
    "block_count",
    "block_of",
    "block_span",
    "decode_datagram",
    "decode_symbols",
    "encode_datagram",
    "encode_symbols",
    "pad",
]
