"""``bootcast fetch``: join, receive, repair, verify, write atomically, leave.

The receiving side's shell around :class:`~bootcast.receiver.ReceiverCore`: a plain
blocking loop on a non-blocking socket — ``poll`` with a 10 ms tick, then drain every
queued datagram — with no event loop, because a rack of clients starting at once pays for
every import and every per-datagram call (the stdlib ``http.client`` starts in a fraction of
aiohttp's time; the server side uses aiohttp). NACK reports go out from a helper thread over
one keep-alive connection, so the receive loop never waits on HTTP.

Pages are written with ``pwrite`` into a temporary file beside the destination; only a file
whose size and SHA-256 match the join reply is renamed to the final name (``-O -`` copies it
to stdout instead). The leave request is sent on every way out: success, error, timeout,
Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urljoin, urlsplit

from .errors import (
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

if TYPE_CHECKING:
    from .outfile import MappedWriter, PrefixHash, Writer
    from .receiver import ReceiverCore

log = get_logger("bootcast.fetch")

REPAIR_HEADER = "X-Bootcast-Repair"
TICK_S = 0.01
MAX_REPLY_BYTES = 64 * 1024
DRAIN_BATCH = 512
PARITY_RCVBUF = 2 * 1024 * 1024
BATCH_TARGET = 32
BATCH_WAIT_S = 0.005


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchConfig:
    url: str
    output: str | None = None  # None: from the URL; "-": stdout
    interface: str | None = None
    timeout_s: float = 30.0
    progress: str = "auto"  # auto | bar | log | none
    repair: bool = True
    parity: bool = True  # ask for parity repair (parity.py) when NACKing

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


class _Http:
    """Requests to the server of one URL, each a short ``http.client`` exchange."""

    def __init__(self, url: str, timeout_s: float) -> None:
        parts = urlsplit(url)
        self.url = url
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.timeout_s = timeout_s

    def connect(self, timeout_s: float | None = None) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout_s or self.timeout_s)

    def request(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes | None = None,
        *,
        conn: http.client.HTTPConnection | None = None,
        timeout_s: float | None = None,
    ) -> tuple[int, str, bytes]:
        own = conn is None
        c = self.connect(timeout_s) if conn is None else conn
        try:
            c.request(method, target, body=body, headers=headers)
            resp = c.getresponse()
            data = resp.read(MAX_REPLY_BYTES)
            return resp.status, resp.reason, data
        finally:
            if own:
                c.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _join(api: _Http, cfg: FetchConfig) -> JoinReply:
    headers = {REPAIR_HEADER: "nack, parity" if cfg.parity else "nack"} if cfg.repair else {}
    target = urlsplit(cfg.url)._replace(scheme="", netloc="").geturl()
    try:
        status, reason, body = api.request("GET", target, headers)
    except TimeoutError:
        raise FetchTimeout(f"{cfg.url}: no answer to the join request") from None
    except (OSError, http.client.HTTPException) as exc:
        raise FetchError(f"{cfg.url}: {_describe(exc)}") from None
    text = body.decode("utf-8", "replace")
    if status != 200:
        first = text.strip().splitlines()[0][:120] if text.strip() else ""
        raise FetchError(f"{cfg.url}: {status} {reason}" + (f" ({first})" if first else ""))
    try:
        return JoinReply.parse(text)
    except RemoteProtocolError as exc:
        raise FetchError(f"{cfg.url}: bad join reply: {exc}") from None


_INTERRUPTS = frozenset({signal.SIGINT, signal.SIGTERM})


def _hold_interrupts() -> set[int | signal.Signals] | None:
    """Block SIGINT and SIGTERM for this (main) thread; the previous mask, or None when
    called off the main thread (signals are the main thread's business then)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS)


def _release_interrupts(previous: set[int | signal.Signals] | None) -> None:
    """Restore the mask: an interrupt held meanwhile is delivered now."""
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _leave(api: _Http, cfg: FetchConfig, token: str) -> None:
    target = urlsplit(cfg.leave_url())._replace(scheme="", netloc="").geturl()
    try:
        status, _, _ = api.request("GET", target, {"X-TOKEN": token}, timeout_s=3.0)
        log.debug("fetch.left", status=status)
    except (OSError, http.client.HTTPException) as exc:
        log.warning("fetch.leave.failed", error=_describe(exc))


class _NackSender:
    """Posts NACK reports from a daemon thread over one keep-alive connection."""

    def __init__(self, api: _Http, target: str, token: str) -> None:
        self.api = api
        self.target = target
        self.token = token
        self.sent = 0
        self.failures = 0
        self._pending: NackReport | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="bootcast-nack", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._busy

    def offer(self, report: NackReport) -> None:
        with self._cond:
            self._pending = report
            self._busy = True
            self._cond.notify()

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    break
                report, self._pending = self._pending, None
            assert report is not None
            try:
                if conn is None:
                    conn = self.api.connect(2.0)
                status, _, _ = self.api.request(
                    "POST",
                    self.target,
                    {"X-TOKEN": self.token, "Content-Type": "text/plain"},
                    report.encode(),
                    conn=conn,
                )
                self.sent += 1
                if status >= 400:
                    log.warning("fetch.nack.refused", status=status)
            except Exception as exc:  # any: a dead repair thread would stall the fetch
                self.failures += 1
                if self.failures in (1, 10, 100):
                    log.warning("fetch.nack.failed", error=_describe(exc), failures=self.failures)
                if conn is not None:
                    conn.close()
                conn = None
            finally:
                self._busy = False
        if conn is not None:
            conn.close()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=0.2)  # a report in flight is of no use any more


