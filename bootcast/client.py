"""``bootcast fetch``: join, receive, repair, verify, write atomically, leave.

The receiving side's shell around :class:`~bootcast.receiver.ReceiverCore`. Pages are
written with ``pwrite`` into a temporary file beside the destination; only a file whose
size and SHA-256 match the join reply is renamed to the final name (``-O -`` copies it to
stdout instead). The leave request is sent on every way out: success, error, timeout and
Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import aiohttp

from .errors import (
    BootcastError,
    ConfigError,
    FetchError,
    FetchTimeout,
    NoPagesArrived,
    RemoteProtocolError,
    VerificationFailed,
)
from .joinreply import JoinReply
from .logs import get_logger
from .mcast import receiver_socket, socket_drops
from .nack import NackReport
from .receiver import ReceiverCore

log = get_logger("bootcast.fetch")

REPAIR_HEADER = "X-Bootcast-Repair"
TICK_S = 0.01


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchConfig:
    url: str
    output: str | None = None  # None: from the URL; "-": stdout
    interface: str | None = None
    timeout_s: float = 30.0
    progress: str = "auto"  # auto | bar | log | none
    repair: bool = True

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"not an http URL: {self.url}")
        if not parts.path.startswith("/join/") or len(parts.path) <= len("/join/"):
            raise ConfigError("the URL must be a join URL: http://HOST:PORT/join/PATH")
        if self.timeout_s <= 0:
            raise ConfigError("--timeout must be > 0")
        if self.progress not in ("auto", "bar", "log", "none"):
            raise ConfigError(f"unknown progress mode {self.progress}")

    @property
    def remote_path(self) -> str:
        return urlsplit(self.url).path[len("/join/") :]

    def leave_url(self) -> str:
        parts = urlsplit(self.url)
        return parts._replace(path="/leave/" + self.remote_path, query="").geturl()

    def destination(self) -> str:
        if self.output:
            return self.output
        name = unquote(self.remote_path.rsplit("/", 1)[-1])
        if not name or name in (".", ".."):
            raise ConfigError("cannot derive a file name from the URL; use -O FILE")
        return name


@dataclass(frozen=True, slots=True)
class FetchResult:
    destination: str
    size: int
    sha256: str
    seconds: float
    pages: int
    duplicates: int
    repairs_received: int
    nacks_sent: int
    drops: dict[str, int]

    @property
    def mbyte_per_s(self) -> float:
        return self.size / 1e6 / self.seconds if self.seconds > 0 else 0.0


class _Progress:
    def __init__(self, mode: str, name: str, total: int) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self.total = total
        self.name = name
        self._bar: Any = None
        self._shown = 0
        self._last_log = time.monotonic()
        self._start = self._last_log
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=name,
                file=sys.stderr,
                dynamic_ncols=True,
                leave=True,
            )

    def update(self, held_bytes: int) -> None:
        if self._bar is not None:
            self._bar.update(held_bytes - self._shown)
            self._shown = held_bytes
        elif self.mode == "log":
            now = time.monotonic()
            if now - self._last_log >= 1.0 and self.total:
                rate = held_bytes / max(now - self._start, 1e-9)
                eta = (self.total - held_bytes) / rate if rate > 0 else None
                log.info(
                    "fetch.progress",
                    file=self.name,
                    percent=round(100 * held_bytes / self.total, 1),
                    mbyte_per_s=round(rate / 1e6, 1),
                    eta_s=round(eta, 1) if eta is not None else None,
                )
                self._last_log = now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def _join(session: aiohttp.ClientSession, cfg: FetchConfig) -> tuple[JoinReply, str | None]:
    headers = {REPAIR_HEADER: "nack"} if cfg.repair else {}
    try:
        async with session.get(cfg.url, headers=headers) as resp:
            body = await resp.text(errors="replace")
            if resp.status != 200:
                first = body.strip().splitlines()[0][:120] if body.strip() else ""
                reason = f"{resp.status} {resp.reason}" + (f" ({first})" if first else "")
                raise FetchError(f"{cfg.url}: {reason}")
    except aiohttp.ClientError as exc:
        raise FetchError(f"{cfg.url}: {exc}") from None
    except TimeoutError:
        raise FetchTimeout(f"{cfg.url}: no answer to the join request") from None
    try:
        return JoinReply.parse(body), _local_address(cfg.url)
    except RemoteProtocolError as exc:
        raise FetchError(f"{cfg.url}: bad join reply: {exc}") from None


def _local_address(url: str) -> str | None:
    """The local address the kernel uses to reach the server: the default interface for
    receiving its multicast. A connected UDP socket sends nothing."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, addr = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(addr)
            local = str(probe.getsockname()[0])
    except (OSError, IndexError):
        return None
    return local.split("%")[0]


async def _leave(session: aiohttp.ClientSession, cfg: FetchConfig, token: str) -> None:
    try:
        async with session.get(
            cfg.leave_url(), headers={"X-TOKEN": token}, timeout=aiohttp.ClientTimeout(total=3)
        ) as resp:
            await resp.read()
            log.debug("fetch.left", status=resp.status)
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("fetch.leave.failed", error=str(exc) or type(exc).__name__)


def _sha256_file(fd: int) -> str:
    digest = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 4 * 1024 * 1024):
        digest.update(chunk)
    return digest.hexdigest()


def _temp_for(destination: str) -> tuple[int, str]:
    if destination == "-":
        return tempfile.mkstemp(prefix="bootcast-", suffix=".part")
    target = Path(destination)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"no such directory: {parent}")
    return tempfile.mkstemp(prefix=f".{target.name}.", suffix=".bootcast-part", dir=parent)


