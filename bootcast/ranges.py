"""Page-range lists, the currency of NACKs (sans-I/O).

Text form: comma-separated ranges of 1-based page indexes, ``a-b`` inclusive or a single
``a``: ``"1-5,9,12-20"``. The empty string is the empty list. Parsing is strict (ascending,
non-overlapping, within ``1..pages``) and bounded, because the text comes from the network.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .errors import RemoteProtocolError

Range = tuple[int, int]  # inclusive (first, last)


def format_ranges(ranges: Iterable[Range]) -> str:
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges)


def parse_ranges(text: str, *, pages: int, max_ranges: int = 65536) -> list[Range]:
    text = text.strip()
    if not text:
        return []
    parts = text.split(",")
    if len(parts) > max_ranges:
        raise RemoteProtocolError(f"too many ranges: {len(parts)} > {max_ranges}")
    out: list[Range] = []
    last = 0
    for part in parts:
        first_s, sep, last_s = part.partition("-")
        try:
            a = int(first_s)
            b = int(last_s) if sep else a
        except ValueError:
            raise RemoteProtocolError(f"bad range {part[:40]!r}") from None
        if not (first_s.isdigit() and (not sep or last_s.isdigit())):
            raise RemoteProtocolError(f"bad range {part[:40]!r}")
        if a < 1 or b < a or b > pages:
            raise RemoteProtocolError(f"range {part[:40]!r} outside 1..{pages}")
        if a <= last:
            raise RemoteProtocolError("ranges must ascend without overlap")
        out.append((a, b))
        last = b
    return out


def missing_ranges(
    have: bytearray | bytes, first: int, last: int, *, limit: int | None = None
) -> list[Range]:
    """Runs of zero bytes in ``have[first..last]`` (inclusive), at most ``limit`` of them.

    ``have`` is a byte-per-page map (index 0 unused). ``bytes.find`` keeps this at C speed.
    """
    out: list[Range] = []
    pos = first
    end = last + 1
    while pos < end:
        hole = have.find(0, pos, end)
        if hole < 0:
            break
        filled = have.find(1, hole, end)
        stop = end if filled < 0 else filled
        out.append((hole, stop - 1))
        if limit is not None and len(out) >= limit:
            break
        pos = stop
    return out


def iter_pages(ranges: Iterable[Range]) -> Iterator[int]:
    for a, b in ranges:
        yield from range(a, b + 1)


def count_pages(ranges: Iterable[Range]) -> int:
    return sum(b - a + 1 for a, b in ranges)
