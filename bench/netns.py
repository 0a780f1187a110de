"""Throw-away multi-host networks built from Linux network namespaces.

Theory of operation
-------------------
A :class:`Topology` builds one *switch* namespace holding a Linux bridge and one namespace
per host (one server, ``n_clients`` clients). Each host is joined to the bridge by a veth
pair that is created directly between the two namespaces, so nothing is ever created in,
or moved through, the caller's (root) namespace and the host's own interfaces are never
touched::

      ns <tag>-s           ns <tag>-br              ns <tag>-c0 ... <tag>-c{n-1}
    +-----------+    +----------------------+    +-----------+
    | eth0      |----| s0    br0      c0    |----| eth0      |
    | 10.77.0.1 |    | (mcast_snooping 0)   |    | 10.77.0.2 |
    +-----------+    +----------------------+    +-----------+

Every host namespace gets: ``lo`` up, ``eth0`` up with ``<subnet>.<i>/24 brd +`` (the
broadcast address matters to tools such as udpcast that rendezvous by broadcast), an
explicit ``224.0.0.0/4`` route via ``eth0`` (a namespace has no default route, so without
it a multicast ``sendto`` fails with ENETUNREACH unless the socket sets
``IP_MULTICAST_IF``), ``rp_filter`` off, and optionally ``fd00:<n>::<i>/64 nodad``.

The bridge runs with ``mcast_snooping 0`` so multicast is flooded to every port whether or
not IGMP/MLD reports were seen; that models a dumb switch and avoids IGMP querier timing.

Bandwidth: ``server_rate_mbit`` installs ``tbf`` as the root qdisc of the server's
``eth0`` (inside the server namespace, so it shapes the server's egress: one multicast
stream is replicated *after* the bottleneck by the bridge, N unicast streams share it).
``gso_max_segs 1`` is set on that device because otherwise TCP hands 64 KiB GSO
super-packets to the qdisc, which tbf accounts as one packet larger than its bucket.

Loss: the kernel may lack ``sch_netem``, so :meth:`Topology.set_loss` installs an nftables
table in the host's namespace whose input hook drops a random percentage of packets
(``numgen random mod 100 < N``), by default only UDP to multicast destinations
(``224.0.0.0/4`` and ``ff00::/8``), so unicast control channels stay reliable.

Namespace names are ``<prefix><pid>-<seq>-<role>`` (``seq`` counts topologies within the
process, so several may coexist; ``role`` is ``br``, ``s`` or ``c<i>``); the embedded pid lets
:func:`cleanup_stale` remove namespaces left behind by a crashed process without touching
those of a live one. Teardown (the context manager's exit, also on exceptions) terminates
the processes started with :meth:`Topology.run`, kills whatever else still runs inside the
namespaces, and deletes every namespace it created. Deleting the switch namespace destroys
its veth ends and with them their peers.

Everything here shells out to ``ip``, ``tc`` and ``nft``; it needs root (CAP_NET_ADMIN and
CAP_SYS_ADMIN). :func:`netns_available` tells a test suite whether to skip, and why.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

__all__ = [
    "Host",
    "NetnsError",
    "Topology",
    "cleanup_stale",
    "netns_available",
]

_IFNAME_MAX = 15
_CMD_TIMEOUT_S = 30.0
_LOSS_TABLE = "bcbloss"
_SEQ = itertools.count()


class NetnsError(RuntimeError):
    """A command that builds or changes the topology failed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Host:
    """One emulated machine: a network namespace with a single interface on the bridge."""

    name: str
    """Network namespace name (usable with ``ip netns exec``)."""
    addr: str
    """IPv4 address of :attr:`veth` (without prefix length)."""
    addr6: str | None
    """IPv6 ULA address of :attr:`veth`, or ``None`` when IPv6 is disabled."""
    veth: str
    """Interface name inside the namespace (always ``eth0``)."""
    bridge_port: str
    """Name of the peer veth inside the switch namespace."""
    index: int
    """0 for the server, 1..n for the clients."""


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=_CMD_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(argv)}: {exc}") from exc
    if check and proc.returncode != 0:
        raise NetnsError(
            f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout}"
        )
    return proc