def _finish(fd: int, temp: str, destination: str) -> None:
    os.fsync(fd)
    if destination == "-":
        os.lseek(fd, 0, os.SEEK_SET)
        with os.fdopen(os.dup(fd), "rb") as src:
            shutil.copyfileobj(src, sys.stdout.buffer, 1024 * 1024)
        sys.stdout.buffer.flush()
        os.unlink(temp)
        return
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    os.replace(temp, destination)
    dir_fd = os.open(os.path.dirname(os.path.abspath(destination)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


async def fetch(cfg: FetchConfig) -> FetchResult:
    destination = cfg.destination()
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=None, connect=cfg.timeout_s, sock_read=cfg.timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        reply, local = await _join(session, cfg)
        bound = log.bind(file=destination, cast_id=reply.cast_id)
        bound.info(
            "fetch.joined",
            group=reply.group,
            port=reply.port,
            pages=reply.pages,
            page_size=reply.page_size,
            size=reply.size,
        )
        fd, temp = _temp_for(destination)
        try:
            try:
                result = await _receive(session, cfg, reply, local, fd, destination, bound)
            finally:
                await _leave(session, cfg, reply.token)
            await asyncio.to_thread(_finish, fd, temp, destination)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        finally:
            os.close(fd)
    seconds = time.monotonic() - started
    return FetchResult(destination, result[0], result[1], seconds, reply.pages, *result[2:])


async def _receive(
    session: aiohttp.ClientSession,
    cfg: FetchConfig,
    reply: JoinReply,
    local: str | None,
    fd: int,
    destination: str,
    bound: Any,
) -> tuple[int, str, int, int, int, dict[str, int]]:
    loop = asyncio.get_running_loop()
    core = ReceiverCore(
        pages=reply.pages,
        page_size=reply.page_size,
        size=reply.size,
        cast_id=reply.cast_id,
        now=loop.time(),
    )
    if reply.size:
        os.ftruncate(fd, reply.size)
    nacks_sent = 0
    if reply.pages:
        interface = cfg.interface or local
        sock = receiver_socket(reply.group, reply.port, interface=interface)
        done = asyncio.Event()
        write_error: list[OSError] = []

        buffer = bytearray(65536)
        view = memoryview(buffer)

        def drain() -> None:
            # Read every queued datagram per wake-up: one epoll round per datagram would
            # cost more than the datagram itself.
            for _ in range(256):
                try:
                    n = sock.recv_into(buffer)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    bound.warning("fetch.recv.failed", error=exc.strerror)
                    return
                accepted = core.datagram(view[:n], loop.time())
                if accepted is None:
                    continue
                try:
                    os.pwrite(fd, accepted.payload, accepted.offset)
                except OSError as exc:
                    write_error.append(exc)
                    done.set()
                    return
                if core.complete:
                    done.set()
                    return

        loop.add_reader(sock.fileno(), drain)
        progress = _Progress(
            cfg.progress, os.path.basename(destination) or "stdout", reply.size or 0
        )
        nack_url = urljoin(cfg.url, reply.nack_path) if reply.nack_path else None
        in_flight: asyncio.Task[None] | None = None
        joined_at = loop.time()
        try:
            while not done.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), TICK_S)
                now = loop.time()
                progress.update(core.bytes_held)
                if done.is_set():
                    break
                core.overrun(socket_drops(sock))
                if core.first_page_at is None and now - joined_at > cfg.timeout_s:
                    raise NoPagesArrived(
                        f"no pages arrived within {cfg.timeout_s:g} s from {reply.group} port "
                        f"{reply.port}: is multicast routed on the interface "
                        f"({interface or 'default'})?"
                    )
                if core.first_page_at is not None and now - core.last_progress > cfg.timeout_s:
                    raise FetchTimeout(
                        f"stalled: no new page for {cfg.timeout_s:g} s "
                        f"({core.held}/{core.pages} pages held)"
                    )
                if not cfg.repair or nack_url is None:
                    continue
                if in_flight is not None and not in_flight.done():
                    continue
                report = core.poll(now)
                if report is not None:
                    in_flight = asyncio.create_task(
                        _post_nack(session, nack_url, reply.token, report)
                    )
                    nacks_sent += 1
            if write_error:
                raise FetchError(f"cannot write {destination}: {write_error[0].strerror}")
        finally:
            loop.remove_reader(sock.fileno())
            sock.close()
            progress.close()
            if in_flight is not None and not in_flight.done():
                in_flight.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await in_flight
    size = core.file_size()
    if reply.size is None:
        os.ftruncate(fd, size)
    digest = await asyncio.to_thread(_sha256_file, fd)
    if reply.sha256 is not None and digest != reply.sha256:
        raise VerificationFailed(f"SHA-256 mismatch: got {digest}, server said {reply.sha256}")
    if os.fstat(fd).st_size != size:
        raise VerificationFailed(f"size mismatch: {os.fstat(fd).st_size} != {size}")
    drops = {reason.value: n for reason, n in core.drops.items()}
    if drops:
        bound.info("fetch.dropped", **drops)
    return size, digest, core.duplicates, core.repairs_received, nacks_sent, drops


async def _post_nack(
    session: aiohttp.ClientSession, url: str, token: str, report: NackReport
) -> None:
    try:
        async with session.post(
            url,
            data=report.encode(),
            headers={"X-TOKEN": token, "Content-Type": "text/plain"},
            timeout=aiohttp.ClientTimeout(total=2),
        ) as resp:
            await resp.read()
            if resp.status >= 400:
                log.warning("fetch.nack.refused", status=resp.status)
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("fetch.nack.failed", error=str(exc) or type(exc).__name__)


__all__ = ["BootcastError", "FetchConfig", "FetchResult", "fetch"]
