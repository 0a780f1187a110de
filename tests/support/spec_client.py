"""A bootcast client written from the protocol spec alone (``seeds/bootcast-spec.txt``).

It knows nothing of this repository's extensions and imports nothing from ``bootcast``:

1. ``GET /join/<path>`` → ``KEY=VALUE`` lines; only ``CONNECT``, ``TOKEN``, ``PAGES`` and
   ``PAGESIZE`` are used, unknown keys are ignored.
2. Bind a UDP socket to (group, port) from ``CONNECT`` and join the group on the given
   interface address.
3. Each datagram: four unsigned 32-bit big-endian words ``size, index, reserved, reserved``
   and then ``size`` payload bytes. The reserved words and any bytes after the payload are
   ignored. Page *i* (1-based) holds the file's bytes from ``(i-1)*PAGESIZE``; the last
   page's size gives the file size.
4. Once every page is held (no NACKs: it waits for the carousel to bring missing pages
   round again), ``GET /leave/<path>`` with ``X-TOKEN``, and return the bytes.

``PAGES=0`` (an empty file) means join, leave, done. Everything is blocking with one overall
deadline, so it runs in a thread from async tests and as a command line tool for the
multi-host tests. (From a test that also runs the server in-process, give it a thread of its
own rather than ``asyncio.to_thread``: the server opens each cast in the default executor,
and a few parked clients would starve it.) ::

    python -m tests.support.spec_client http://HOST:PORT/join/PATH --interface ADDR -O FILE
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

HEADER = struct.Struct("!IIII")
HEADER_BYTES = HEADER.size
DEFAULT_TIMEOUT_S = 30.0
RCVBUF_BYTES = 4 * 1024 * 1024


class SpecClientError(Exception):
    """The fetch failed; the message is a one-line reason."""


class SpecClientTimeout(SpecClientError):
    """The deadline passed before every page arrived."""


@dataclass(frozen=True, slots=True)
class JoinInfo:
    group: str
    port: int
    token: str
    pages: int
    page_size: int
    lines: tuple[str, ...]  # the raw reply lines, for tests that check their order


@dataclass(frozen=True, slots=True)
class FetchResult:
    data: bytes
    join: JoinInfo
    leave_status: int  # -1 if the leave request itself failed
    leave_body: bytes
    datagrams: int  # datagrams received, used or not


@dataclass(frozen=True, slots=True)
class Datagram:
    size: int
    index: int
    payload: bytes


def parse_datagram(datagram: bytes) -> Datagram | None:
    """Header and payload of one datagram; None if it is shorter than its header says.

    Words 3 and 4 are reserved in the spec and bytes after the payload are not part of the
    page: both are ignored.
    """
    if len(datagram) < HEADER_BYTES:
        return None
    size, index, _reserved3, _reserved4 = HEADER.unpack_from(datagram)
    end = HEADER_BYTES + size
    if len(datagram) < end:
        return None
    return Datagram(size=size, index=index, payload=bytes(datagram[HEADER_BYTES:end]))


def parse_join(text: str) -> JoinInfo:
    lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    values: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep:
            values.setdefault(key, value)
    try:
        host, _, port = values["CONNECT"].rpartition(":")
        group = host.strip("[]")
        ipaddress.ip_address(group)
        info = JoinInfo(
            group=group,
            port=int(port),
            token=values["TOKEN"],
            pages=int(values["PAGES"]),
            page_size=int(values["PAGESIZE"]),
            lines=lines,
        )
    except (KeyError, ValueError) as exc:
        raise SpecClientError(f"bad join reply ({exc}): {text[:200]!r}") from None
    if info.pages < 0 or info.page_size <= 0 or not 1 <= info.port <= 65535 or not info.token:
        raise SpecClientError(f"bad join reply: {text[:200]!r}")
    return info


def http_get(
    host: str,
    port: int,
    target: str,
    *,
    headers: dict[str, str] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> tuple[int, bytes]:
    """One GET on a fresh connection: (status, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=max(timeout_s, 0.1))
    try:
        conn.request("GET", target, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _v6_interface_index(interface: str | None) -> int:
    if not interface:
        return 0
    try:
        addr = ipaddress.ip_address(interface.split("%")[0])
    except ValueError:
        return socket.if_nametoindex(interface)
    wanted = addr.exploded.replace(":", "")
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] == wanted:
                    return int(fields[1], 16)
    except OSError:
        pass
    return socket.if_nametoindex("lo") if addr.is_loopback else 0


