"""Helpers for the server integration tests: raw HTTP exchanges (so paths reach the
server exactly as written), joins and leaves, and a kernel-time-stamped listener on a
cast's group."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bootcast import sender as sender_module

from conftest import RunningServer
from support.spec_client import (
    HEADER,
    JoinInfo,
    open_group_socket,
    parse_datagram,
    parse_join,
)

SO_TIMESTAMPNS = 35  # Linux; SCM_TIMESTAMPNS has the same value
TRAILER_MAGIC = 0xBC
FLAG_REPAIR = 0x01
REJECTED = {400, 403, 404}
REPO_ROOT = Path(__file__).resolve().parents[2]
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


def cast_of(served: RunningServer, path: str) -> sender_module.Cast:
    return served.server.casts[(served.root / path).resolve()]


def cast_of_or_none(served: RunningServer, path: str) -> sender_module.Cast | None:
    return served.server.casts.get((served.root / path).resolve())


# -- the spec-only client gets exact copies ------------------------------------------------
