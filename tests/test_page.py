"""The page codec, h11-style: one table of (value, bytes) drives encode and decode."""

from __future__ import annotations

import contextlib
import random
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bootcast import page
from bootcast.page import DropReason, PageError

HELLO_CRC = page.crc32c(b"hello")

CASES: list[tuple[tuple[int, int, bytes, bool], bytes]] = [
    (
        (1, 7, b"hello", False),
        struct.pack("!IIII", 5, 1, 7, HELLO_CRC) + b"hello" + b"\xbc\x01\x00\x00",
    ),
    (
        (2, 7, b"hello", True),
        struct.pack("!IIII", 5, 2, 7, HELLO_CRC) + b"hello" + b"\xbc\x01\x01\x00",
    ),
    ((0xFFFFFFFF, 0, b"", False), struct.pack("!IIII", 0, 0xFFFFFFFF, 0, 0) + b"\xbc\x01\x00\x00"),
]


@pytest.mark.parametrize(("value", "wire"), CASES)
def test_encode_decode_table(value: tuple[int, int, bytes, bool], wire: bytes) -> None:
    index, cast_id, payload, repair = value
    assert page.encode(index, cast_id, payload, repair=repair) == wire
    got = page.decode(wire, cast_id=cast_id)
    assert (got.index, got.cast_id, bytes(got.payload), got.repair) == value


def test_crc32c_is_castagnoli() -> None:
    # The standard CRC-32C check value.
    assert page.crc32c(b"123456789") == 0xE3069283


def test_spec_receiver_view_ignores_trailer_and_reserved_words() -> None:
    wire = page.encode(3, 99, b"abc", repair=True)
    size, index, _, _ = struct.unpack_from("!IIII", wire)
    assert (size, index, wire[16 : 16 + size]) == (3, 3, b"abc")


def test_decode_without_trailer_and_with_trailing_garbage() -> None:
    bare = page.encode(4, 1, b"xyz", trailer=False)
    assert len(bare) == 16 + 3
    assert bytes(page.decode(bare).payload) == b"xyz"
    noisy = bare + b"\x00garbage-after-the-payload"
    got = page.decode(noisy, cast_id=1)
    assert bytes(got.payload) == b"xyz" and got.repair is False


@pytest.mark.parametrize(
    ("datagram", "kwargs", "reason"),
    [
        (b"", {}, DropReason.SHORT),
        (b"\x00" * 15, {}, DropReason.SHORT),
        (struct.pack("!IIII", 10, 1, 1, 0) + b"abc", {}, DropReason.TRUNCATED),
        (page.encode(1, 5, b"abc"), {"cast_id": 6}, DropReason.FOREIGN),
        (page.encode(1, 5, b"a" * 100), {"page_size": 99}, DropReason.OVERSIZED),
        (struct.pack("!IIII", 3, 0, 5, page.crc32c(b"abc")) + b"abc", {}, DropReason.BAD_INDEX),
        (struct.pack("!IIII", 3, 1, 5, 12345) + b"abc", {}, DropReason.BAD_CRC),
    ],
)
def test_decode_rejects(datagram: bytes, kwargs: dict[str, int], reason: DropReason) -> None:
    with pytest.raises(PageError) as info:
        page.decode(datagram, **kwargs)  # type: ignore[arg-type]
    assert info.value.reason is reason


def test_every_bit_flip_in_payload_is_caught() -> None:
    wire = bytearray(page.encode(9, 3, bytes(range(64))))
    for bit in range(16 * 8, (16 + 64) * 8):
        flipped = bytearray(wire)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(PageError):
            page.decode(flipped, cast_id=3)


def test_random_garbage_never_raises_anything_but_page_error() -> None:
    rng = random.Random(1234)
    for _ in range(5000):
        blob = rng.randbytes(rng.randrange(0, 80))
        with contextlib.suppress(PageError):
            page.decode(blob, cast_id=rng.randrange(3), page_size=32)


@given(
    index=st.integers(1, 2**32 - 1),
    cast_id=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=2000),
    repair=st.booleans(),
)
def test_round_trip(index: int, cast_id: int, payload: bytes, repair: bool) -> None:
    got = page.decode(page.encode(index, cast_id, payload, repair=repair), cast_id=cast_id)
    assert (got.index, bytes(got.payload), got.repair) == (index, payload, repair)


@pytest.mark.parametrize(
    ("size", "page_size", "pages"),
    [
        (0, 1400, 0),
        (1, 1400, 1),
        (1400, 1400, 1),
        (1401, 1400, 2),
        (2800, 1400, 2),
        (2801, 1400, 3),
        (64 * 2**20, 8192, 8192),
    ],
)
def test_page_count(size: int, page_size: int, pages: int) -> None:
    assert page.page_count(size, page_size) == pages
    if pages:
        offset, length = page.page_span(pages, size, page_size)
        assert offset + length == size and 0 < length <= page_size