def open_group_socket(
    group: str, port: int, interface: str | None = "127.0.0.1", *, rcvbuf: int = RCVBUF_BYTES
) -> socket.socket:
    """A blocking UDP socket bound to (group, port) that joined ``group`` on ``interface``.

    ``interface`` is an IPv4 address or an interface name (IPv6: a name or an address);
    None lets the kernel choose.
    """
    v6 = ipaddress.ip_address(group).version == 6
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if v6:
            index = _v6_interface_index(interface)
            sock.bind((group, port, 0, index))
            mreq6 = socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", index)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq6)
        else:
            sock.bind((group, port))
            if interface is None:
                mreq = struct.pack("=4s4si", socket.inet_aton(group), bytes(4), 0)
            else:
                try:
                    local = socket.inet_aton(interface)
                    index = 0
                except OSError:
                    local, index = bytes(4), socket.if_nametoindex(interface)
                mreq = struct.pack("=4s4si", socket.inet_aton(group), local, index)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    except OSError:
        sock.close()
        raise
    return sock


def _split_url(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise SpecClientError(f"not an http URL: {url}")
    if not parts.path.startswith("/join/") or parts.path == "/join/":
        raise SpecClientError(f"not a join URL: {url}")
    return parts.hostname, parts.port or 80, parts.path[len("/join/") :]


def fetch_result(
    url: str, *, interface: str | None = "127.0.0.1", timeout_s: float = DEFAULT_TIMEOUT_S
) -> FetchResult:
    """Join, collect every page from the carousel, leave; raise SpecClientError on failure."""
    deadline = time.monotonic() + timeout_s
    host, port, path = _split_url(url)
    try:
        status, body = http_get(host, port, "/join/" + path, timeout_s=timeout_s)
    except OSError as exc:
        raise SpecClientError(f"join failed: {exc}") from None
    if status != 200:
        raise SpecClientError(f"join answered {status}: {body[:200]!r}")
    join = parse_join(body.decode("utf-8", "replace"))
    pages: dict[int, bytes] = {}
    datagrams = 0
    leave_status, leave_body = -1, b""
    try:
        if join.pages:
            sock = open_group_socket(join.group, join.port, interface)
            with sock:
                while len(pages) < join.pages:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise SpecClientTimeout(
                            f"timeout after {timeout_s}s: {len(pages)} of {join.pages} pages"
                        )
                    sock.settimeout(min(remaining, 0.5))
                    try:
                        raw = sock.recv(65536)
                    except TimeoutError:
                        continue
                    datagrams += 1
                    page = parse_datagram(raw)
                    if page is None or not 1 <= page.index <= join.pages:
                        continue
                    if page.index in pages:
                        continue
                    # Every page but the last is full; the last holds 1..PAGESIZE bytes.
                    if page.index < join.pages and page.size != join.page_size:
                        continue
                    if page.index == join.pages and not 1 <= page.size <= join.page_size:
                        continue
                    pages[page.index] = page.payload
    finally:
        try:
            leave_status, leave_body = http_get(
                host,
                port,
                "/leave/" + path,
                headers={"X-TOKEN": join.token},
                timeout_s=max(1.0, deadline - time.monotonic()),
            )
        except OSError:
            leave_status, leave_body = -1, b""
    data = b"".join(pages[i] for i in range(1, join.pages + 1))
    return FetchResult(
        data=data,
        join=join,
        leave_status=leave_status,
        leave_body=leave_body,
        datagrams=datagrams,
    )


def fetch(
    url: str, *, interface: str | None = "127.0.0.1", timeout_s: float = DEFAULT_TIMEOUT_S
) -> bytes:
    return fetch_result(url, interface=interface, timeout_s=timeout_s).data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.spec_client", description="spec-only bootcast client"
    )
    parser.add_argument("url", help="join URL: http://HOST:PORT/join/PATH")
    parser.add_argument("--interface", default=None, help="address (or name) to join on")
    parser.add_argument("-O", "--output", default="-", help="output file ('-': stdout)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds")
    args = parser.parse_args(argv)
    try:
        data = fetch(args.url, interface=args.interface, timeout_s=args.timeout)
    except SpecClientError as exc:
        print(f"spec_client: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"spec_client: {exc}", file=sys.stderr)
        return 1
    if args.output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        with open(args.output, "wb") as f:
            f.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