def netns_available() -> tuple[bool, str]:
    """Say whether :class:`Topology` can work here, with a reason suitable for a skip.

    Checks: running as root, ``ip``/``tc``/``nft`` on ``PATH``, and that a namespace can
    actually be created, configured with a bridge, and deleted.
    """
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    for tool in ("ip", "tc", "nft"):
        if shutil.which(tool) is None:
            return False, f"{tool!r} not found on PATH"
    probe = f"bcbprobe{os.getpid()}"
    try:
        _run(["ip", "netns", "add", probe])
    except NetnsError as exc:
        return False, f"cannot create a network namespace: {exc}"
    try:
        _run(["ip", "-n", probe, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"])
        _run(["ip", "netns", "exec", probe, "nft", "list", "tables"])
    except NetnsError as exc:
        return False, f"namespace probe failed: {exc}"
    finally:
        _run(["ip", "netns", "delete", probe], check=False)
    return True, "ok"


def _list_netns() -> list[str]:
    proc = _run(["ip", "netns", "list"], check=False)
    # Lines look like "name" or "name (id: 3)".
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ns_pids(ns: str) -> list[int]:
    proc = _run(["ip", "netns", "pids", ns], check=False)
    return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]


def _kill_ns_processes(ns: str) -> None:
    """SIGKILL every process still running inside ``ns`` (all of them were started there
    by a Topology, which is the only thing that uses these namespaces)."""
    for _ in range(3):
        pids = _ns_pids(ns)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def cleanup_stale(prefix: str, *, force: bool = False) -> list[str]:
    """Delete namespaces named ``<prefix><pid>-…`` whose creating process is gone.

    With ``force=True`` namespaces of live processes are deleted as well (only do this when
    you know no other run with the same prefix is in progress). Processes still running
    inside a deleted namespace are killed. Returns the names deleted.
    """
    deleted: list[str] = []
    for ns in _list_netns():
        if not ns.startswith(prefix):
            continue
        pid_part, sep, _role = ns[len(prefix) :].partition("-")
        if not sep or not pid_part.isdigit():
            continue
        if not force and _pid_alive(int(pid_part)):
            continue
        _kill_ns_processes(ns)
        if _run(["ip", "netns", "delete", ns], check=False).returncode == 0:
            deleted.append(ns)
    return deleted


@dataclass(slots=True)
class _Proc:
    popen: subprocess.Popen[Any]
    host: Host


@dataclass(slots=True)
class Topology:
    """A bridge and ``n_clients + 1`` hosts, each in its own network namespace.

    Use as a context manager; the namespaces exist between ``__enter__`` and ``__exit__``::

        with Topology(n_clients=4, server_rate_mbit=100, prefix="bcb") as topo:
            topo.set_loss(topo.clients[0], 5)
            p = topo.run(topo.server, ["udp-sender", "--file", "f", "--nokbd"])
    """

    n_clients: int
    server_rate_mbit: float | None = None
    prefix: str = "bcb"
    subnet: str = "10.77.0"
    """First three octets of the /24; the server is ``.1``, clients ``.2`` onwards."""
    ipv6: bool = True
    tbf_burst: str = "32kbit"
    tbf_latency: str = "50ms"

    server: Host = field(init=False)
    clients: list[Host] = field(init=False, default_factory=list)
    _tag: str = field(init=False, default="")
    _created: list[str] = field(init=False, default_factory=list)
    _procs: list[_Proc] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.n_clients <= 250:
            raise ValueError(f"n_clients must be in 1..250, got {self.n_clients}")
        if self.server_rate_mbit is not None and self.server_rate_mbit <= 0:
            raise ValueError("server_rate_mbit must be positive")
        parts = self.subnet.split(".")
        if len(parts) != 3 or not all(p.isdigit() and int(p) < 256 for p in parts):
            raise ValueError(f"subnet must look like '10.77.0', got {self.subnet!r}")
        if not self.prefix or "-" in self.prefix or "/" in self.prefix:
            raise ValueError("prefix must be non-empty and contain no '-' or '/'")
        self._tag = f"{self.prefix}{os.getpid()}-{next(_SEQ)}"

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def hosts(self) -> list[Host]:
        """The server followed by the clients."""
        return [self.server, *self.clients]

    @property
    def switch_ns(self) -> str:
        """Name of the namespace that holds the bridge."""
        return f"{self._tag}-br"

    def __enter__(self) -> Self:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _add_ns(self, name: str) -> None:
        if name in _list_netns():
            raise NetnsError(f"namespace {name} already exists (stale? see cleanup_stale)")
        _run(["ip", "netns", "add", name])
        self._created.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _sysctl(self, ns: str, key: str, value: str) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        # /proc/sys/net is per network namespace, so write it from inside the namespace.
        _run(["ip", "netns", "exec", ns, "sh", "-c", f"echo {value} > {path}"])

    def _build(self) -> None:
        sw = self.switch_ns
        self._add_ns(sw)
        # The switch needs no IPv6 of its own; this keeps its ports from sending RS/MLD.
        self._sysctl(sw, "net.ipv6.conf.all.disable_ipv6", "1")
        self._sysctl(sw, "net.ipv6.conf.default.disable_ipv6", "1")
        _run(["ip", "-n", sw, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"])
        _run(["ip", "-n", sw, "link", "set", "br0", "up"])

        v6net = f"fd00:{int(self.subnet.split('.')[1]):x}::"
        for index in range(self.n_clients + 1):
            role = "s" if index == 0 else f"c{index - 1}"
            ns = f"{self._tag}-{role}"
            port = "s0" if index == 0 else f"c{index - 1}"
            assert len(port) <= _IFNAME_MAX
            host = Host(
                name=ns,
                addr=f"{self.subnet}.{index + 1}",
                addr6=f"{v6net}{index + 1:x}" if self.ipv6 else None,
                veth="eth0",
                bridge_port=port,
                index=index,
            )
            self._add_host(host)
            if index == 0:
                self.server = host
            else:
                self.clients.append(host)

        if self.server_rate_mbit is not None:
            self._shape(self.server, self.server_rate_mbit)

    def _add_host(self, host: Host) -> None:
        sw = self.switch_ns
        ns = host.name
        self._add_ns(ns)
        # Create the pair between the two namespaces directly: no name is ever taken in
        # the root namespace, so concurrent topologies and host interfaces cannot clash.
        _run(
            [
                "ip", "-n", sw, "link", "add", host.bridge_port,
                "type", "veth", "peer", "name", host.veth, "netns", ns,
            ]
        )  # fmt: skip
        _run(["ip", "-n", sw, "link", "set", host.bridge_port, "master", "br0"])
        _run(["ip", "-n", sw, "link", "set", host.bridge_port, "up"])

        for key in ("net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter"):
            self._sysctl(ns, key, "0")
        if not self.ipv6:
            self._sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1")
        _run(["ip", "-n", ns, "addr", "add", f"{host.addr}/24", "brd", "+", "dev", host.veth])
        if host.addr6 is not None:
            _run(
                ["ip", "-n", ns, "-6", "addr", "add", f"{host.addr6}/64",
                 "dev", host.veth, "nodad"]
            )  # fmt: skip
        _run(["ip", "-n", ns, "link", "set", host.veth, "up"])
        _run(["ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", host.veth])

    def _shape(self, host: Host, rate_mbit: float) -> None:
        ns = host.name
        _run(["ip", "-n", ns, "link", "set", host.veth, "gso_max_segs", "1"])
        _run(
            [
                "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", host.veth, "root",
                "tbf", "rate", f"{rate_mbit:g}mbit", "burst", self.tbf_burst,
                "latency", self.tbf_latency,
            ]
        )  # fmt: skip

    def close(self) -> None:
        """Stop started processes and delete every namespace this topology created.

        Idempotent; never raises for cleanup failures (it is called from ``__exit__``).
        """
        for proc in self._procs:
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.terminate()
        deadline = time.monotonic() + 2.0
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=2.0)
        self._procs.clear()
        # Hosts first, the switch last: deleting a host takes its veth pair with it.
        for ns in reversed(self._created):
            _kill_ns_processes(ns)
            _run(["ip", "netns", "delete", ns], check=False)
        self._created.clear()

    # -- operations --------------------------------------------------------------------

    def ns_argv(self, host: Host, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside ``host``'s namespace."""
        return ["ip", "netns", "exec", host.name, *argv]

    def run(self, host: Host, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``host``'s namespace; it is terminated on teardown.

        ``popen_kwargs`` go to :class:`subprocess.Popen` unchanged (``stdout``, ``cwd``…).
        """
        popen = subprocess.Popen(self.ns_argv(host, argv), **popen_kwargs)
        self._procs.append(_Proc(popen=popen, host=host))
        return popen

    def check_output(self, host: Host, argv: Sequence[str], *, timeout_s: float = 30.0) -> str:
        """Run ``argv`` in ``host``'s namespace to completion and return its stdout."""
        proc = subprocess.run(
            self.ns_argv(host, argv),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if proc.returncode != 0:
            raise NetnsError(
                f"{' '.join(argv)} in {host.name} exited {proc.returncode}: {proc.stderr.strip()}"
            )
        return proc.stdout

    def set_loss(self, host: Host, percent: float, *, only_multicast: bool = True) -> None:
        """Drop ``percent`` % of the packets ``host`` receives (0 removes the rule).

        With ``only_multicast`` (the default) only UDP to ``224.0.0.0/4`` / ``ff00::/8`` is
        dropped; otherwise every packet arriving on the host's veth (TCP included).
        The decision is independent per packet (``numgen random``), resolution 1 %.
        """
        if not 0 <= percent <= 100:
            raise ValueError(f"percent must be in 0..100, got {percent}")
        pct = round(percent)
        nft = ["ip", "netns", "exec", host.name, "nft"]
        _run([*nft, "delete", "table", "inet", _LOSS_TABLE], check=False)
        if pct == 0:
            return
        drop = f"numgen random mod 100 < {pct} counter drop"
        if only_multicast:
            rules = [
                f"ip daddr 224.0.0.0/4 meta l4proto udp {drop}",
                f"ip6 daddr ff00::/8 meta l4proto udp {drop}",
            ]
        else:
            rules = [f'iifname "{host.veth}" {drop}']
        body = "\n".join(f"    {rule}" for rule in rules)
        ruleset = (
            f"table inet {_LOSS_TABLE} {{\n"
            f"  chain input {{\n"
            f"    type filter hook input priority 0; policy accept;\n"
            f"{body}\n"
            f"  }}\n"
            f"}}\n"
        )
        try:
            proc = subprocess.run(
                [*nft, "-f", "-"],
                input=ruleset,
                capture_output=True,
                text=True,
                timeout=_CMD_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NetnsError(f"nft in {host.name}: {exc}") from exc
        if proc.returncode != 0:
            raise NetnsError(f"nft in {host.name}: {proc.stderr.strip()}")

    def loss_counters(self, host: Host) -> int:
        """Packets dropped so far by :meth:`set_loss` rules in ``host`` (0 if none)."""
        proc = _run(
            ["ip", "netns", "exec", host.name, "nft", "list", "table", "inet", _LOSS_TABLE],
            check=False,
        )
        total = 0
        for line in proc.stdout.splitlines():
            tokens = line.split()
            if "packets" in tokens:
                total += int(tokens[tokens.index("packets") + 1])
        return total

    def set_all_loss(self, percent: float, *, only_multicast: bool = True) -> None:
        """:meth:`set_loss` on every client."""
        for client in self.clients:
            self.set_loss(client, percent, only_multicast=only_multicast)

    def processes(self) -> Iterator[subprocess.Popen[Any]]:
        """Processes started with :meth:`run` that have not been reaped by teardown."""
        return (proc.popen for proc in self._procs)