def fetch(cfg: FetchConfig) -> FetchResult:
    """Fetch ``cfg.url`` to ``cfg.destination()``; raises a :class:`FetchError` on failure.

    Blocking; from async code run it in a thread (``asyncio.to_thread(fetch, cfg)``).
    """
    destination = cfg.destination()
    if destination != "-" and not os.path.isdir(os.path.dirname(destination) or "."):
        raise ConfigError(f"no such directory: {os.path.dirname(destination)}")
    started = time.monotonic()
    api = _Http(cfg.url, cfg.timeout_s)
    # Where to listen is known before the join; joining the group right after the reply
    # (before anything else) keeps the pages sent meanwhile, which we would miss, few.
    interface = cfg.interface or _local_address(cfg.url)
    reply = _join(api, cfg)
    sock, parity_sock = _join_group(api, cfg, reply, interface)
    # The rest of the receiving side is imported only now: when a rack starts its fetches
    # at once, the joins (and the group memberships) come first, and these imports overlap
    # the cast's start instead of delaying it.
    from .outfile import finish, temp_for

    bound = log.bind(file=destination, cast_id=reply.cast_id)
    bound.info(
        "fetch.joined",
        group=reply.group,
        port=reply.port,
        pages=reply.pages,
        page_size=reply.page_size,
        size=reply.size,
    )
    # A Ctrl-C (or SIGTERM) landing while the partial file is being created, after it
    # exists and before its name is known here, would leave it behind: held back until
    # the try below, which removes the file on the way out.
    held = _hold_interrupts()
    try:
        fd, temp = temp_for(destination)
    except BaseException:
        _release_interrupts(held)
        for s in (sock, parity_sock):
            if s is not None:
                s.close()
        _leave(api, cfg, reply.token)
        raise
    try:
        _release_interrupts(held)
        try:
            stats = _receive(
                api, cfg, reply, (sock, parity_sock), interface, fd, destination, bound
            )
        finally:
            _leave(api, cfg, reply.token)
        bound.debug("fetch.finishing")
        finish(fd, temp, destination)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    finally:
        os.close(fd)
    seconds = time.monotonic() - started
    return FetchResult(destination, stats[0], stats[1], seconds, reply.pages, *stats[2:])


def _join_group(
    api: _Http, cfg: FetchConfig, reply: JoinReply, interface: str | None
) -> tuple[socket.socket | None, socket.socket | None]:
    """The cast's data socket and parity socket, joined (none for an empty file); on a
    failure the client leaves the cast it joined."""
    sock = parity_sock = None
    try:
        if reply.pages:
            sock = receiver_socket(reply.group, reply.port, interface=interface)
            if reply.parity_port is not None and cfg.repair:
                parity_sock = receiver_socket(
                    reply.group, reply.parity_port, interface=interface, rcvbuf=PARITY_RCVBUF
                )
    except BaseException:
        if sock is not None:
            sock.close()
        _leave(api, cfg, reply.token)
        raise
    return sock, parity_sock


