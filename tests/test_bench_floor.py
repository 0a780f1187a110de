"""bench.files_floor: its computed rows and its probe (bench/floor_client.py) on loopback."""

from __future__ import annotations

import asyncio
import math
import os
import sys
from pathlib import Path

import pytest

from bench.files_floor import CLIENT, FRAME_OVERHEAD, LARGEST_PAGE, wire_s

from conftest import StartBootcast


def test_wire_time_counts_every_frame_byte() -> None:
    size = 64 * 1024 * 1024
    pages = math.ceil(size / 1400)
    assert pages == 47935
    # 1400 B of payload + 16 header + 4 trailer + 8 UDP + 20 IPv4 + 14 Ethernet per frame.
    assert FRAME_OVERHEAD == 62
    assert wire_s(size, 100.0) == pytest.approx(pages * 1462 * 8 / 100e6)
    assert wire_s(size, 100.0) / (size * 8 / 100e6) == pytest.approx(1.0443, abs=1e-4)
    # The largest page an unfragmented 1500-byte frame holds: a full frame per page.
    assert LARGEST_PAGE + FRAME_OVERHEAD - 4 == 1514
    assert wire_s(size, 100.0, LARGEST_PAGE, FRAME_OVERHEAD - 4) < wire_s(size, 100.0)


async def _probe(url: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CLIENT), url, "127.0.0.1", stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_the_probe_exits_once_it_has_seen_every_page(
    start_bootcast: StartBootcast, tmp_path: Path
) -> None:
    running = await start_bootcast(interface="127.0.0.1")
    (running.root / "f.bin").write_bytes(os.urandom(1400 * 300 + 17))
    code, err = await _probe(running.url("f.bin"))
    assert (code, err) == (0, "")
    # It took the pages off the cast's group: the server sent at least all 301 of them.
    assert running.metric("bootcast_pages_sent_total") >= 301


async def test_the_probe_fails_on_a_refused_join(start_bootcast: StartBootcast) -> None:
    running = await start_bootcast(interface="127.0.0.1")
    code, err = await _probe(running.url("missing.bin"))
    assert code == 1
    assert "join refused" in err
