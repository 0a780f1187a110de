"""``bootcast fetch`` as users run it: real processes against an in-process server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from bootcast import page
from bootcast.mcast import sender_socket
from bootcast.server import BootcastServer, ServeConfig, start_server

from support.net import group_slot
from support.waiting import eventually, within

BOOTCAST = [sys.executable, "-m", "bootcast"]


class Served:
    def __init__(self, server: BootcastServer, port: int, root: Path) -> None:
        self.server, self.port, self.root = server, port, root

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/join/{path}"


@pytest.fixture
async def served(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    root = tmp_path / "srv"
    root.mkdir()
    group, port_base = group_slot()
    options = getattr(request, "param", {})
    config = ServeConfig(
        root=root,
        host="127.0.0.1",
        port=0,
        group=group,
        port_base=port_base,
        **{"page_size": 8192, "rate_mbit": 800.0, **options},
    )
    server, runner, port = await start_server(config)
    try:
        yield Served(server, port, root)
    finally:
        await runner.cleanup()


def write_random(path: Path, size: int, seed: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


async def run_fetch(*args: str, cwd: Path, limit_s: float = 120) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *BOOTCAST,
        "fetch",
        *args,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await within(proc.communicate(), f"bootcast fetch {args}", timeout_s=limit_s)
    assert proc.returncode is not None
    return proc.returncode, out, err


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if "bootcast-part" in p.name)


async def test_fetch_verifies_and_names_the_file_like_wget(served: Served, tmp_path: Path) -> None:
    digest = write_random(served.root / "boot" / "vmlinuz-6.1", 3_000_001)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = await run_fetch(served.url("boot/vmlinuz-6.1"), "--log-json", cwd=out)
    assert code == 0, err
    assert sha256_of(out / "vmlinuz-6.1") == digest
    events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith(b"{")]
    assert "fetch.verified" in events
    assert leftovers(out) == []
    assert served.server.stats()["bootcast_clients_active"] == 0  # it left


async def test_fetch_to_stdout(served: Served, tmp_path: Path) -> None:
    write_random(served.root / "a.bin", 100_000, seed=3)
    code, out, err = await run_fetch(served.url("a.bin"), "-O", "-", "-q", cwd=tmp_path)
    assert code == 0, err
    assert out == (served.root / "a.bin").read_bytes()
    assert err == b""  # --quiet


async def test_fetch_empty_and_exact_multiple(served: Served, tmp_path: Path) -> None:
    (served.root / "empty").write_bytes(b"")
    write_random(served.root / "exact", 3 * 8192)
    for name in ("empty", "exact"):
        code, _, err = await run_fetch(
            served.url(name), "-O", str(tmp_path / name), "-q", cwd=tmp_path
        )
        assert code == 0, err
        assert (tmp_path / name).read_bytes() == (served.root / name).read_bytes()


async def test_404_is_one_clear_line_and_no_file(served: Served, tmp_path: Path) -> None:
    code, _, err = await run_fetch(served.url("nope.img"), "-O", "x.img", cwd=tmp_path)
    assert code == 1
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "404" in lines[0], err
    assert not (tmp_path / "x.img").exists() and leftovers(tmp_path) == []


async def test_bad_url_is_a_usage_error(tmp_path: Path) -> None:
    code, _, err = await run_fetch("http://127.0.0.1:9/leave/x", cwd=tmp_path)
    assert code == 2 and b"join URL" in err


async def test_connection_refused_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = await run_fetch(
        f"http://127.0.0.1:{port}/join/x", "--timeout", "2", cwd=tmp_path
    )
    assert code == 1 and len(err.decode().strip().splitlines()) == 1


async def fake_join_server(reply: str) -> tuple[web.AppRunner, int, list[str]]:
    """A server that answers joins with a fixed reply (and records leaves)."""
    leaves: list[str] = []

    async def join(request: web.Request) -> web.Response:
        return web.Response(text=reply)

    async def leave(request: web.Request) -> web.Response:
        leaves.append(request.headers.get("X-TOKEN", ""))
        return web.Response()

    app = web.Application()
    app.router.add_get("/join/{p:.*}", join)
    app.router.add_get("/leave/{p:.*}", leave)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    return runner, port, leaves


async def test_no_pages_arrived_says_so_and_leaves(tmp_path: Path) -> None:
    group, port_base = group_slot()
    reply = f"CONNECT={group}:{port_base}\nTOKEN=tok\nPAGES=5\nPAGESIZE=1000\nSIZE=4500\n"
    runner, port, leaves = await fake_join_server(reply)
    try:
        code, _, err = await run_fetch(
            f"http://127.0.0.1:{port}/join/f", "--timeout", "1", "-O", "f", cwd=tmp_path
        )
    finally:
        await runner.cleanup()
    assert code == 1
    assert b"no pages arrived" in err and b"is multicast routed on the interface" in err
    assert leaves == ["tok"]
    assert not (tmp_path / "f").exists() and leftovers(tmp_path) == []


async def fetch_from_fake_cast(
    tmp_path: Path, reply: str, datagrams: list[bytes], group: str, port: int
) -> tuple[int, bytes, list[str]]:
    """Run ``bootcast fetch -O f`` against a fake join server answering ``reply`` while
    ``datagrams`` loop on (group, port); returns (exit code, stderr, leave tokens)."""
    runner, http_port, leaves = await fake_join_server(reply)
    sock = sender_socket(group, interface="127.0.0.1")
    stop = asyncio.Event()

    async def carousel() -> None:
        while not stop.is_set():
            for datagram in datagrams:
                sock.sendto(datagram, (group, port))
            await asyncio.sleep(0.02)

    task = asyncio.create_task(carousel())
    try:
        code, _, err = await run_fetch(
            f"http://127.0.0.1:{http_port}/join/f", "-O", "f", "--timeout", "10", cwd=tmp_path
        )
    finally:
        stop.set()
        await task
        sock.close()
        await runner.cleanup()
    return code, err, leaves


async def test_sha256_mismatch_is_refused(tmp_path: Path) -> None:
    group, port_base = group_slot()
    data = os.urandom(2500)
    wrong = hashlib.sha256(b"something else").hexdigest()
    reply = (
        f"CONNECT={group}:{port_base}\nTOKEN=t\nPAGES=3\nPAGESIZE=1000\nSIZE=2500\n"
        f"SHA256={wrong}\nCAST=5\n"
    )
    pages = [page.encode(i + 1, 5, data[i * 1000 : (i + 1) * 1000]) for i in range(3)]
    code, err, leaves = await fetch_from_fake_cast(tmp_path, reply, pages, group, port_base)
    assert code == 1 and b"SHA-256 mismatch" in err
    assert leaves == ["t"]
    assert not (tmp_path / "f").exists() and leftovers(tmp_path) == []


async def test_a_spec_only_server_is_fetched_exactly(tmp_path: Path) -> None:
    """A server that follows only the original spec: the four required keys (no SIZE, CAST,
    SHA256, NACK or PARITY), words 3 and 4 left 0, no trailer. The client learns the size
    from the last page, checks no CRC, sends no NACK, and still writes an exact copy."""
    group, port_base = group_slot()
    data = os.urandom(4 * 1000 + 237)
    reply = f"CONNECT={group}:{port_base}\nTOKEN=spec\nPAGES=5\nPAGESIZE=1000\n"
    pages = [
        page.encode(i + 1, 0, data[i * 1000 : (i + 1) * 1000], crc=0, trailer=False)
        for i in range(5)
    ]
    code, err, leaves = await fetch_from_fake_cast(tmp_path, reply, pages, group, port_base)
    assert code == 0, err
    assert (tmp_path / "f").read_bytes() == data
    assert leaves == ["spec"]
    assert leftovers(tmp_path) == []


async def test_garbage_and_foreign_datagrams_are_dropped_and_counted(
    served: Served, tmp_path: Path
) -> None:
    digest = write_random(served.root / "f.bin", 4_000_000)
    rng = random.Random(7)
    stop = asyncio.Event()
    cfg = served.server.config
    group, port = cfg.base_group, cfg.port_base  # the first cast's slot
    sock = sender_socket(group, interface="127.0.0.1")

    async def noise() -> None:
        while not stop.is_set():
            for _ in range(20):
                kind = rng.randrange(3)
                if kind == 0:
                    blob = rng.randbytes(rng.randrange(0, 64))
                elif kind == 1:
                    blob = page.encode(rng.randrange(1, 400), 0xDEAD, rng.randbytes(8192))
                else:
                    good = bytearray(page.encode(1, 0, b"z" * 8192))
                    blob = bytes(good[:100])
                sock.sendto(blob, (group, port))
            await asyncio.sleep(0.005)

    task = asyncio.create_task(noise())
    try:
        code, _, err = await run_fetch(
            served.url("f.bin"), "-O", "f.bin", "--log-json", cwd=tmp_path
        )
    finally:
        stop.set()
        await task
        sock.close()
    assert code == 0, err
    assert sha256_of(tmp_path / "f.bin") == digest
    drops = [
        json.loads(line)
        for line in err.splitlines()
        if line.startswith(b"{") and json.loads(line)["event"] == "fetch.dropped"
    ]
    assert drops and drops[0].get("foreign", 0) > 0 and drops[0].get("short", 0) > 0


# As from a terminal: a suite started in the background (`make test &`) hands its children
# SIGINT ignored, and a fetch honours that, as curl does. This wrapper gives it SIGINT's
# default and execs (not a preexec_fn: Python code in a forked child of this threaded
# process can deadlock).
SIGINT_DEFAULT = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])",
]


@pytest.mark.parametrize("served", [{"rate_mbit": 5.0}], indirect=True)  # 13 s for the file
async def test_ctrl_c_leaves_and_leaves_no_partial_file(served: Served, tmp_path: Path) -> None:
    write_random(served.root / "big.img", 8_000_000)
    proc = await asyncio.create_subprocess_exec(
        *SIGINT_DEFAULT,
        *BOOTCAST[1:],
        "fetch",
        served.url("big.img"),
        "-O",
        "big.img",
        "--progress",
        "none",
        cwd=tmp_path,
        stderr=asyncio.subprocess.PIPE,
    )
    # Joined, and writing its partial file: interrupted mid-transfer.
    await eventually(
        lambda: served.server.stats()["bootcast_clients_active"] == 1 and leftovers(tmp_path),
        "the fetch joined and writing",
    )
    proc.send_signal(signal.SIGINT)
    _, err = await within(proc.communicate(), "the interrupted fetch's exit")
    # Exit status 130. In about 1 of 12 runs under pytest (never in 40 from a plain script,
    # nor with os._exit(130) after main returned) the child instead dies by SIGINT after
    # its cleanup and its message — what a shell also reports as 130. Not understood yet;
    # the cleanup below is what matters to the user and is checked either way.
    assert proc.returncode in (130, -signal.SIGINT), err
    assert b"interrupted" in err
    assert served.server.stats()["bootcast_clients_active"] == 0
    assert served.server.stats()["bootcast_leaves_total"] == 1
    assert not (tmp_path / "big.img").exists() and leftovers(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("served", [{"rate_mbit": 400.0}], indirect=True)
async def test_eight_concurrent_fetches_of_64_mib_and_a_late_joiner(
    served: Served, tmp_path: Path
) -> None:
    digest = write_random(served.root / "rootfs.img", 64 * 1024 * 1024)
    pages = 64 * 1024 * 1024 // 8192

    async def mid_cast() -> None:
        """Until a quarter of the file went out: the late joiner comes in mid-cast."""
        await eventually(
            lambda: served.server.stats().get("bootcast_pages_sent_total", 0) >= pages // 4,
            "a quarter of the cast sent",
        )

    async def one(i: int, late: bool) -> tuple[int, bytes]:
        if late:
            await mid_cast()
        code, _, err = await run_fetch(
            served.url("rootfs.img"),
            "-O",
            f"c{i}.img",
            "-q",
            "--timeout",
            "60",
            cwd=tmp_path,
            limit_s=300,
        )
        return code, err

    results = await asyncio.gather(*(one(i, False) for i in range(8)), one(8, True))
    for code, err in results:
        assert code == 0, err
    for i in range(9):
        assert sha256_of(tmp_path / f"c{i}.img") == digest
    stats = served.server.stats()
    assert stats["bootcast_casts_started_total"] == 1  # one cast served all nine
    assert stats["bootcast_clients_active"] == 0