def _receive(
    api: _Http,
    cfg: FetchConfig,
    reply: JoinReply,
    socks: tuple[socket.socket | None, socket.socket | None],
    interface: str | None,
    fd: int,
    destination: str,
    bound: Any,
) -> tuple[int, str, int, int, int, dict[str, int]]:
    sock, parity_sock = socks
    from .outfile import MappedWriter, PrefixHash, Writer

    core = _receiver_core(reply, parity=parity_sock is not None)
    if reply.size:
        os.ftruncate(fd, reply.size)
    nacks_sent = 0
    hasher = PrefixHash(fd, reply.page_size)
    if sock is not None:
        nack: _NackSender | None = None
        if cfg.repair and reply.nack_path:
            target = urlsplit(urljoin(cfg.url, reply.nack_path)).path
            nack = _NackSender(api, target, reply.token)
        progress = _Progress(
            cfg.progress, os.path.basename(destination) or "stdout", reply.size or 0
        )
        try:
            writer: Writer | MappedWriter = (
                MappedWriter(fd, destination, reply.size) if reply.size else Writer(fd, destination)
            )
            try:
                _receive_loop(
                    core, (sock, parity_sock), cfg, reply, interface, nack, progress, hasher,
                    writer,
                )  # fmt: skip
            finally:
                writer.wait_synced()  # the fd must stay open until a background sync ends
        finally:
            sock.close()
            if parity_sock is not None:
                parity_sock.close()
            progress.close()
            if nack is not None:
                nack.close()
                nacks_sent = nack.sent
    bound.debug(
        "fetch.complete",
        held=core.held,
        duplicates=core.duplicates,
        parity_received=core.parity_received,
        pages_rebuilt=core.pages_rebuilt,
    )
    size = core.file_size()
    digest = _verify(fd, size, reply, hasher)
    drops = {reason.value: n for reason, n in core.drops.items()}
    if drops:
        bound.info("fetch.dropped", **drops)
    return size, digest, core.duplicates, core.repairs_received, nacks_sent, drops


def _receiver_core(reply: JoinReply, *, parity: bool) -> ReceiverCore:
    from .receiver import ReceiverCore

    return ReceiverCore(
        pages=reply.pages,
        page_size=reply.page_size,
        size=reply.size,
        cast_id=reply.cast_id,
        now=time.monotonic(),
        # A server that follows only the original spec leaves word 4 (our CRC32C) at 0;
        # ours announces itself with CAST=. Without it, SHA256= (if given) still verifies.
        verify_crc=reply.cast_id is not None,
        block_pages=reply.block_pages if parity else None,
        # With parity a lost page is repaired per block, whenever: asking less often costs
        # the server (and this client) fewer HTTP requests, and the link no idle time.
        nack_delay_s=0.1 if parity else 0.03,
    )


def _verify(fd: int, size: int, reply: JoinReply, hasher: PrefixHash) -> str:
    """The file's SHA-256, checked against the join reply's; the file cut to its size."""
    if reply.size is None:
        os.ftruncate(fd, size)
    digest = hasher.finish(size)
    if reply.sha256 is not None and digest != reply.sha256:
        raise VerificationFailed(f"SHA-256 mismatch: got {digest}, server said {reply.sha256}")
    if os.fstat(fd).st_size != size:
        raise VerificationFailed(f"size mismatch: {os.fstat(fd).st_size} != {size}")
    return digest


def _rebuild(core: ReceiverCore, writer: Writer | MappedWriter, now: float) -> None:
    """Decode the blocks that hold enough symbols (their held pages are read back)."""
    page_size = core.page_size
    for block in list(core.decodable):
        first, offset, length = core.block_extent(block)
        extent = writer.read(offset, length)
        if len(extent) != length:
            raise FetchError(f"{writer.destination} changed while being written")
        held = {
            i: extent[(i - first) * page_size : (i - first + 1) * page_size]
            for i in core.block_pages_held(block)
        }
        for accepted in core.rebuild(block, held, now):
            writer.write(accepted.offset, accepted.payload)
    writer.flush()


