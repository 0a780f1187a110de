"""``bootcast serve``: the HTTP control plane (aiohttp) and one sender task per cast.

Endpoints (DESIGN §2.1 and the README's protocol section):

* ``GET /join/<path>``: start or attach to the cast of ``path``; ``text/plain`` join reply
  (``joinreply.py``). A client that sends ``X-Bootcast-Repair: nack`` declares it will ask
  for lost pages, which lets the server pause the carousel once it had a full pass.
* ``GET /leave/<path>`` with ``X-TOKEN``: 200 with no body; without the header 400, with an
  unknown token 404, neither with a body and neither changing anything.
* ``POST /nack/<path>`` with ``X-TOKEN``: a repair request (``nack.py``), 204.
* ``GET /metrics``: Prometheus counters.

A cast opens the file once, maps it, computes the SHA-256 and every page's CRC32C in a
worker thread, and then serves all of its clients from that one mapping: the file is read
once per cast, not once per client. Each concurrent cast gets its own (group, port) slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import secrets
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from . import page as pagecodec
from . import parity
from .cast import CastCore, CastState, StopReason
from .defaults import (
    DEFAULT_GROUP_V4,
    DEFAULT_GROUP_V6,
    DEFAULT_IDLE_LOOPS,
    DEFAULT_PAGE_SIZE,
    DEFAULT_PORT_BASE,
    DEFAULT_RATE_MBIT,
)
from .digests import DigestCache
from .errors import ConfigError, PathRejected, RemoteProtocolError, SourceChanged
from .joinreply import JoinReply
from .logs import get_logger, quiet_aiohttp
from .mcast import is_ipv6, sender_socket
from .metrics import ServerMetrics
from .nack import MAX_BODY_BYTES, NackReport
from .pacing import Pacer, RateController
from .paths import open_confined
from .source import FileSource

log = get_logger("bootcast.server")

REPAIR_HEADER = "X-Bootcast-Repair"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeConfig:
    root: Path
    host: str = "127.0.0.1"
    port: int = 8080
    group: str | None = None
    port_base: int = DEFAULT_PORT_BASE
    page_size: int = DEFAULT_PAGE_SIZE
    rate_mbit: float = DEFAULT_RATE_MBIT
    interface: str | None = None
    ttl: int = 1
    idle_loops: int = DEFAULT_IDLE_LOOPS
    max_casts: int = 64
    start_delay_s: float = 0.05
    start_wait_max_s: float = 0.5
    adaptive: bool = True
    repeat_repairs: bool = True
    parity: bool = True
    prehash_bytes: int = 16 * 1024**3

    def __post_init__(self) -> None:
        if not self.root.is_dir():
            raise ConfigError(f"--dir {self.root} is not a directory")
        if not 1 <= self.page_size <= pagecodec.MAX_PAGE_SIZE:
            raise ConfigError(f"--page-size must be 1..{pagecodec.MAX_PAGE_SIZE}")
        if self.rate_mbit <= 0:
            raise ConfigError("--rate must be > 0")
        if not 0 <= self.ttl <= 255:
            raise ConfigError("--ttl must be 0..255")
        if self.idle_loops < 1:
            raise ConfigError("--idle-loops must be ≥ 1")
        if not 1 <= self.port_base <= 65535 - self.max_casts:
            raise ConfigError("--port-base leaves no room for the cast ports")
        if self.group is not None:
            try:
                ok = ipaddress.ip_address(self.group).is_multicast
            except ValueError:
                ok = False
            if not ok:
                raise ConfigError(f"--group {self.group} is not a multicast address")
        try:
            last = ipaddress.ip_address(self.base_group) + (self.max_casts - 1)
        except ValueError:
            last = None
        if last is None or not last.is_multicast:
            raise ConfigError(
                f"--group {self.base_group}: {self.max_casts} consecutive groups leave the "
                "multicast range"
            )

    @property
    def send_interface(self) -> str | None:
        """--interface, else the listen address when it names one interface."""
        if self.interface:
            return self.interface
        try:
            addr = ipaddress.ip_address(self.host)
        except ValueError:
            return None
        return None if addr.is_unspecified else str(addr)

    @property
    def base_group(self) -> str:
        if self.group:
            return self.group
        iface = self.send_interface or ""
        return DEFAULT_GROUP_V6 if ":" in iface else DEFAULT_GROUP_V4


@dataclass(slots=True)
class Cast:
    path: str
    key: Path
    slot: int
    group: str
    port: int
    cast_id: int
    ready: asyncio.Future[None]
    source: FileSource | None = None
    core: CastCore | None = None
    sock: socket.socket | None = None
    pacer: Pacer | None = None
    controller: RateController | None = None
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    pages_sent: int = 0
    pages_resent: int = 0
    pages_repeated: int = 0
    parity_sent: int = 0
    nacks: int = 0
    last_join_at: float = 0.0
    tokens: set[str] = field(default_factory=set)


class _AccessLogger(AbstractAccessLogger):
    """Counts and logs every error answer, garbage requests included."""

    metrics: ServerMetrics | None = None

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if response.status >= 400 and self.metrics is not None:
            self.metrics.http_rejected.labels(status=str(response.status)).inc()
            log.info(
                "http.rejected",
                status=response.status,
                method=request.method,
                path=request.raw_path[:200],
                remote=request.remote,
            )

    @property
    def enabled(self) -> bool:
        return True


class BootcastServer:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.metrics = ServerMetrics()
        self.casts: dict[Path, Cast] = {}
        self._tokens: dict[str, tuple[Cast, str]] = {}
        self._slots: set[int] = set()
        self._cast_ids: set[int] = set()
        self._loop = asyncio.get_running_loop()
        # Casts map and hash their file in threads of their own: the default executor is
        # shared with whatever embeds the server and must not be able to starve joins.
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="bootcast-open")
        self.digests = DigestCache()
        if config.prehash_bytes > 0:
            threading.Thread(target=self._prehash, name="bootcast-prehash", daemon=True).start()
        self.app = web.Application(client_max_size=MAX_BODY_BYTES)
        self.app.router.add_get("/join/{path:.*}", self.handle_join)
        self.app.router.add_get("/leave/{path:.*}", self.handle_leave)
        self.app.router.add_post("/nack/{path:.*}", self.handle_nack)
        self.app.router.add_get("/metrics", self.handle_metrics)
        self.app.on_shutdown.append(self._on_shutdown)

    def _prehash(self) -> None:
        cfg = self.config
        try:
            files = self.digests.prehash(cfg.root, cfg.page_size, budget_bytes=cfg.prehash_bytes)
        except OSError as exc:
            log.warning("serve.prehash.failed", error=str(exc))
            return
        log.info("serve.prehashed", files=files)

    # -- HTTP ------------------------------------------------------------------------------

    async def handle_join(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        try:
            real, fd = open_confined(self.config.root, path)
        except PathRejected as exc:
            log.info("join.rejected", path=path[:200], reason=str(exc), remote=request.remote)
            raise web.HTTPNotFound(text="not found\n") from None
        cast = self.casts.get(real)
        if cast is not None and (cast.core is None or cast.core.state is CastState.RUNNING):
            os.close(fd)
        else:
            try:
                cast = self._new_cast(path, real, fd)
            except ConfigError as exc:
                os.close(fd)
                log.warning("cast.refused", path=path, reason=str(exc))
                raise web.HTTPServiceUnavailable(text=f"{exc}\n") from None
        try:
            await asyncio.shield(cast.ready)
        except Exception as exc:
            raise web.HTTPInternalServerError(text=f"cannot cast {path}: {exc}\n") from None
        core, source = cast.core, cast.source
        assert core is not None and source is not None
        if core.state is not CastState.RUNNING:
            raise web.HTTPServiceUnavailable(text="cast is stopping, retry\n")
        token = secrets.token_urlsafe(18)
        wanted = {w.strip() for w in request.headers.get(REPAIR_HEADER, "").lower().split(",")}
        nack_capable = "nack" in wanted
        parity = nack_capable and "parity" in wanted and self.config.parity and source.size > 0
        reply = JoinReply(
            group=cast.group,
            port=cast.port,
            token=token,
            pages=source.pages,
            page_size=source.page_size,
            size=source.size,
            sha256=source.sha256,
            cast_id=cast.cast_id,
            nack_path="/nack/" + quote(path),
            parity_port=cast.port + 1 if parity else None,
            block_pages=core.block_pages if parity else None,
        )
        core.join(token, self._loop.time(), nack_capable=nack_capable, parity=parity)
        # Leaves and NACKs find their cast by token, not by the file, which may have been
        # renamed, replaced or deleted meanwhile (the cast keeps its mapping).
        self._tokens[token] = (cast, path)
        cast.tokens.add(token)
        cast.last_join_at = self._loop.time()
        cast.wake.set()
        self.metrics.joins.inc()
        self.metrics.clients_active.inc()
        log.info(
            "cast.joined",
            path=cast.path,
            cast_id=cast.cast_id,
            clients=core.clients,
            nack=nack_capable,
            parity=parity,
            remote=request.remote,
        )
        return web.Response(text=reply.encode(), content_type="text/plain")

    def _cast_for(self, request: web.Request, token: str) -> Cast | None:
        found = self._tokens.get(token)
        if found is None or found[1] != request.match_info["path"]:
            return None
        return found[0]

    async def handle_leave(self, request: web.Request) -> web.Response:
        token = request.headers.get("X-TOKEN")
        if not token:
            return web.Response(status=400)
        cast = self._cast_for(request, token)
        if cast is None or cast.core is None or not cast.core.leave(token, self._loop.time()):
            return web.Response(status=404)
        self._tokens.pop(token, None)
        cast.tokens.discard(token)
        self.metrics.leaves.inc()
        self.metrics.clients_active.dec()
        log.info("cast.left", path=cast.path, cast_id=cast.cast_id, clients=cast.core.clients)
        cast.wake.set()
        return web.Response(status=200)

    async def handle_nack(self, request: web.Request) -> web.Response:
        token = request.headers.get("X-TOKEN")
        if not token:
            return web.Response(status=400, text="X-TOKEN required\n")
        cast = self._cast_for(request, token)
        if cast is None or cast.core is None or not cast.core.has_client(token):
            return web.Response(status=404, text="no such client\n")
        body = await request.read()
        try:
            report = NackReport.parse(body, pages=cast.core.pages)
        except RemoteProtocolError as exc:
            return web.Response(status=400, text=f"{exc}\n")
        outcome = cast.core.nack(token, report, self._loop.time())
        if outcome is None:
            return web.Response(status=404, text="no such client\n")
        cast.nacks += 1
        self.metrics.nacks.inc()
        self.metrics.nack_pages.labels(outcome="queued").inc(outcome.queued)
        self.metrics.nack_pages.labels(outcome="aggregated").inc(outcome.aggregated)
        self.metrics.nack_pages.labels(outcome="suppressed").inc(outcome.suppressed)
        if cast.controller is not None:
            cast.controller.report(
                token, received=report.received, lost=report.lost, overrun=report.overrun
            )
        if outcome.queued:
            cast.wake.set()
        return web.Response(status=204)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), content_type="text/plain")

    # -- casts -----------------------------------------------------------------------------

    def _new_cast(self, path: str, real: Path, fd: int) -> Cast:
        free = [s for s in range(self.config.max_casts) if s not in self._slots]
        if not free:
            raise ConfigError(f"all {self.config.max_casts} cast slots are busy")
        slot = free[0]
        base = ipaddress.ip_address(self.config.base_group)
        group = str(base + slot)
        cast_id = secrets.randbits(32)
        while cast_id == 0 or cast_id in self._cast_ids:
            cast_id = secrets.randbits(32)
        cast = Cast(
            path=path,
            key=real,
            slot=slot,
            group=group,
            port=self.config.port_base + slot,
            cast_id=cast_id,
            ready=self._loop.create_future(),
        )
        self._slots.add(slot)
        self._cast_ids.add(cast_id)
        self.casts[real] = cast
        cast.task = asyncio.create_task(self._run_cast(cast, fd), name=f"cast {path}")
        return cast

    def _wire_bytes(self, payload_bytes: int, group: str) -> int:
        # Header, trailer, UDP, IP and Ethernet: what the link actually carries.
        return (
            payload_bytes
            + pagecodec.HEADER_BYTES
            + pagecodec.TRAILER_BYTES
            + (62 if is_ipv6(group) else 42)
        )

    async def _run_cast(self, cast: Cast, fd: int) -> None:
        cfg = self.config
        bound = log.bind(path=cast.path, cast_id=cast.cast_id, group=cast.group, port=cast.port)
        try:
            source = await self._loop.run_in_executor(
                self._executor, FileSource.open, cast.key, fd, cfg.page_size, self.digests
            )
            cast.source = source
            cast.sock = sender_socket(cast.group, interface=cfg.send_interface, ttl=cfg.ttl)
        except Exception as exc:
            bound.error("cast.failed", error=str(exc))
            cast.ready.set_exception(exc)
            self._release(cast)
            if cast.source is not None:
                cast.source.close()
            return
        now = self._loop.time()
        full_pass_s = (
            source.pages * self._wire_bytes(cfg.page_size, cast.group) * 8 / (cfg.rate_mbit * 1e6)
        )
        cast.core = CastCore(
            cast_id=cast.cast_id,
            pages=source.pages,
            idle_loops=cfg.idle_loops,
            loop_s=full_pass_s,
            now=now,
            speculate_s=0.3 if cfg.repeat_repairs else 0.0,
        )
        cast.controller = RateController(cfg.rate_mbit) if cfg.adaptive else None
        cast.pacer = Pacer(cast.controller.rate_mbit if cast.controller else cfg.rate_mbit)
        cast.ready.set_result(None)
        self.metrics.casts_started.inc()
        self.metrics.casts_active.inc()
        bound.info(
            "cast.started",
            size=source.size,
            pages=source.pages,
            page_size=source.page_size,
            rate_mbit=cfg.rate_mbit,
            interface=cfg.send_interface or "default",
        )
        try:
            # Clients of one netboot wave join within moments of each other: start once the
            # joins pause for start_delay_s (each client needs that long to join the group
            # after its reply), or at the latest start_wait_max_s after the first.
            first = self._loop.time()
            while True:
                now = self._loop.time()
                quiet_until = max(first, cast.last_join_at) + cfg.start_delay_s
                if now >= quiet_until or now - first >= cfg.start_wait_max_s:
                    break
                await asyncio.sleep(min(quiet_until, first + cfg.start_wait_max_s) - now)
            await self._send_loop(cast, bound)
        except SourceChanged as exc:
            bound.error("cast.source.changed", error=str(exc))
            cast.core.shutdown()
        except asyncio.CancelledError:
            cast.core.shutdown()
            raise
        finally:
            core = cast.core
            reason = core.stop_reason or StopReason.SHUTDOWN
            self.metrics.casts_stopped.labels(reason=reason.value).inc()
            self.metrics.casts_active.dec()
            self.metrics.clients_active.dec(core.clients)
            bound.info(
                "cast.stopped",
                reason=reason.value,
                pages_sent=cast.pages_sent,
                pages_resent=cast.pages_resent,
                pages_repeated=cast.pages_repeated,
                parity_sent=cast.parity_sent,
                nacks=cast.nacks,
                clients_left_behind=core.clients,
                rate_mbit=round(cast.pacer.rate_mbit, 1),
            )
            self._release(cast)
            cast.sock.close()
            source.close()

    def _release(self, cast: Cast) -> None:
        for token in cast.tokens:
            self._tokens.pop(token, None)
        cast.tokens.clear()
        self._slots.discard(cast.slot)
        self._cast_ids.discard(cast.cast_id)
        if self.casts.get(cast.key) is cast:
            del self.casts[cast.key]

    async def _send_loop(self, cast: Cast, bound: Any) -> None:
        core, source, sock, pacer = cast.core, cast.source, cast.sock, cast.pacer
        assert core is not None and source is not None and sock is not None and pacer is not None
        loop = self._loop
        dest = (cast.group, cast.port)
        parity_dest = (cast.group, cast.port + 1)
        cast_id, crcs = cast.cast_id, source.crcs
        pack_header, parity_encode = pagecodec.HEADER.pack, parity.encode_datagram
        carousel_tail = pagecodec.TRAILER.pack(
            pagecodec.TRAILER_MAGIC, pagecodec.TRAILER_VERSION, 0, 0
        )
        repair_tail = pagecodec.TRAILER.pack(
            pagecodec.TRAILER_MAGIC, pagecodec.TRAILER_VERSION, pagecodec.FLAG_REPAIR, 0
        )
        done_tail = pagecodec.TRAILER.pack(
            pagecodec.TRAILER_MAGIC,
            pagecodec.TRAILER_VERSION,
            pagecodec.FLAG_REPAIR | pagecodec.FLAG_CAROUSEL_DONE,
            0,
        )
        overhead = (
            self._wire_bytes(0, cast.group) - pagecodec.HEADER_BYTES - pagecodec.TRAILER_BYTES
        )
        burst = 64
        while True:
            now = loop.time()
            if core.poll(now) is CastState.STOPPED:
                return
            if cast.controller is not None:
                change = cast.controller.poll(now)
                if change is not None:
                    pacer.set_rate(change.rate_mbit)
                    self.metrics.rate_changes.labels(reason=change.reason).inc()
                    bound.info(
                        "cast.rate.changed",
                        rate_mbit=round(change.rate_mbit, 1),
                        reason=change.reason,
                        loss=round(change.loss, 3),
                    )
            delay = pacer.delay(now)
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            sent = 0
            counts = [0, 0, 0, 0]  # carousel, repairs, repeats, parity: metrics per burst
            sent_bytes = 0
            while sent < burst:
                nxt = core.next_page(now)
                if nxt is None:
                    break
                index = nxt.index
                target = dest
                if nxt.symbol is not None:
                    datagram = parity_encode(
                        index,
                        nxt.symbol,
                        cast_id,
                        source.parity_symbol(index, nxt.symbol, core.block_pages),
                        carousel_done=nxt.carousel_done,
                    )
                    target = parity_dest
                else:
                    payload = source.payload(index)
                    # page.encode, without its argument checks: once per datagram
                    datagram = b"".join(
                        (
                            pack_header(len(payload), index, cast_id, crcs[index]),
                            payload,
                            (done_tail if nxt.carousel_done else repair_tail)
                            if nxt.repair
                            else carousel_tail,
                        )
                    )
                try:
                    try:
                        sock.sendto(datagram, target)  # the common case: no coroutine
                    except (BlockingIOError, InterruptedError):
                        await self._send(sock, datagram, target)
                    except OSError as exc:
                        if exc.errno != errno.ENOBUFS:
                            raise
                        await self._send(sock, datagram, target)
                except OSError as exc:
                    # The page is lost; receivers will ask for it again.
                    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                    self.metrics.send_errors.labels(errno=name).inc()
                    bound.warning("cast.send.failed", errno=name, error=exc.strerror)
                    await asyncio.sleep(0.05)
                    break
                if nxt.symbol is not None:
                    counts[3] += 1
                else:
                    counts[2 if nxt.speculative else 1 if nxt.repair else 0] += 1
                sent_bytes += len(datagram)
                pacer.sent(len(datagram) + overhead, now)
                sent += 1
                now = loop.time()
                if pacer.delay(now) > 0:
                    break
            if sent:
                cast.pages_sent += counts[0]
                cast.pages_resent += counts[1]
                cast.pages_repeated += counts[2]
                cast.parity_sent += counts[3]
                self.metrics.parity_sent.inc(counts[3])
                self.metrics.pages_sent.inc(counts[0])
                self.metrics.pages_resent.inc(counts[1])
                self.metrics.pages_repeated.inc(counts[2])
                self.metrics.bytes_sent.inc(sent_bytes)
            if sent:
                await asyncio.sleep(0)
                continue
            # Paused: wait for a join, leave or NACK, or for the idle rule to fire.
            cast.wake.clear()
            timeout = max(0.0, core.idle_deadline(now) - now) + 0.001
            if core.retry_at is not None:
                timeout = min(timeout, max(0.0, core.retry_at - now) + 0.0005)
            paused_at = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cast.wake.wait(), min(timeout, 1.0))
            bound.debug(
                "cast.paused",
                paused_s=round(loop.time() - paused_at, 4),
                pages_sent=cast.pages_sent,
                pages_resent=cast.pages_resent,
            )

    async def _send(self, sock: socket.socket, datagram: bytes, dest: tuple[str, int]) -> None:
        """Send one datagram; a full local queue (ENOBUFS) is waited out, not a loss."""
        for attempt in range(200):
            try:
                await self._loop.sock_sendto(sock, datagram, dest)
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS or attempt == 199:
                    raise
                self.metrics.send_errors.labels(errno="ENOBUFS_retried").inc()
                await asyncio.sleep(0.001)

    async def _on_shutdown(self, app: web.Application) -> None:
        await self.close()

    async def close(self) -> None:
        tasks = [c.task for c in list(self.casts.values()) if c.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._executor.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict[str, float]:
        return self.metrics.snapshot()


async def start_server(config: ServeConfig) -> tuple[BootcastServer, web.AppRunner, int]:
    """Build and start a server; returns (server, runner, bound port) — port 0 works."""
    quiet_aiohttp()
    server = BootcastServer(config)
    access_logger = type("AccessLogger", (_AccessLogger,), {"metrics": server.metrics})
    runner = web.AppRunner(
        server.app,
        access_log_class=access_logger,
        handle_signals=False,
        max_line_size=8190,
        max_field_size=8190,
    )
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
    await site.start()
    addresses = runner.addresses
    port = int(addresses[0][1]) if addresses else config.port
    return server, runner, port
