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
import contextlib
import functools
import hashlib
import itertools
import os
import random
import socket
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import RunningServer, StartBootcast
from spec_client import (
    HEADER,
    JoinInfo,
    fetch_result,
    open_group_socket,
    parse_datagram,
    parse_join,
)

from bootcast import server as server_module
from bootcast.digests import DigestCache

SO_TIMESTAMPNS = 35  # Linux; SCM_TIMESTAMPNS has the same value
TRAILER_MAGIC = 0xBC
FLAG_REPAIR = 0x01
REJECTED = {400, 403, 404}
REPO_ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


# -- helpers -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def parse_response(data: bytes) -> RawResponse | None:
    if not data:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, *_ = status_line.split(" ", 2)
    assert version.startswith("HTTP/1."), status_line
    headers: dict[str, str] = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return RawResponse(status=int(status), headers=headers, body=body)


async def _read_all(reader: asyncio.StreamReader, timeout_s: float) -> bytes:
    with contextlib.suppress(ConnectionError):
        return await asyncio.wait_for(reader.read(), timeout_s)
    return b""


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def raw_exchange(port: int, request: bytes, *, timeout_s: float = 10.0) -> RawResponse | None:
    """Write ``request`` verbatim, read until the server closes; None if no response came."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(request)
            await writer.drain()
        data = await _read_all(reader, timeout_s)
    finally:
        await _close(writer)
    return parse_response(data)


async def staged_exchange(
    port: int, requests: list[bytes], *, timeout_s: float = 10.0
) -> list[RawResponse | None]:
    """Send all but the last byte of every request, then all the last bytes at once.

    Connection set-up and request parsing then no longer spread the requests out in time:
    they complete within one pass of the server's event loop, or close to it.
    """
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in requests]
    try:
        for (_, writer), req in zip(conns, requests, strict=True):
            writer.write(req[:-1])
        await asyncio.gather(*(writer.drain() for _, writer in conns))
        for (_, writer), req in zip(conns, requests, strict=True):
            writer.write(req[-1:])
        data = await asyncio.gather(*(_read_all(reader, timeout_s) for reader, _ in conns))
    finally:
        for _, writer in conns:
            await _close(writer)
    return [parse_response(d) for d in data]


def build_request(
    method: str, target: str | bytes, headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    target_b = target if isinstance(target, bytes) else target.encode("latin-1")
    lines = [method.encode() + b" " + target_b + b" HTTP/1.1", b"Host: 127.0.0.1"]
    lines += [f"{k}: {v}".encode("latin-1") for k, v in (headers or {}).items()]
    if body or method == "POST":
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def request(
    port: int,
    method: str,
    target: str | bytes,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> RawResponse:
    response = await raw_exchange(port, build_request(method, target, headers, body))
    assert response is not None, f"no response to {method} {target!r}"
    return response


@dataclass(frozen=True, slots=True)
class Joined:
    info: JoinInfo
    response: RawResponse

    @property
    def values(self) -> dict[str, str]:
        return dict(line.partition("=")[::2] for line in self.info.lines)

    @property
    def cast_id(self) -> int:
        return int(self.values["CAST"])


async def join(port: int, path: str, *, nack: bool = False) -> Joined:
    headers = {"X-Bootcast-Repair": "nack"} if nack else {}
    response = await request(port, "GET", "/join/" + path, headers)
    assert response.status == 200, (path, response)
    return Joined(info=parse_join(response.body.decode()), response=response)


async def leave(port: int, path: str, token: str | None) -> RawResponse:
    headers = {} if token is None else {"X-TOKEN": token}
    return await request(port, "GET", "/leave/" + path, headers)


async def nack(port: int, path: str, token: str | None, body: bytes) -> RawResponse:
    headers = {"Content-Type": "text/plain"}
    if token is not None:
        headers["X-TOKEN"] = token
    return await request(port, "POST", "/nack/" + path, headers, body)


async def eventually(
    predicate: Callable[[], bool], *, timeout_s: float, what: str, interval_s: float = 0.01
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        await asyncio.sleep(interval_s)


async def in_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run a blocking call in a thread of its own.

    Not ``asyncio.to_thread``: the server under test starts each cast with
    ``asyncio.to_thread(FileSource.open, ...)``, and clients parked in the (small: CPUs + 4)
    default executor would starve it, so joins hang waiting for a cast that cannot start.
    """
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-client")
    try:
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(executor, call)
    finally:
        executor.shutdown(wait=False)