def _receive_loop(
    core: ReceiverCore,
    socks: tuple[socket.socket, socket.socket | None],
    cfg: FetchConfig,
    reply: JoinReply,
    interface: str | None,
    nack: _NackSender | None,
    progress: _Progress,
    hasher: PrefixHash,
    writer: Writer | MappedWriter,
) -> None:
    buffer = bytearray(65536)
    view = memoryview(buffer)
    sock, parity_sock = socks
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    if parity_sock is not None:
        poller.register(parity_sock.fileno(), select.POLLIN)
    joined_at = time.monotonic()
    next_tick = joined_at + TICK_S
    monotonic = time.monotonic
    while not core.complete:
        poller.poll(max(0.0, next_tick - monotonic()) * 1000)
        now = monotonic()
        got = _drain(core, sock, buffer, view, writer, now)
        if parity_sock is not None and not core.complete:
            got += _drain_parity(core, parity_sock, buffer, view, writer, now)
        if got < BATCH_TARGET and not core.complete:
            # A trickle (a paced link delivers one datagram at a time): let a few gather
            # before the next wake-up.
            time.sleep(BATCH_WAIT_S)
        if now < next_tick and not core.complete:
            continue
        writer.flush()
        if core.complete:
            break
        writer.sync_if_due()
        hasher.catch_up(core.have, core.pages)
        next_tick = now + TICK_S
        progress.update(core.bytes_held)
        core.overrun(socket_drops(sock))
        _check_progress(core, cfg, reply, interface, joined_at, now)
        if nack is not None and not nack.busy:
            _report(core, nack, now)
    writer.flush()
    progress.update(core.bytes_held)


def _drain(
    core: ReceiverCore,
    sock: socket.socket,
    buffer: bytearray,
    view: memoryview,
    writer: Writer | MappedWriter,
    now: float,
) -> int:
    """Everything queued on the page socket (one wake-up per datagram would cost more than
    the datagram; the 8 MiB socket buffer absorbs what arrives meanwhile); returns how many
    datagrams were read."""
    datagram, write = core.datagram, writer.write
    got = 0
    for _ in range(DRAIN_BATCH):
        try:
            n = sock.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            break
        got += 1
        accepted = datagram(view[:n], now)
        if accepted is not None:
            write(accepted.offset, accepted.payload)
            if core.complete:
                break
    return got


def _drain_parity(
    core: ReceiverCore,
    sock: socket.socket,
    buffer: bytearray,
    view: memoryview,
    writer: Writer | MappedWriter,
    now: float,
) -> int:
    got = 0
    for _ in range(DRAIN_BATCH):
        try:
            n = sock.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            break
        got += 1
        core.parity(view[:n], now)
    if core.decodable:
        _rebuild(core, writer, now)
    return got


def _check_progress(
    core: ReceiverCore,
    cfg: FetchConfig,
    reply: JoinReply,
    interface: str | None,
    joined_at: float,
    now: float,
) -> None:
    """No page at all, or no new page, for ``--timeout`` seconds: give up, saying which."""
    if core.first_page_at is None:
        if now - joined_at > cfg.timeout_s:
            raise NoPagesArrived(
                f"no pages arrived within {cfg.timeout_s:g} s from {reply.group} port "
                f"{reply.port}: is multicast routed on the interface "
                f"({interface or 'default'})?"
            )
    elif now - core.last_progress > cfg.timeout_s:
        raise FetchTimeout(
            f"stalled: no new page for {cfg.timeout_s:g} s ({core.held}/{core.pages} pages held)"
        )


def _report(core: ReceiverCore, nack: _NackSender, now: float) -> None:
    from .ranges import format_ranges

    report = core.poll(now)
    if report is None:
        return
    if report.missing or report.lost:
        log.debug("fetch.nack.report", received=report.received, lost=report.lost,
                  overrun=report.overrun, missing=format_ranges(report.missing[:8]),
                  held=core.held)  # fmt: skip
    nack.offer(report)


__all__ = ["FetchConfig", "FetchResult", "fetch"]
