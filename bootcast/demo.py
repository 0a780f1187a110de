"""``bootcast demo``: the README's first command, finite, on loopback.

Generates a random file, starts ``bootcast serve`` on 127.0.0.1 (a free port), runs several
concurrent ``bootcast fetch`` processes plus one that joins late, checks every copy against
the original's SHA-256 itself, prints a summary and exits 0 only if every copy verified.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .logs import get_logger

log = get_logger("bootcast.demo")


def _command() -> list[str]:
    exe = shutil.which("bootcast")
    return [exe] if exe else [sys.executable, "-m", "bootcast"]


def _generate(path: Path, size_mib: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size_mib):
            chunk = os.urandom(1024 * 1024)
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


def loopback_serve_argv(root: Path, *, rate_mbit: float) -> list[str]:
    """``bootcast serve`` of ``root`` on 127.0.0.1 (a free port, 8 KiB pages, JSON logs)."""
    return [
        *_command(),
        "--log-json",
        "serve",
        "--dir",
        str(root),
        "--listen",
        "127.0.0.1:0",
        "--interface",
        "127.0.0.1",
        "--page-size",
        "8192",
        "--rate",
        f"{rate_mbit:g}",
    ]


async def _start_server(root: Path) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        *loopback_serve_argv(root, rate_mbit=800), stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        line = await asyncio.wait_for(proc.stderr.readline(), 15)
        if not line:
            break
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == "serve.listening":
                return proc, int(event["port"])
    proc.kill()
    raise RuntimeError("bootcast serve did not start")


async def _drain(stream: asyncio.StreamReader | None, sent: list[int]) -> None:
    if stream is None:
        return
    while line := await stream.readline():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == "cast.stopped":
                sent.append(
                    int(event.get("pages_sent", 0))
                    + int(event.get("pages_resent", 0))
                    + int(event.get("pages_repeated", 0))
                    + int(event.get("parity_sent", 0))
                )
            if event.get("event", "").startswith("cast."):
                fields = {
                    k: v
                    for k, v in event.items()
                    if k
                    in ("clients", "reason", "pages_sent", "pages_resent", "parity_sent", "nacks")
                }
                print(f"  server: {event['event']} {fields}", file=sys.stderr)


async def run_demo(*, clients: int = 4, size_mib: int = 32) -> int:
    with tempfile.TemporaryDirectory(prefix="bootcast-demo-") as tmp:
        root = Path(tmp) / "srv"
        out = Path(tmp) / "out"
        (root / "images").mkdir(parents=True)
        out.mkdir()
        source = root / "images" / "rootfs.img"
        expected = await asyncio.to_thread(_generate, source, size_mib)
        print(
            f"demo: serving {source.name} ({size_mib} MiB, sha256 {expected[:16]}…) on "
            f"127.0.0.1 to {clients} concurrent clients + 1 late joiner",
            file=sys.stderr,
        )
        server, port = await _start_server(root)
        sent: list[int] = []
        drain = asyncio.create_task(_drain(server.stderr, sent))
        url = f"http://127.0.0.1:{port}/join/images/rootfs.img"
        started = time.monotonic()
        try:
            jobs = [_fetch_one(url, out, i, 0.0) for i in range(1, clients + 1)]
            jobs.append(_fetch_one(url, out, clients + 1, 0.4))
            results = await asyncio.gather(*jobs)
        finally:
            server.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait(), 5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drain, 2)
        wall = time.monotonic() - started
        ok = _report(results, out, expected, clients, size_mib)
        pages = size_mib * 1024 * 1024 // 8192
        copies = f"{sum(sent) / pages:.2f} copies of the file" if sent else "one multicast stream"
        print(
            f"\n{'all' if ok else 'NOT all'} {clients + 1} copies verified against sha256 "
            f"{expected[:16]}… in {wall:.2f} s; the server sent {copies} ({sum(sent)} datagrams "
            f"of 8 KiB) where HTTP would have sent {clients + 1}.",
            file=sys.stderr,
        )
        return 0 if ok else 1


async def _fetch_one(url: str, out: Path, i: int, delay: float) -> tuple[int, int, float]:
    """``bootcast fetch`` as client ``i``, after ``delay``: (i, exit code, seconds)."""
    await asyncio.sleep(delay)
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *_command(), "fetch", url, "-O", str(out / f"client{i}.img"), "--progress", "log",
        "--timeout", "20",
    )  # fmt: skip
    return i, await proc.wait(), time.monotonic() - t0


def _report(
    results: list[tuple[int, int, float]], out: Path, expected: str, clients: int, size_mib: int
) -> bool:
    """A table of the clients; True when every copy is verified."""
    print("\nclient    exit  seconds  MB/s    verified", file=sys.stderr)
    ok = True
    for i, code, seconds in sorted(results):
        path = out / f"client{i}.img"
        good = (
            code == 0
            and path.exists()
            and (hashlib.sha256(path.read_bytes()).hexdigest() == expected)
        )
        ok &= good
        label = f"{i} (late)" if i == clients + 1 else str(i)
        print(
            f"{label:<10}{code:<6}{seconds:<9.2f}{size_mib * 1.048576 / seconds:<8.1f}"
            f"{'yes' if good else 'NO'}",
            file=sys.stderr,
        )
    return ok
