"""Regressions from review: what must keep working when files change and clients are late."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bootcast import page
from bootcast.joinreply import JoinReply
from bootcast.receiver import ReceiverCore
from bootcast.server import BootcastServer, ServeConfig, start_server

from support.net import group_slot
from support.waiting import eventually

PAGE = 100


def test_a_receiver_that_got_nothing_asks_for_everything_after_idle() -> None:
    core = ReceiverCore(pages=5, page_size=PAGE, size=450, cast_id=1, now=0.0, idle_s=0.3)
    report = core.poll(0.6)  # a cast may still be waiting for its wave of joins
    assert report is not None and report.missing == []
    report = core.poll(1.1)
    assert report is not None and report.missing == [(1, 5)]


def test_a_late_joiner_notices_the_wrap_and_asks_for_what_it_lost_after_it() -> None:
    data = bytes(range(100)) * 10
    dgrams = [page.encode(i + 1, 1, data[i * PAGE : (i + 1) * PAGE]) for i in range(10)]
    core = ReceiverCore(
        pages=10, page_size=PAGE, size=1000, cast_id=1, now=0.0, idle_s=9, carousel_quiet_s=9
    )
    for i in [5, 6, 7, 8, 9, 10, 1, 2, 4]:  # joined at 5; page 3 lost after the wrap
        core.datagram(dgrams[i - 1], 0.0)
    report = core.poll(1.0)
    assert report is not None and report.missing == [(3, 3)]


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[BootcastServer, int, Path]]:
    root = tmp_path / "srv"
    root.mkdir()
    group, port_base = group_slot()
    config = ServeConfig(
        root=root,
        host="127.0.0.1",
        port=0,
        group=group,
        port_base=port_base,
        rate_mbit=2.0,
        idle_loops=1000,
        prehash_bytes=0,
    )
    server, runner, port = await start_server(config)
    try:
        yield server, port, root
    finally:
        await runner.cleanup()


async def _join(session: aiohttp.ClientSession, url: str) -> JoinReply:
    async with session.get(url, headers={"X-Bootcast-Repair": "nack"}) as resp:
        assert resp.status == 200
        return JoinReply.parse(await resp.text())


async def test_nack_path_is_quoted_for_awkward_names(
    served: tuple[BootcastServer, int, Path],
) -> None:
    _server, port, root = served
    (root / "a b?#ü.img").write_bytes(os.urandom(5000))
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        reply = await _join(session, f"{base}/join/a%20b%3F%23%C3%BC.img")
        assert reply.nack_path == "/nack/a%20b%3F%23%C3%BC.img"
        async with session.post(
            base + reply.nack_path, data=b"MISSING=1\n", headers={"X-TOKEN": reply.token}
        ) as resp:
            assert resp.status == 204


async def test_leave_and_nack_work_after_the_file_was_replaced(
    served: tuple[BootcastServer, int, Path],
) -> None:
    server, port, root = served
    (root / "img").write_bytes(os.urandom(50_000))
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        reply = await _join(session, f"{base}/join/img")
        os.replace(root / "img", root / "img.old")  # the usual atomic image update
        async with session.post(
            f"{base}/nack/img", data=b"MISSING=2\n", headers={"X-TOKEN": reply.token}
        ) as resp:
            assert resp.status == 204
        async with session.get(f"{base}/leave/img", headers={"X-TOKEN": reply.token}) as resp:
            assert resp.status == 200 and await resp.read() == b""
    await eventually(lambda: not server.casts, "the cast stopped")
    assert server.stats()["bootcast_clients_active"] == 0


async def test_a_file_truncated_mid_cast_stops_its_cast_not_the_server(
    served: tuple[BootcastServer, int, Path],
) -> None:
    server, port, root = served
    (root / "big").write_bytes(os.urandom(2_000_000))
    (root / "other").write_bytes(b"still served")
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        await _join(session, f"{base}/join/big")
        await eventually(
            lambda: server.stats()["bootcast_pages_sent_total"] > 0, "the cast sending"
        )
        os.truncate(root / "big", 1000)
        await eventually(
            lambda: all(c.path != "big" for c in server.casts.values()), "the cast stopped"
        )
        reply = await _join(session, f"{base}/join/other")  # the server is alive
        assert reply.size == len(b"still served")
