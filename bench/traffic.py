"""Bytes a server sent, counted by nftables.

:class:`TrafficCounter` puts counter rules on the output hook (by default of ``lo``) for the
packets a server sends and reads them back as a :class:`Traffic`: packets, whole-packet
bytes, and the TCP/UDP payload with the headers subtracted exactly. :mod:`bench.log_bench`
divides it by the payload bytes delivered; each runner names its server's packets
(:meth:`bench.harness.Runner.count_rules`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

IP_HEADER = 20  # IPv4 without options: all traffic here is 127.0.0.1
UDP_HEADER = 8


@dataclass(frozen=True, slots=True)
class Traffic:
    packets: int
    bytes: int
    """Whole IP packets as nft counts them (IP + TCP/UDP headers + payload). On ``lo`` a
    TCP GSO skb of up to 64 KiB counts one header."""
    payload_bytes: int | None
    """The TCP/UDP payload alone (headers subtracted exactly: TCP rules are split by data
    offset); ``None`` if a match is neither TCP nor UDP."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TrafficCounter:
    """Counts the packets matching any of ``matches`` on the output hook of ``oifname``.

    Each match (e.g. ``"tcp sport 6379"``, ``"udp dport 5000"``, ``"ip daddr 239.1.2.3 udp
    dport 5000"``) becomes counter rules in a table ``inet logbench_<pid>`` that exists
    only inside the ``with`` block; a match without its own ``oif``/``oifname`` gets
    ``oifname "<oifname>"`` (multicast sent with ``IP_MULTICAST_LOOP`` leaves by the
    interface the socket chose, not ``lo``). Matches must be disjoint (a packet matching two
    is counted twice). Needs root and ``nft``; otherwise :attr:`error` says why and
    :meth:`read` returns ``None``.
    """

    def __init__(self, matches: Sequence[str], oifname: str = "lo") -> None:
        self.table = f"logbench_{os.getpid()}"
        self.matches = list(matches)
        self.oifname = oifname
        self.error: str | None = None
        self._headers: dict[str, int | None] = {}

    def _rules(self) -> list[str]:
        rules = []
        for i, match in enumerate(self.matches):
            tokens = match.split()
            if "tcp" in tokens:
                for doff in range(5, 16):
                    tag = f"m{i}d{doff}"
                    self._headers[tag] = IP_HEADER + 4 * doff
                    rules.append(f"{match} tcp doff {doff} counter comment {tag}")
            else:
                tag = f"m{i}"
                self._headers[tag] = IP_HEADER + UDP_HEADER if "udp" in tokens else None
                rules.append(f"{match} counter comment {tag}")
        return rules

    def _nft(self, args: Sequence[str], stdin: str | None = None) -> str:
        proc = subprocess.run(
            ["nft", *args], input=stdin, capture_output=True, text=True, timeout=10, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip() or f"nft exited {proc.returncode}")
        return proc.stdout

    def __enter__(self) -> Self:
        if os.geteuid() != 0 or shutil.which("nft") is None:
            self.error = "needs root and nft"
            return self
        self._remove_stale()
        lines = []
        for rule in self._rules():
            own = {"oif", "oifname"} & set(rule.split())
            lines.append(f"    {rule}" if own else f'    oifname "{self.oifname}" {rule}')
        body = "\n".join(lines)
        ruleset = (
            f"table inet {self.table} {{\n  chain out {{\n"
            f"    type filter hook output priority 0; policy accept;\n{body}\n  }}\n}}\n"
        )
        try:
            self._nft(["delete", "table", "inet", self.table]) if self._exists() else None
            self._nft(["-f", "-"], stdin=ruleset)
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            self.error = f"nft: {exc}"
        return self

    def _remove_stale(self) -> None:
        """Delete the tables of benches that died without cleaning up (pid gone)."""
        with contextlib.suppress(OSError, RuntimeError, subprocess.TimeoutExpired):
            for line in self._nft(["list", "tables"]).splitlines():
                name = line.split()[-1]
                pid = name.removeprefix("logbench_")
                if name.startswith("logbench_") and pid.isdigit() and not _alive(int(pid)):
                    self._nft(["delete", "table", "inet", name])

    def _exists(self) -> bool:
        try:
            self._nft(["list", "table", "inet", self.table])
        except (OSError, RuntimeError, subprocess.TimeoutExpired):
            return False
        return True

    def read(self) -> Traffic | None:
        if self.error is not None:
            return None
        out = json.loads(self._nft(["-j", "list", "table", "inet", self.table]))
        packets = total = headers = 0
        exact = True
        for item in out.get("nftables", []):
            rule = item.get("rule")
            if not rule or rule.get("comment") not in self._headers:
                continue
            for expr in rule.get("expr", []):
                if "counter" in expr:
                    n, b = int(expr["counter"]["packets"]), int(expr["counter"]["bytes"])
                    packets, total = packets + n, total + b
                    size = self._headers[rule["comment"]]
                    if size is None:
                        exact = False
                    else:
                        headers += n * size
        return Traffic(packets, total, total - headers if exact else None)

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.error is None:
            with contextlib.suppress(OSError, RuntimeError, subprocess.TimeoutExpired):
                self._nft(["delete", "table", "inet", self.table])
