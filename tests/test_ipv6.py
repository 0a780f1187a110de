"""IPv6 groups on loopback (needs the local ff00::/8 route on lo, which root can add)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootcast.server import ServeConfig, start_server

ROUTE = ["local", "ff00::/8", "dev", "lo", "table", "local"]


def _route_present() -> bool:
    out = subprocess.run(
        ["ip", "-6", "route", "show", "table", "local"], capture_output=True, text=True, check=False
    ).stdout
    return any(line.startswith("local ff00::/8 dev lo") for line in out.splitlines())


@pytest.fixture
def v6_loopback_multicast() -> Iterator[None]:
    if not os.path.exists("/proc/net/if_inet6"):
        pytest.skip("IPv6 is disabled on this machine")
    if _route_present():
        yield
        return
    if os.geteuid() != 0:
        pytest.skip(
            "IPv6 multicast on lo needs `ip -6 route add local ff00::/8 dev lo "
            "table local`, which needs root"
        )
    subprocess.run(["ip", "-6", "route", "add", *ROUTE], check=True)
    try:
        yield
    finally:
        subprocess.run(["ip", "-6", "route", "del", *ROUTE], check=False)


@pytest.mark.usefixtures("v6_loopback_multicast")
async def test_fetch_over_an_ipv6_group(tmp_path: Path) -> None:
    root = tmp_path / "srv"
    root.mkdir()
    data = os.urandom(1_000_003)
    (root / "f").write_bytes(data)
    config = ServeConfig(
        root=root, host="::1", port=0, group="ff15::b00c:7", port_base=41000, page_size=1400
    )
    server, runner, port = await start_server(config)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bootcast",
            "fetch",
            f"http://[::1]:{port}/join/f",
            "-O",
            "g",
            "-q",
            "--timeout",
            "10",
            cwd=tmp_path,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err
        assert (
            hashlib.sha256((tmp_path / "g").read_bytes()).digest() == hashlib.sha256(data).digest()
        )
        assert server.stats()["bootcast_pages_sent_total"] >= 715
    finally:
        await runner.cleanup()
