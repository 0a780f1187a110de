"""Multicast sockets for IPv4 and IPv6 (the I/O side; no protocol logic here).

``interface`` is an interface address (``127.0.0.1``, ``10.0.0.5``, ``fd00::5``), an
interface name (``lo``, ``eth0``) or None for the kernel's choice. IPv6 needs an interface
index; an IPv6 address is mapped to its index through ``/proc/net/if_inet6``.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from .errors import ConfigError

IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)
SO_MEMINFO = 55
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SK_MEMINFO_DROPS = 8
DEFAULT_RCVBUF = 8 * 1024 * 1024
# Small on purpose: the kernel doubles it, and what the socket may have queued must stay
# below the interface queue (a tbf qdisc of 50 ms at 100 Mbit holds ~600 KB) so that a full
# queue blocks the sender instead of dropping its datagrams.
DEFAULT_SNDBUF = 128 * 1024
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)


@dataclass(frozen=True, slots=True)
class Interface:
    """A resolved interface: the IPv4 address and/or the index (0 = kernel's choice)."""

    address: str | None
    index: int

    @property
    def label(self) -> str:
        return self.address or (socket.if_indextoname(self.index) if self.index else "default")


def _v6_index(address: str) -> int:
    target = ipaddress.IPv6Address(address).exploded.replace(":", "")
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] == target:
                    return int(fields[1], 16)
    except OSError:
        pass
    if ipaddress.IPv6Address(address).is_loopback:
        return socket.if_nametoindex("lo")
    raise ConfigError(f"no interface has the address {address}")


def resolve_interface(interface: str | None, *, ipv6: bool) -> Interface:
    if not interface:
        return Interface(None, 0)
    try:
        addr = ipaddress.ip_address(interface.split("%")[0])
    except ValueError:
        try:
            return Interface(None, socket.if_nametoindex(interface))
        except OSError:
            raise ConfigError(f"no such interface: {interface}") from None
    if isinstance(addr, ipaddress.IPv6Address):
        return Interface(str(addr) if not ipv6 else None, _v6_index(str(addr)))
    if ipv6:
        raise ConfigError(f"IPv6 group but IPv4 interface address {interface}; give a name")
    return Interface(str(addr), 0)


def is_ipv6(group: str) -> bool:
    return isinstance(ipaddress.ip_address(group), ipaddress.IPv6Address)


def _mreqn(group: str, iface: Interface) -> bytes:
    return struct.pack(
        "=4s4si",
        socket.inet_aton(group),
        socket.inet_aton(iface.address or "0.0.0.0"),
        iface.index,
    )


def sender_socket(group: str, *, interface: str | None, ttl: int = 1) -> socket.socket:
    """A non-blocking UDP socket that sends to ``group`` through ``interface``."""
    v6 = is_ipv6(group)
    iface = resolve_interface(interface, ipv6=v6)
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, DEFAULT_SNDBUF)
        # With RECVERR a datagram the local queue drops fails with ENOBUFS instead of
        # vanishing silently, so the sender can retry it rather than wait for NACKs.
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, ttl)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 1)
            if iface.index:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, iface.index)
        else:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            if iface.address or iface.index:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, _mreqn(group, iface))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot send to {group} via {iface.label}: {exc.strerror}") from None
    return sock


def receiver_socket(
    group: str, port: int, *, interface: str | None, rcvbuf: int = DEFAULT_RCVBUF
) -> socket.socket:
    """A non-blocking UDP socket bound to (group, port) and joined on ``interface``.

    Binding the group address (not the wildcard) keeps other groups on the same port out,
    and so does IP_MULTICAST_ALL=0.
    """
    v6 = is_ipv6(group)
    iface = resolve_interface(interface, ipv6=v6)
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if v6:
            sock.bind((group, port, 0, iface.index))
            mreq = socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", iface.index)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
            sock.bind((group, port))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, _mreqn(group, iface))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot join {group} port {port} on {iface.label}: {exc.strerror}"
        ) from None
    return sock


def socket_drops(sock: socket.socket) -> int:
    """Datagrams the kernel dropped on this socket (receive buffer overrun); 0 if unknown."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * 16)
    except OSError:
        return 0
    values = struct.unpack(f"={len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    return values[SK_MEMINFO_DROPS] if len(values) > SK_MEMINFO_DROPS else 0


def expected_source(interface_hint: str, port: int) -> tuple[str | None, int | None]:
    """The (host, port) a stream's datagrams must come from, for :func:`receive_from`: the
    host only when the hint is an IPv4 address (names and IPv6 hints, whose recvfrom form
    varies, are left to the port check); port 0 means unknown."""
    try:
        host: str | None = str(ipaddress.IPv4Address(interface_hint))
    except ValueError:
        host = None
    return host, port or None


def receive_from(
    sock: socket.socket,
    source: tuple[str | None, int | None],
    drops: dict[str, int],
    *,
    limit: int = 256,
    size: int = 65536,
) -> list[bytes]:
    """Up to ``limit`` datagrams waiting on a non-blocking ``sock``, keeping only those from
    ``source`` (host, port; None: any). Others — another stream on the same group and port,
    or a forger — are counted in ``drops["foreign_source"]``."""
    host, port = source
    out = []
    for _ in range(limit):
        try:
            data, sender = sock.recvfrom(size)
        except OSError:  # BlockingIOError: drained
            break
        if (port is not None and sender[1] != port) or (host is not None and sender[0] != host):
            drops["foreign_source"] = drops.get("foreign_source", 0) + 1
            continue
        out.append(data)
    return out
