"""One cast's sending side: the :class:`Cast` record the server keeps per cast, and the
paced send loop that carries out what the cast's core (``cast.py``) schedules — carousel
pages, repairs and parity symbols (``parity.py``) — on the cast's socket.

The common case sends without a coroutine switch (``sendto`` on a non-blocking socket); a
full local queue (``ENOBUFS``, ``EAGAIN``: a ``tbf`` qdisc or the socket buffer) is waited
out, not counted as a loss. Per-burst metrics keep the per-datagram work small.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import page as pagecodec
from . import parity
from .cast import CastCore, CastState
from .mcast import is_ipv6
from .metrics import ServerMetrics
from .pacing import Pacer, RateController
from .source import FileSource


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


def wire_bytes(payload_bytes: int, group: str) -> int:
    # Header, trailer, UDP, IP and Ethernet: what the link actually carries.
    return (
        payload_bytes
        + pagecodec.HEADER_BYTES
        + pagecodec.TRAILER_BYTES
        + (62 if is_ipv6(group) else 42)
    )


async def send_loop(cast: Cast, metrics: ServerMetrics, bound: Any) -> None:
    """Send the cast's pages as its core schedules them, paced, until it stops."""
    core, source, sock, pacer = cast.core, cast.source, cast.sock, cast.pacer
    assert core is not None and source is not None and sock is not None and pacer is not None
    loop = asyncio.get_running_loop()
    dest = (cast.group, cast.port)
    parity_dest = (cast.group, cast.port + 1)
    cast_id, crcs = cast.cast_id, source.crcs
    pack_header, parity_encode = pagecodec.HEADER.pack, parity.encode_datagram
    carousel_tail = pagecodec.TRAILER.pack(pagecodec.TRAILER_MAGIC, pagecodec.TRAILER_VERSION, 0, 0)
    repair_tail = pagecodec.TRAILER.pack(
        pagecodec.TRAILER_MAGIC, pagecodec.TRAILER_VERSION, pagecodec.FLAG_REPAIR, 0
    )
    done_tail = pagecodec.TRAILER.pack(
        pagecodec.TRAILER_MAGIC,
        pagecodec.TRAILER_VERSION,
        pagecodec.FLAG_REPAIR | pagecodec.FLAG_CAROUSEL_DONE,
        0,
    )
    overhead = wire_bytes(0, cast.group) - pagecodec.HEADER_BYTES - pagecodec.TRAILER_BYTES
    burst = 64
    while True:
        now = loop.time()
        if core.poll(now) is CastState.STOPPED:
            return
        if cast.controller is not None:
            change = cast.controller.poll(now)
            if change is not None:
                pacer.set_rate(change.rate_mbit)
                metrics.rate_changes.labels(reason=change.reason).inc()
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
                    await _send(sock, datagram, target, metrics)
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    await _send(sock, datagram, target, metrics)
            except OSError as exc:
                # The page is lost; receivers will ask for it again.
                name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                metrics.send_errors.labels(errno=name).inc()
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
            metrics.parity_sent.inc(counts[3])
            metrics.pages_sent.inc(counts[0])
            metrics.pages_resent.inc(counts[1])
            metrics.pages_repeated.inc(counts[2])
            metrics.bytes_sent.inc(sent_bytes)
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


async def _send(
    sock: socket.socket, datagram: bytes, dest: tuple[str, int], metrics: ServerMetrics
) -> None:
    """Send one datagram; a full local queue (ENOBUFS) is waited out, not a loss."""
    for attempt in range(200):
        try:
            await asyncio.get_running_loop().sock_sendto(sock, datagram, dest)
            return
        except OSError as exc:
            if exc.errno != errno.ENOBUFS or attempt == 199:
                raise
            metrics.send_errors.labels(errno="ENOBUFS_retried").inc()
            await asyncio.sleep(0.001)