def content(size: int, seed: int = 0) -> bytes:
    return random.Random(f"{seed}:{size}").randbytes(size)


def write_file(root: Path, path: str, data: bytes) -> None:
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def cast_id_of(datagram: bytes) -> int:
    return int(HEADER.unpack_from(datagram)[2])


def is_repair(datagram: bytes) -> bool:
    page = parse_datagram(datagram)
    assert page is not None
    trailer = datagram[16 + page.size : 16 + page.size + 4]
    return (
        len(trailer) == 4
        and trailer[0] == TRAILER_MAGIC
        and trailer[1] == 1
        and bool(trailer[2] & FLAG_REPAIR)
    )


class GroupListener:
    """Collects (kernel receive time, datagram) from one group in a worker thread."""

    def __init__(self, group: str, port: int) -> None:
        self.sock = open_group_socket(group, port, "127.0.0.1", rcvbuf=8 * 1024 * 1024)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            self.kernel_time = True
        except OSError:
            self.kernel_time = False
        self.sock.settimeout(0.02)
        self.received: list[tuple[float, bytes]] = []
        self.kernel_stamped = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(16))
            except TimeoutError:
                continue
            stamp = time.time()
            for level, kind, value in ancdata:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                    sec, nsec = struct.unpack_from("@qq", value)
                    stamp = sec + nsec / 1e9
                    self.kernel_stamped += 1
            self.received.append((stamp, data))

    def datagrams(self, cast_id: int | None = None) -> list[tuple[float, bytes]]:
        return [
            (t, d)
            for t, d in list(self.received)
            if len(d) >= 16 and (cast_id is None or cast_id_of(d) == cast_id)
        ]


@contextlib.asynccontextmanager
async def listening(group: str, port: int) -> AsyncIterator[GroupListener]:
    listener = GroupListener(group, port)
    task = asyncio.create_task(in_thread(listener.run))
    try:
        yield listener
    finally:
        listener.stop.set()
        await task
        listener.sock.close()


def cast_of(served: RunningServer, path: str) -> server_module.Cast:
    return served.server.casts[(served.root / path).resolve()]


def cast_of_or_none(served: RunningServer, path: str) -> server_module.Cast | None:
    return served.server.casts.get((served.root / path).resolve())


# -- the spec-only client gets exact copies ------------------------------------------------

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

    result = await in_thread(fetch_result, served.url(path), timeout_s=10.0)

    assert result.data == data
    assert result.join.pages == -(-len(data) // page_size)
    assert result.join.page_size == page_size
    # The client was still joined when it left: the leave must be accepted and end the cast.
    assert (result.leave_status, result.leave_body) == (200, b"")
    await eventually(lambda: not served.server.casts, timeout_s=5, what="cast stopped")
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
        *(in_thread(fetch_result, served.url(p), timeout_s=15.0) for p in paths)
    )
    for path, result in zip(paths, results, strict=True):
        assert result.data == files[path], path
    assert served.metric("bootcast_joins_total") == len(paths)
    await eventually(lambda: not served.server.casts, timeout_s=5, what="casts stopped")


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
            timeout_s=5,
            what=f"all {pages} pages reach a client that bound 200 ms after joining",
        )
    response = await leave(served.port, "small.bin", joined.info.token)
    assert response.status == 200


@pytest.mark.parametrize("size", [0, 20_001])
async def test_spec_client_command_line(
    start_bootcast: StartBootcast, tmp_path: Path, size: int
) -> None:
    """``python -m tests.spec_client URL --interface ADDR -O FILE``, as the netns tests run it."""
    served = await start_bootcast()
    data = content(size)
    write_file(served.root, "cli/file.bin", data)
    out = tmp_path / "out.bin"

    async def run(url: str) -> tuple[int, bytes]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.spec_client",
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
    await eventually(lambda: not served.server.casts, timeout_s=5, what="cast stopped")

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
    await eventually(lambda: cast_of_or_none(served, "f") is None, timeout_s=5, what="stopped")


