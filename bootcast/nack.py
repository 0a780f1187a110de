"""The NACK extension: a receiver's report of what it lacks and how the stream is doing.

``POST /nack/<path>`` with header ``X-TOKEN: <token>`` and a ``text/plain`` body of
``KEY=VALUE`` lines (unknown keys are ignored, every key is optional)::

    MISSING=12-40,97        pages this client lacks and asks to be resent now
    RECEIVED=1830           carousel pages received since the previous report
    LOST=41                 carousel pages detected lost since the previous report
    OVERRUN=0               datagrams the client's socket dropped (buffer overrun) since then
    HELD=20311              pages held in total (progress, for the server's logs)

The server answers ``204 No Content``. ``MISSING`` is bounded (a client sends at most
``MAX_RANGES`` ranges per report, the lowest first); the server resends each listed page at
most once per suppression window however many clients ask, and uses RECEIVED/LOST/OVERRUN
for adaptive pacing (see ``pacing.py``). A report also counts as a sign of life.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import RemoteProtocolError
from .ranges import Range, format_ranges, parse_ranges

MAX_RANGES = 2048
MAX_BODY_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class NackReport:
    missing: list[Range] = field(default_factory=list)
    received: int = 0
    lost: int = 0
    overrun: int = 0
    held: int | None = None

    def __post_init__(self) -> None:
        if min(self.received, self.lost, self.overrun) < 0:
            raise RemoteProtocolError("NACK counters must be ≥ 0")
        if len(self.missing) > MAX_RANGES:
            raise RemoteProtocolError(f"NACK lists more than {MAX_RANGES} ranges")

    def encode(self) -> bytes:
        lines = [
            f"MISSING={format_ranges(self.missing)}",
            f"RECEIVED={self.received}",
            f"LOST={self.lost}",
            f"OVERRUN={self.overrun}",
        ]
        if self.held is not None:
            lines.append(f"HELD={self.held}")
        return ("\n".join(lines) + "\n").encode("ascii")

    @classmethod
    def parse(cls, body: bytes, *, pages: int) -> NackReport:
        if len(body) > MAX_BODY_BYTES:
            raise RemoteProtocolError(f"NACK body over {MAX_BODY_BYTES} bytes")
        try:
            text = body.decode("ascii")
        except UnicodeDecodeError:
            raise RemoteProtocolError("NACK body is not ASCII") from None
        values: dict[str, str] = {}
        for raw in text.splitlines():
            line = raw.strip()
            if not line:
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise RemoteProtocolError(f"NACK line without '=': {line[:40]!r}")
            values[key] = value

        def count(key: str) -> int:
            value = values.get(key, "0")
            if not value.isdigit() or len(value) > 12:
                raise RemoteProtocolError(f"NACK {key} is not a count")
            return int(value)

        held = count("HELD") if "HELD" in values else None
        return cls(
            missing=parse_ranges(values.get("MISSING", ""), pages=pages, max_ranges=MAX_RANGES),
            received=count("RECEIVED"),
            lost=count("LOST"),
            overrun=count("OVERRUN"),
            held=held,
        )
