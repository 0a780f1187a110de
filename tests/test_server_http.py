"""``bootcast serve`` over real loopback sockets: the control plane (DESIGN §2.1) and what
it promises about the data plane, checked with a client written from the spec alone
(``spec_client.py``) and with raw sockets where HTTP client libraries would normalise the
request.

Servers run in-process (``start_bootcast`` in ``conftest.py``): host 127.0.0.1, port 0, a
random multicast base group and port base per test. Datagrams are observed with a raw
socket joined on 127.0.0.1, time-stamped by the kernel (``SO_TIMESTAMPNS``) so "nothing was
sent after X" does not depend on how fast a test thread drains its socket.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bootcast import source as source_module
from bootcast.digests import DigestCache

from conftest import StartBootcast
from support.bootcast_http import (
    REPO_ROOT,
    cast_of,
    cast_of_or_none,
    content,
    in_thread,
    join,
    leave,
    listening,
    write_file,
)
from support.spec_client import (
    fetch_result,
    parse_datagram,
)
from support.waiting import PATIENCE_S, eventually

SIZES = [
    pytest.param("one", lambda ps: 1, id="1B"),
    pytest.param("f1399", lambda ps: 1399, id="1399B"),
    pytest.param("f1401", lambda ps: 1401, id="1401B"),
    pytest.param("f3pages", lambda ps: 3 * ps, id="3xPAGESIZE"),
    pytest.param("f100003", lambda ps: 100_003, id="100003B"),
    pytest.param("empty", lambda ps: 0, id="empty"),
    pytest.param("a/b/c/file", lambda ps: 1401, id="nested"),
]


@pytest.mark.parametrize("page_size", [1400, 8192])
@pytest.mark.parametrize(("path", "size_of"), SIZES)
async def test_spec_client_fetches_exact_copy(
    start_bootcast: StartBootcast, page_size: int, path: str, size_of: Callable[[int], int]
) -> None:
    served = await start_bootcast(page_size=page_size)
    data = content(size_of(page_size))
    write_file(served.root, path, data)

    result = await in_thread(fetch_result, served.url(path), timeout_s=PATIENCE_S)

    assert result.data == data
    assert result.join.pages == -(-len(data) // page_size)
    assert result.join.page_size == page_size
    # The client was still joined when it left: the leave must be accepted and end the cast.
    assert (result.leave_status, result.leave_body) == (200, b"")
    await eventually(lambda: not served.server.casts, what="cast stopped")
    assert served.metric("bootcast_casts_stopped_total", reason="last_leave") == 1
    assert served.metric("bootcast_clients_active") == 0


async def test_spec_clients_concurrently_on_one_and_two_files(
    start_bootcast: StartBootcast,
) -> None:
    served = await start_bootcast(page_size=1400)
    files = {"x/one.bin": content(150_001, 1), "y/two.bin": content(70_000, 2)}
    for path, data in files.items():
        write_file(served.root, path, data)
    paths = ["x/one.bin"] * 4 + ["y/two.bin"] * 2
    results = await asyncio.gather(
        *(in_thread(fetch_result, served.url(p), timeout_s=PATIENCE_S) for p in paths)
    )
    for path, result in zip(paths, results, strict=True):
        assert result.data == files[path], path
    assert served.metric("bootcast_joins_total") == len(paths)
    await eventually(lambda: not served.server.casts, what="casts stopped")


@pytest.mark.parametrize("pages", [1, 50])
async def test_spec_client_that_binds_after_a_round_trip_still_gets_the_file(
    start_bootcast: StartBootcast, pages: int
) -> None:
    """A spec-only client binds the group only after the join reply has reached it.

    On a real network that is a round trip or more after the server started the cast; the
    idle rule ("several full iterations without join or leave") must not end the cast
    before such a client could have received one pass (DESIGN §2.1: a spec-only client must
    get the whole file from the carousel).
    """
    served = await start_bootcast(page_size=1400)
    data = content(pages * 1400 - 7)
    write_file(served.root, "small.bin", data)
    joined = await join(served.port, "small.bin")
    await asyncio.sleep(0.2)  # the simulated round trip: this delay is the point of the test
    async with listening(joined.info.group, joined.info.port) as listener:
        await eventually(
            lambda: (
                {
                    d.index
                    for _, raw in listener.datagrams(joined.cast_id)
                    if (d := parse_datagram(raw)) is not None
                }
                >= set(range(1, pages + 1))
            ),
            what=f"all {pages} pages reach a client that bound 200 ms after joining",
        )
    response = await leave(served.port, "small.bin", joined.info.token)
    assert response.status == 200


@pytest.mark.parametrize("size", [0, 20_001])
async def test_spec_client_command_line(
    start_bootcast: StartBootcast, tmp_path: Path, size: int
) -> None:
    """``python -m tests.support.spec_client URL --interface ADDR -O FILE``, as the netns
    tests run it."""
    served = await start_bootcast()
    data = content(size)
    write_file(served.root, "cli/file.bin", data)
    out = tmp_path / "out.bin"

    async def run(url: str) -> tuple[int, bytes]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.support.spec_client",
            url,
            "--interface",
            "127.0.0.1",
            "-O",
            str(out),
            "--timeout",
            "10",
            cwd=REPO_ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return proc.returncode, stderr

    code, stderr = await run(served.url("cli/file.bin"))
    assert code == 0, stderr
    assert out.read_bytes() == data
    assert served.metric("bootcast_joins_total") == 1
    await eventually(lambda: not served.server.casts, what="cast stopped")

    code, stderr = await run(served.url("cli/missing.bin"))
    assert code == 1
    assert stderr.decode().count("\n") == 1 and "404" in stderr.decode()


def test_spec_client_ignores_reserved_words_and_trailing_bytes() -> None:
    datagram = struct.pack("!IIII", 3, 7, 0xDEADBEEF, 0xFFFFFFFF) + b"abc" + b"\xbc\x01\x01\x00"
    page = parse_datagram(datagram)
    assert page is not None
    assert (page.size, page.index, page.payload) == (3, 7, b"abc")
    assert parse_datagram(struct.pack("!IIII", 5, 1, 0, 0) + b"abcd") is None  # truncated
    assert parse_datagram(b"\x00" * 15) is None


# -- join replies -----------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1400, 8192])
async def test_join_reply_lines_order_and_page_count(
    start_bootcast: StartBootcast, page_size: int
) -> None:
    served = await start_bootcast(page_size=page_size)
    sizes = [0, 1, page_size - 1, page_size, page_size + 1, 3 * page_size, 3 * page_size + 1]
    for size in sizes:
        data = content(size)
        write_file(served.root, f"s{size}", data)
        joined = await join(served.port, f"s{size}")
        assert joined.response.headers["content-type"].startswith("text/plain")
        raw_lines = joined.response.body.decode("ascii").splitlines()
        keys = [line.partition("=")[0] for line in raw_lines]
        assert keys[:4] == ["CONNECT", "TOKEN", "PAGES", "PAGESIZE"], raw_lines
        assert all("=" in line for line in raw_lines), raw_lines
        values = joined.values
        assert int(values["PAGES"]) == -(-size // page_size)
        assert int(values["PAGESIZE"]) == page_size
        assert int(values["SIZE"]) == size
        assert values["SHA256"] == hashlib.sha256(data).hexdigest()
        assert 0 < joined.cast_id < 2**32
        group, _, port = values["CONNECT"].rpartition(":")
        assert (group, int(port)) == (joined.info.group, joined.info.port)


async def test_two_joins_share_connect_with_distinct_tokens(start_bootcast: StartBootcast) -> None:
    served = await start_bootcast()
    write_file(served.root, "f", content(20_000))
    first = await join(served.port, "f", nack=True)
    second = await join(served.port, "f")
    assert first.values["CONNECT"] == second.values["CONNECT"]
    assert first.cast_id == second.cast_id
    assert first.info.token != second.info.token
    assert len(served.server.casts) == 1
    assert cast_of(served, "f").core is not None
    assert cast_of(served, "f").core.clients == 2  # type: ignore[union-attr]


async def test_concurrent_casts_never_share_group_and_port(start_bootcast: StartBootcast) -> None:
    served = await start_bootcast()
    paths = [f"dir{i}/file{i}" for i in range(6)]
    for i, path in enumerate(paths):
        write_file(served.root, path, content(5000 + i))
    # NACK-capable clients: after one pass the casts pause, so they all stay alive together.
    joins = await asyncio.gather(*(join(served.port, p, nack=True) for p in paths))
    assert len(served.server.casts) == len(paths)
    endpoints = {(j.info.group, j.info.port) for j in joins}
    assert len(endpoints) == len(paths), endpoints
    assert len({j.cast_id for j in joins}) == len(paths)


# -- leave ------------------------------------------------------------------------------------


async def test_leave_needs_the_right_token_and_never_has_a_body(
    start_bootcast: StartBootcast,
) -> None:
    served = await start_bootcast(idle_loops=1000, rate_mbit=20.0)
    write_file(served.root, "f", content(30_000))
    write_file(served.root, "g", content(30_000, 1))
    a = await join(served.port, "f")
    b = await join(served.port, "f")
    other = await join(served.port, "g")
    core = cast_of(served, "f").core
    assert core is not None
    assert served.metric("bootcast_clients_active") == 3

    cases: list[tuple[str, str | None]] = [
        ("no X-TOKEN", None),
        ("empty X-TOKEN", ""),
        ("unknown token", "not-a-token"),
        ("token of another cast", other.info.token),
    ]
    for what, token in cases:
        response = await leave(served.port, "f", token)
        assert response.status >= 400, what
        assert response.body == b"", what
        assert core.clients == 2, what
        assert served.metric("bootcast_clients_active") == 3, what
        assert served.metric("bootcast_leaves_total") == 0, what
    response = await leave(served.port, "g", a.info.token)  # right token, wrong path
    assert response.status >= 400 and response.body == b""
    assert core.clients == 2

    response = await leave(served.port, "f", a.info.token)
    assert (response.status, response.body) == (200, b"")
    assert core.clients == 1
    assert served.metric("bootcast_clients_active") == 2
    response = await leave(served.port, "f", a.info.token)  # a second time: unknown now
    assert response.status >= 400 and response.body == b""
    assert core.clients == 1
    response = await leave(served.port, "f", b.info.token)
    assert (response.status, response.body) == (200, b"")
    await eventually(lambda: cast_of_or_none(served, "f") is None, what="stopped")


async def test_no_datagram_after_the_last_leave(start_bootcast: StartBootcast) -> None:
    # Slow enough that the carousel is still busy when the clients leave.
    served = await start_bootcast(idle_loops=1000, rate_mbit=20.0)
    write_file(served.root, "big", content(200 * 1400))
    first = await join(served.port, "big")
    second = await join(served.port, "big")
    cast_id = first.cast_id
    async with listening(first.info.group, first.info.port) as listener:
        await eventually(lambda: len(listener.datagrams(cast_id)) >= 20, what="pages flowing")
        response = await leave(served.port, "big", first.info.token)
        assert (response.status, response.body) == (200, b"")
        first_left = time.time()
        # Positive control: with a client still joined, pages keep coming after a leave.
        await eventually(
            lambda: any(t > first_left + 0.05 for t, _ in listener.datagrams(cast_id)),
            what="pages after the first (not last) leave",
        )
        response = await leave(served.port, "big", second.info.token)
        assert (response.status, response.body) == (200, b"")
        last_left = time.time()
        await asyncio.sleep(1.0)  # the observation window
    late = [t - last_left for t, _ in listener.datagrams(cast_id) if t > last_left + 0.05]
    assert late == [], f"{len(late)} datagrams after the last leave, first at +{late[0]:.3f}s"
    assert listener.datagrams(cast_id), "the listener saw nothing at all"
    assert listener.kernel_stamped == len(listener.received), "receive times not from the kernel"
    assert not served.server.casts
    assert served.metric("bootcast_casts_stopped_total", reason="last_leave") == 1
    assert served.metric("bootcast_clients_active") == 0


@pytest.mark.parametrize("nack_capable", [False, True], ids=["spec-client", "nack-client"])
async def test_cast_of_a_vanished_client_stops_when_idle(
    start_bootcast: StartBootcast, nack_capable: bool
) -> None:
    served = await start_bootcast(idle_loops=2)
    write_file(served.root, "small", content(5000))
    await join(served.port, "small", nack=nack_capable)  # and never leave
    assert len(served.server.casts) == 1
    await eventually(lambda: not served.server.casts, what="idle cast stopped")
    assert served.metric("bootcast_casts_stopped_total", reason="idle") == 1
    assert served.metric("bootcast_casts_active") == 0
    assert served.metric("bootcast_clients_active") == 0


# -- one read per cast ------------------------------------------------------------------------


async def test_file_is_read_once_per_cast(
    start_bootcast: StartBootcast, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[Path] = []
    original = source_module.FileSource.open

    def counting_open(
        path: Path, fd: int, page_size: int, cache: DigestCache
    ) -> source_module.FileSource:
        opened.append(path)
        return original(path, fd, page_size, cache)

    monkeypatch.setattr(source_module.FileSource, "open", counting_open)
    served = await start_bootcast(idle_loops=1000, rate_mbit=100.0)
    data = content(40_000)
    write_file(served.root, "f", data)

    holder = await join(served.port, "f", nack=True)
    results = await asyncio.gather(
        *(in_thread(fetch_result, served.url("f"), timeout_s=PATIENCE_S) for _ in range(3))
    )
    assert all(r.data == data for r in results)
    assert {r.join.lines[0] for r in results} == {"CONNECT=" + holder.values["CONNECT"]}
    assert len(opened) == 1, opened
    assert served.metric("bootcast_casts_started_total") == 1

    # After the cast ends, a new join is a new cast and reads the file again.
    assert (await leave(served.port, "f", holder.info.token)).status == 200
    await eventually(lambda: not served.server.casts, what="cast stopped")
    await join(served.port, "f", nack=True)
    assert len(opened) == 2


# -- paths are confined to the root -----------------------------------------------------------