async def test_no_datagram_after_the_last_leave(start_bootcast: StartBootcast) -> None:
    # Slow enough that the carousel is still busy when the clients leave.
    served = await start_bootcast(idle_loops=1000, rate_mbit=20.0)
    write_file(served.root, "big", content(200 * 1400))
    first = await join(served.port, "big")
    second = await join(served.port, "big")
    cast_id = first.cast_id
    async with listening(first.info.group, first.info.port) as listener:
        await eventually(
            lambda: len(listener.datagrams(cast_id)) >= 20, timeout_s=5, what="pages flowing"
        )
        response = await leave(served.port, "big", first.info.token)
        assert (response.status, response.body) == (200, b"")
        first_left = time.time()
        # Positive control: with a client still joined, pages keep coming after a leave.
        await eventually(
            lambda: any(t > first_left + 0.05 for t, _ in listener.datagrams(cast_id)),
            timeout_s=5,
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
    await eventually(lambda: not served.server.casts, timeout_s=15, what="idle cast stopped")
    assert served.metric("bootcast_casts_stopped_total", reason="idle") == 1
    assert served.metric("bootcast_casts_active") == 0
    assert served.metric("bootcast_clients_active") == 0


# -- one read per cast ------------------------------------------------------------------------


async def test_file_is_read_once_per_cast(
    start_bootcast: StartBootcast, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[Path] = []
    original = server_module.FileSource.open

    def counting_open(
        path: Path, fd: int, page_size: int, cache: DigestCache
    ) -> server_module.FileSource:
        opened.append(path)
        return original(path, fd, page_size, cache)

    monkeypatch.setattr(server_module.FileSource, "open", counting_open)
    served = await start_bootcast(idle_loops=1000, rate_mbit=100.0)
    data = content(40_000)
    write_file(served.root, "f", data)

    holder = await join(served.port, "f", nack=True)
    results = await asyncio.gather(
        *(in_thread(fetch_result, served.url("f"), timeout_s=10.0) for _ in range(3))
    )
    assert all(r.data == data for r in results)
    assert {r.join.lines[0] for r in results} == {"CONNECT=" + holder.values["CONNECT"]}
    assert len(opened) == 1, opened
    assert served.metric("bootcast_casts_started_total") == 1

    # After the cast ends, a new join is a new cast and reads the file again.
    assert (await leave(served.port, "f", holder.info.token)).status == 200
    await eventually(lambda: not served.server.casts, timeout_s=5, what="cast stopped")
    await join(served.port, "f", nack=True)
    assert len(opened) == 2


# -- paths are confined to the root -----------------------------------------------------------

MARKER = b"OUTSIDE-THE-ROOT-" + os.urandom(8).hex().encode()

TRAVERSALS = [
    "/join/..",
    "/join/../outside/secret.txt",
    "/join/a/../../outside/secret.txt",
    "/join/a/b/../../../outside/secret.txt",
    "/join/%2e%2e/outside/secret.txt",
    "/join/%2E%2E%2Foutside%2Fsecret.txt",
    "/join/..%2Foutside%2Fsecret.txt",
    "/join/a%2F..%2F..%2Foutside%2Fsecret.txt",
    "/join/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/join//etc/passwd",
    "/join/%2Fetc%2Fpasswd",
    "/join//{outside}/secret.txt",
    "/join/%2F{outside_q}%2Fsecret.txt",
    "/join/link_out",
    "/join/dir_out/secret.txt",
    "/join/a/link_up/outside/secret.txt",
    "/join/ok.txt%00",
    "/join/ok.txt%00.png",
    "/join/%00",
    "/join/..\\outside\\secret.txt",
    "/join/a\\b\\c\\file",
    "/join/%5C..%5Coutside%5Csecret.txt",
    "/join/%252e%252e/outside/secret.txt",
    "/join/%c0%ae%c0%ae/outside/secret.txt",
    "/join/",
    "/join/a/b/c",
    "/join/a/b/c/",
    "/join/nonexistent",
]


@pytest.fixture
def confined_root(tmp_path: Path) -> Path:
    """A served root with files, and symlinks that lead inside and outside it."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir(exist_ok=True)
    outside.mkdir()
    (outside / "secret.txt").write_bytes(MARKER)
    write_file(root, "ok.txt", b"inside")
    write_file(root, "a/b/c/file", b"nested")
    (root / "link_out").symlink_to(outside / "secret.txt")
    (root / "dir_out").symlink_to(outside, target_is_directory=True)
    (root / "a" / "link_up").symlink_to(tmp_path, target_is_directory=True)
    (root / "link_in").symlink_to(root / "a" / "b" / "c" / "file")
    return root


def _target(template: str, root: Path) -> bytes:
    outside = str(root.parent / "outside").lstrip("/")
    return template.format(outside=outside, outside_q=outside.replace("/", "%2F")).encode()


@pytest.mark.parametrize("template", TRAVERSALS)
async def test_join_outside_the_root_is_refused(
    start_bootcast: StartBootcast, confined_root: Path, template: str
) -> None:
    served = await start_bootcast(root=confined_root)
    response = await request(served.port, "GET", _target(template, confined_root))
    assert response.status in REJECTED, response
    assert b"CONNECT=" not in response.body
    assert MARKER not in response.body
    assert not served.server.casts
    assert served.metric("bootcast_casts_started_total") == 0
    assert served.metric("bootcast_joins_total") == 0


@pytest.mark.parametrize(
    ("target", "expected"),
    [("/join/ok.txt", b"inside"), ("/join/a/b/c/file", b"nested"), ("/join/link_in", b"nested")],
)
async def test_raw_join_inside_the_root_works(
    start_bootcast: StartBootcast, confined_root: Path, target: str, expected: bytes
) -> None:
    """The positive control for the traversal cases: the same raw request path works."""
    served = await start_bootcast(root=confined_root)
    response = await request(served.port, "GET", target)
    assert response.status == 200
    values = dict(line.partition("=")[::2] for line in response.body.decode().splitlines())
    assert values["SHA256"] == hashlib.sha256(expected).hexdigest()
    assert served.metric("bootcast_casts_started_total") == 1


async def test_leave_and_nack_outside_the_root_find_no_cast(
    start_bootcast: StartBootcast, confined_root: Path
) -> None:
    served = await start_bootcast(root=confined_root)
    joined = await join(served.port, "ok.txt", nack=True)
    for target in ["/leave/../root/ok.txt", "/leave/%2e%2e/root/ok.txt", "/leave/link_out"]:
        response = await request(served.port, "GET", target, {"X-TOKEN": joined.info.token})
        assert response.status in REJECTED, target
    assert cast_of(served, "ok.txt").core.clients == 1  # type: ignore[union-attr]


# -- garbage on the HTTP port -----------------------------------------------------------------


def _garbage(name: str, token: str) -> bytes:
    rng = random.Random(name)
    if name == "random-bytes":
        return rng.randbytes(4096)
    if name == "random-bytes-after-get":
        return b"GET /join/ok.txt HTTP/1.1\r\n" + rng.randbytes(2048) + b"\r\n\r\n"
    if name == "request-line-100kB":
        return b"GET /join/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    if name == "header-over-8kB":
        return build_request("GET", "/join/ok.txt", {"X-Big": "b" * 9000})
    if name == "5000-headers":
        return build_request("GET", "/join/ok.txt", {f"X-H{i}": "v" for i in range(5000)})
    if name == "nack-body-over-64kB":
        body = b"MISSING=1\n" + b"X=" + b"y" * 70_000 + b"\n"
        return build_request("POST", "/nack/ok.txt", {"X-TOKEN": token}, body)
    if name == "nack-chunked-over-64kB":
        chunk = b"X=" + b"y" * 39_997 + b"\n"
        body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(2)) + b"0\r\n\r\n"
        return (
            b"POST /nack/ok.txt HTTP/1.1\r\nHost: x\r\nX-TOKEN: "
            + token.encode()
            + b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            + body
        )
    if name == "bad-method":
        return build_request("BREW", "/join/ok.txt")
    if name == "unrouted-method":
        return build_request("DELETE", "/join/ok.txt")
    if name == "bad-version":
        return b"GET /join/ok.txt HTTP/9.9\r\nHost: x\r\nConnection: close\r\n\r\n"
    if name == "negative-content-length":
        return b"POST /nack/ok.txt HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"
    if name == "nul-in-request-line":
        return b"GET /join/ok.txt\x00 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    raise AssertionError(name)


GARBAGE = [
    "random-bytes",
    "random-bytes-after-get",
    "request-line-100kB",
    "header-over-8kB",
    "5000-headers",
    "nack-body-over-64kB",
    "nack-chunked-over-64kB",
    "bad-method",
    "unrouted-method",
    "bad-version",
    "negative-content-length",
    "nul-in-request-line",
]


@pytest.mark.parametrize("name", GARBAGE)
async def test_garbage_http_is_rejected_and_the_server_survives(
    start_bootcast: StartBootcast, name: str
) -> None:
    served = await start_bootcast()
    write_file(served.root, "ok.txt", content(3000))
    holder = await join(served.port, "ok.txt", nack=True)  # a token for the NACK cases
    rejected_before = served.metric_sum("bootcast_http_rejected_total")

    response = await raw_exchange(served.port, _garbage(name, holder.info.token))

    if response is not None:
        assert response.status >= 400, response
        assert b"CONNECT=" not in response.body
        await eventually(
            lambda: served.metric_sum("bootcast_http_rejected_total") > rejected_before,
            timeout_s=2,
            what="bootcast_http_rejected counted the error answer",
        )
    assert served.metric("bootcast_joins_total") == 1  # the garbage joined nobody
    assert served.metric("bootcast_nacks_received_total") == 0
    # Still serving: a normal join of another file works.
    write_file(served.root, "after.txt", content(10))
    after = await join(served.port, "after.txt")
    assert after.info.pages == 1


# -- NACK -------------------------------------------------------------------------------------

MALFORMED_NACKS = [
    b"MISSING=0",
    b"MISSING=11",  # beyond PAGES (10)
    b"MISSING=5-11",
    b"MISSING=1-999999999999999999999",
    b"MISSING=5-3",  # descending range
    b"MISSING=6,2",  # descending list
    b"MISSING=2-4,4-6",  # overlapping
    b"MISSING=-1",
    b"MISSING=1-",
    b"MISSING=+1",
    b"MISSING=1,,2",
    b"MISSING=a-b",
    b"MISSING=0x3",
    b"MISSING=1 2",
    "MISSING=\u0663".encode(),  # ARABIC-INDIC DIGIT THREE
    "MISSING=\u00b2".encode(),  # SUPERSCRIPT TWO
    b"MISSING=1\xff",
    b"\xfe\xff\x00M\x00I",
    b"RECEIVED=-5",
    b"LOST=lots",
    b"MISSING 3",
    b"MISSING=" + b",".join(b"%d" % i for i in range(1, 5000, 2)),  # > 2048 ranges
]


async def _paused_nack_cast(
    start_bootcast: StartBootcast, pages: int, clients: int = 1, **options: Any
) -> tuple[RunningServer, list[Joined]]:
    """A cast whose clients are all NACK-capable, after its first pass: it is paused."""
    served = await start_bootcast(page_size=1400, idle_loops=60, **options)
    write_file(served.root, "f", content(pages * 1400 - 100))
    joined = [await join(served.port, "f", nack=True) for _ in range(clients)]
    core = cast_of(served, "f").core
    assert core is not None
    await eventually(lambda: core.paused, timeout_s=10, what="the first pass done")
    # At least one pass; clients that joined during it extend it to a full pass from where
    # each came in.
    assert served.metric("bootcast_pages_sent_total") >= pages
    # Past the suppression window of the first pass, a NACK leads to a resend.
    await asyncio.sleep(core.suppress_s + 0.05)
    return served, joined


@pytest.mark.parametrize("body", MALFORMED_NACKS)
async def test_malformed_nack_is_400(start_bootcast: StartBootcast, body: bytes) -> None:
    served = await start_bootcast(idle_loops=60)
    write_file(served.root, "f", content(10 * 1400 - 1))
    joined = await join(served.port, "f", nack=True)
    response = await nack(served.port, "f", joined.info.token, body)
    assert response.status == 400, (body[:60], response)
    assert served.metric("bootcast_nacks_received_total") == 0
    assert cast_of(served, "f").core.repair_backlog == 0  # type: ignore[union-attr]


async def test_nack_needs_a_token_of_that_cast(start_bootcast: StartBootcast) -> None:
    served = await start_bootcast(idle_loops=60)
    write_file(served.root, "f", content(5 * 1400))
    write_file(served.root, "g", content(5 * 1400, 1))
    joined = await join(served.port, "f", nack=True)
    other = await join(served.port, "g", nack=True)
    body = b"MISSING=2\n"
    assert (await nack(served.port, "f", None, body)).status == 400
    assert (await nack(served.port, "f", "", body)).status == 400
    assert (await nack(served.port, "f", "no-such-token", body)).status == 404
    assert (await nack(served.port, "f", other.info.token, body)).status == 404
    assert (await nack(served.port, "nothere", joined.info.token, body)).status == 404
    assert served.metric("bootcast_nacks_received_total") == 0
    # GET on the NACK endpoint is not a NACK either.
    assert (
        await request(served.port, "GET", "/nack/f", {"X-TOKEN": joined.info.token})
    ).status == 405


async def test_nack_resends_the_page_marked_as_repair(start_bootcast: StartBootcast) -> None:
    served, (client,) = await _paused_nack_cast(start_bootcast, pages=10, repeat_repairs=False)
    cast_id = client.cast_id
    async with listening(client.info.group, client.info.port) as listener:
        response = await nack(served.port, "f", client.info.token, b"MISSING=7\nRECEIVED=9\n")
        assert (response.status, response.body) == (204, b"")
        await eventually(
            lambda: any(
                parse_datagram(d).index == 7  # type: ignore[union-attr]
                for _, d in listener.datagrams(cast_id)
            ),
            timeout_s=3,
            what="page 7 resent",
        )
        await asyncio.sleep(0.2)  # anything else that would follow
    got = listener.datagrams(cast_id)
    assert len(got) == 1, [parse_datagram(d) for _, d in got]
    datagram = got[0][1]
    page = parse_datagram(datagram)
    assert page is not None and page.index == 7
    assert is_repair(datagram)
    assert page.payload == content(10 * 1400 - 100)[6 * 1400 : 7 * 1400]
    assert served.metric("bootcast_pages_resent_total") == 1
    assert served.metric("bootcast_nack_pages_total", outcome="queued") == 1


async def test_fifty_nacks_for_one_page_cause_one_resend(start_bootcast: StartBootcast) -> None:
    served, clients = await _paused_nack_cast(
        start_bootcast, pages=20, clients=50, rate_mbit=5.0, repeat_repairs=False
    )
    cast_id = clients[0].cast_id
    assert len({c.info.token for c in clients}) == 50
    async with listening(clients[0].info.group, clients[0].info.port) as listener:
        requests = [
            build_request(
                "POST",
                "/nack/f",
                {"X-TOKEN": c.info.token, "Content-Type": "text/plain"},
                b"MISSING=5\n",
            )
            for c in clients
        ]
        responses = await staged_exchange(served.port, requests)
        assert [r.status if r else None for r in responses] == [204] * 50
        await eventually(
            lambda: served.metric("bootcast_pages_resent_total") >= 1,
            timeout_s=3,
            what="page 5 resent",
        )
        await asyncio.sleep(0.3)  # a second resend would come within this
    resent = [d for _, d in listener.datagrams(cast_id) if is_repair(d)]
    assert [parse_datagram(d).index for d in resent] == [5]  # type: ignore[union-attr]
    assert len(listener.datagrams(cast_id)) == 1
    assert served.metric("bootcast_pages_resent_total") == 1
    assert served.metric("bootcast_nacks_received_total") == 50
    queued = served.metric("bootcast_nack_pages_total", outcome="queued")
    others = served.metric("bootcast_nack_pages_total", outcome="aggregated") + served.metric(
        "bootcast_nack_pages_total", outcome="suppressed"
    )
    assert (queued, others) == (1, 49)


async def test_idle_link_repeats_recent_repairs_briefly(start_bootcast: StartBootcast) -> None:
    """While clients are still asking, the idle link repeats a recent repair once, a
    suppression window after it went out."""
    served, (client,) = await _paused_nack_cast(start_bootcast, pages=10)
    cast = cast_of(served, "f")
    assert cast.core is not None
    async with listening(client.info.group, client.info.port) as listener:
        response = await nack(served.port, "f", client.info.token, b"MISSING=7\n")
        assert response.status == 204
        await asyncio.sleep(cast.core.speculate_s + 0.4)
    got = [(t, parse_datagram(d)) for t, d in listener.datagrams(client.cast_id)]
    assert [p.index for _, p in got if p is not None] == [7] * len(got)
    assert len(got) == 2
    times = [t for t, _ in got]
    assert all(b - a >= cast.core.suppress_s * 0.9 for a, b in itertools.pairwise(times))
    assert served.metric("bootcast_pages_resent_total") == 1
    assert served.metric("bootcast_pages_repeated_total") == len(got) - 1
