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
import ipaddress
import os
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from . import page as pagecodec
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
from .mcast import sender_socket
from .metrics import ServerMetrics
from .nack import MAX_BODY_BYTES, NackReport
from .pacing import Pacer, RateController
from .paths import open_confined
from .sender import Cast, send_loop, wire_bytes
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
    # Embedding (boomscooter casts its sealed segments): join paths must start with
    # ``path_prefix`` (stripped before resolving under ``root``) and pass ``allow``.
    path_prefix: str = ""
    allow: Callable[[str], bool] | None = None

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
            raise ConfigError("leaves no room for the cast ports", option="--port-base")
        if self.group is not None:
            try:
                ok = ipaddress.ip_address(self.group).is_multicast
            except ValueError:
                ok = False
            if not ok:
                raise ConfigError(f"{self.group} is not a multicast address", option="--group")
        try:
            last = ipaddress.ip_address(self.base_group) + (self.max_casts - 1)
        except ValueError:
            last = None
        if last is None or not last.is_multicast:
            raise ConfigError(
                f"{self.base_group}: {self.max_casts} consecutive groups leave the multicast range",
                option="--group",
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
        prefix, allow = self.config.path_prefix, self.config.allow
        try:
            if not path.startswith(prefix):
                raise PathRejected(f"not under /join/{prefix}")
            if allow is not None and not allow(path[len(prefix) :]):
                raise PathRejected("not offered")
            real, fd = open_confined(self.config.root, path[len(prefix) :])
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
            source.pages * wire_bytes(cfg.page_size, cast.group) * 8 / (cfg.rate_mbit * 1e6)
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
            await self._joins_settle(cast)
            await send_loop(cast, self.metrics, bound)
        except SourceChanged as exc:
            bound.error("cast.source.changed", error=str(exc))
            cast.core.shutdown()
        except asyncio.CancelledError:
            cast.core.shutdown()
            raise
        finally:
            self._stopped(cast, bound)
            source.close()

    async def _joins_settle(self, cast: Cast) -> None:
        """Clients of one netboot wave join within moments of each other: start once the
        joins pause for start_delay_s (each client needs that long to join the group after
        its reply), or at the latest start_wait_max_s after the first."""
        cfg = self.config
        first = self._loop.time()
        while True:
            now = self._loop.time()
            quiet_until = max(first, cast.last_join_at) + cfg.start_delay_s
            if now >= quiet_until or now - first >= cfg.start_wait_max_s:
                return
            await asyncio.sleep(min(quiet_until, first + cfg.start_wait_max_s) - now)

    def _stopped(self, cast: Cast, bound: Any) -> None:
        core, pacer, sock = cast.core, cast.pacer, cast.sock
        assert core is not None and pacer is not None and sock is not None
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
            rate_mbit=round(pacer.rate_mbit, 1),
        )
        self._release(cast)
        sock.close()

    def _release(self, cast: Cast) -> None:
        for token in cast.tokens:
            self._tokens.pop(token, None)
        cast.tokens.clear()
        self._slots.discard(cast.slot)
        self._cast_ids.discard(cast.cast_id)
        if self.casts.get(cast.key) is cast:
            del self.casts[cast.key]

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
