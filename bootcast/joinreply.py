"""The join reply: ``KEY=VALUE`` lines (sans-I/O).

The first four keys are fixed by the bootcast spec and come in this order::

    CONNECT=<group>:<port>
    TOKEN=<session token>
    PAGES=<n>
    PAGESIZE=<bytes>

Extensions follow; clients ignore keys they do not know. Ours:

* ``SIZE=<bytes>``: the file size (the last page holds ``SIZE - (PAGES-1)*PAGESIZE``).
* ``SHA256=<hex>``: digest of the whole file, verified by ``bootcast fetch``.
* ``CAST=<id>``: the cast id stamped in word 3 of every page (decimal).
* ``NACK=<path>``: where this client may POST repair requests (see ``nack.py``).
* ``INTERFACE=<addr>``: the address the server sends from (a hint).
* ``PARITY=<port>/<block pages>``: parity symbols for this client come to the group at
  that port (``parity.py``); sent only to clients that asked for parity.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from .errors import RemoteProtocolError

REQUIRED = ("CONNECT", "TOKEN", "PAGES", "PAGESIZE")


def split_hostport(text: str) -> tuple[str, int]:
    """``239.1.2.3:5000``, ``[ff15::1]:5000`` or ``ff15::1:5000`` → (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"bad address {text!r}")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"bad address {text!r}: no port")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port)


def join_hostport(host: str, port: int) -> str:
    """Inverse of :func:`split_hostport`. IPv6 unbracketed, as ``rsplit(':', 1)`` expects."""
    return f"{host}:{port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class JoinReply:
    group: str
    port: int
    token: str
    pages: int
    page_size: int
    size: int | None = None
    sha256: str | None = None
    cast_id: int | None = None
    nack_path: str | None = None
    parity_port: int | None = None
    block_pages: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            addr = ipaddress.ip_address(self.group)
        except ValueError:
            raise RemoteProtocolError(f"CONNECT group {self.group!r} is not an address") from None
        if not addr.is_multicast:
            raise RemoteProtocolError(f"CONNECT group {self.group} is not multicast")
        if not 1 <= self.port <= 65535:
            raise RemoteProtocolError(f"CONNECT port {self.port} out of range")
        if not self.token or any(c.isspace() for c in self.token):
            raise RemoteProtocolError("TOKEN is empty or contains whitespace")
        if not 0 <= self.pages < 2**32 or not 0 < self.page_size <= 65507:
            raise RemoteProtocolError("PAGES must be 0..2³²-1 and PAGESIZE 1..65507")
        if self.cast_id is not None and not 0 <= self.cast_id < 2**32:
            raise RemoteProtocolError("CAST must be 0..2³²-1")
        if self.size is not None and (
            self.size < 0 or -(-self.size // self.page_size) != self.pages
        ):
            raise RemoteProtocolError(
                f"SIZE={self.size} does not match PAGES={self.pages} × {self.page_size}"
            )
        if self.sha256 is not None and (
            len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256)
        ):
            raise RemoteProtocolError("SHA256 is not 64 lowercase hex digits")
        if (self.parity_port is None) != (self.block_pages is None):
            raise RemoteProtocolError("PARITY needs both a port and a block size")
        if self.parity_port is not None and self.block_pages is not None:
            if not 1 <= self.parity_port <= 65535 or not 1 <= self.block_pages <= 128:
                raise RemoteProtocolError("PARITY port must be 1..65535, block 1..128 pages")
            if self.size is None or self.cast_id is None:
                raise RemoteProtocolError("PARITY needs SIZE and CAST")

    def encode(self) -> str:
        lines = [
            f"CONNECT={join_hostport(self.group, self.port)}",
            f"TOKEN={self.token}",
            f"PAGES={self.pages}",
            f"PAGESIZE={self.page_size}",
        ]
        if self.size is not None:
            lines.append(f"SIZE={self.size}")
        if self.sha256 is not None:
            lines.append(f"SHA256={self.sha256}")
        if self.cast_id is not None:
            lines.append(f"CAST={self.cast_id}")
        if self.nack_path is not None:
            lines.append(f"NACK={self.nack_path}")
        if self.parity_port is not None:
            lines.append(f"PARITY={self.parity_port}/{self.block_pages}")
        lines.extend(f"{k}={v}" for k, v in self.extra.items())
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str) -> JoinReply:
        values: dict[str, str] = {}
        order: list[str] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line:
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise RemoteProtocolError(f"join reply line without '=': {line[:60]!r}")
            values.setdefault(key, value)
            order.append(key)
        if order[:4] != list(REQUIRED):
            raise RemoteProtocolError(
                f"join reply must begin {', '.join(REQUIRED)}; got {order[:4]}"
            )
        try:
            group, port = split_hostport(values["CONNECT"])
            pages = int(values["PAGES"])
            page_size = int(values["PAGESIZE"])
            size = int(values["SIZE"]) if "SIZE" in values else None
            cast_id = int(values["CAST"]) if "CAST" in values else None
            parity_port = block_pages = None
            if "PARITY" in values:
                port_text, _, block_text = values["PARITY"].partition("/")
                parity_port, block_pages = int(port_text), int(block_text)
        except ValueError as exc:
            raise RemoteProtocolError(f"bad join reply: {exc}") from None
        known = {*REQUIRED, "SIZE", "SHA256", "CAST", "NACK", "PARITY"}
        return cls(
            group=group,
            port=port,
            token=values["TOKEN"],
            pages=pages,
            page_size=page_size,
            size=size,
            sha256=values.get("SHA256"),
            cast_id=cast_id,
            nack_path=values.get("NACK"),
            parity_port=parity_port,
            block_pages=block_pages,
            extra={k: v for k, v in values.items() if k not in known},
        )
