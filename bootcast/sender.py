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
from .cast import CastCore, CastState, NextPage
from .mcast import is_ipv6
from .metrics import ServerMetrics
from .pacing import Pacer, RateController
from .source import FileSource

BURST = 64  # datagrams sent between two looks at the event loop


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


class _Framer:
    """Frames the cast's pages and parity symbols into datagrams (page.encode without its
    argument checks: this runs once per datagram)."""

    def __init__(self, cast: Cast, source: FileSource) -> None:
        self.cast_id, self.source, self.crcs = cast.cast_id, source, source.crcs
        self.dest, self.parity_dest = (cast.group, cast.port), (cast.group, cast.port + 1)
        trailer, magic, version = (
            pagecodec.TRAILER.pack,
            pagecodec.TRAILER_MAGIC,
            pagecodec.TRAILER_VERSION,
        )
        self.carousel_tail = trailer(magic, version, 0, 0)
        self.repair_tail = trailer(magic, version, pagecodec.FLAG_REPAIR, 0)
        done = pagecodec.FLAG_REPAIR | pagecodec.FLAG_CAROUSEL_DONE
        self.done_tail = trailer(magic, version, done, 0)
        self.pack_header = pagecodec.HEADER.pack
        self.overhead = wire_bytes(0, cast.group) - pagecodec.HEADER_BYTES - pagecodec.TRAILER_BYTES

    def frame(self, nxt: NextPage, block_pages: int) -> tuple[bytes, tuple[str, int]]:
        index = nxt.index
        if nxt.symbol is not None:
            symbol = self.source.parity_symbol(index, nxt.symbol, block_pages)
            datagram = parity.encode_datagram(
                index, nxt.symbol, self.cast_id, symbol, carousel_done=nxt.carousel_done
            )
            return datagram, self.parity_dest
        payload = self.source.payload(index)
        if nxt.repair:
            tail = self.done_tail if nxt.carousel_done else self.repair_tail
        else:
            tail = self.carousel_tail
        header = self.pack_header(len(payload), index, self.cast_id, self.crcs[index])
        return b"".join((header, payload, tail)), self.dest


async def send_loop(cast: Cast, metrics: ServerMetrics, bound: Any) -> None:
    """Send the cast's pages as its core schedules them, paced, until it stops."""
    core, source, sock, pacer = cast.core, cast.source, cast.sock, cast.pacer
    assert core is not None and source is not None and sock is not None and pacer is not None
    loop = asyncio.get_running_loop()
    framer = _Framer(cast, source)
    while True:
        now = loop.time()
        if core.poll(now) is CastState.STOPPED:
            return
        _follow_rate(cast, pacer, metrics, bound, now)
        delay = pacer.delay(now)
        if delay > 0:
            await asyncio.sleep(delay)
            continue
        if await _burst(cast, framer, metrics, bound):
            await asyncio.sleep(0)
            continue
        await _pause(cast, bound)


def _follow_rate(cast: Cast, pacer: Pacer, metrics: ServerMetrics, bound: Any, now: float) -> None:
    """The rate controller's verdict on the receivers' reports, applied to the pacer."""
    if cast.controller is None:
        return
    change = cast.controller.poll(now)
    if change is not None:
        pacer.set_rate(change.rate_mbit)
        metrics.rate_changes.labels(reason=change.reason).inc()
        bound.info("cast.rate.changed", rate_mbit=round(change.rate_mbit, 1),
                   reason=change.reason, loss=round(change.loss, 3))  # fmt: skip


async def _burst(cast: Cast, framer: _Framer, metrics: ServerMetrics, bound: Any) -> int:
    """Send up to ``BURST`` datagrams while the pacer allows; returns how many went out."""
    core, sock, pacer = cast.core, cast.sock, cast.pacer
    assert core is not None and sock is not None and pacer is not None
    loop = asyncio.get_running_loop()
    now = loop.time()
    counts = [0, 0, 0, 0]  # carousel, repairs, repeats, parity: metrics per burst
    sent = sent_bytes = 0
    while sent < BURST:
        nxt = core.next_page(now)
        if nxt is None:
            break
        datagram, target = framer.frame(nxt, core.block_pages)
        try:
            sock.sendto(datagram, target)  # the common case: no coroutine
        except OSError as exc:
            if not await _send_blocked(exc, sock, datagram, target, metrics, bound):
                break  # the page is lost; receivers will ask for it again
        if nxt.symbol is not None:
            counts[3] += 1
        else:
            counts[2 if nxt.speculative else 1 if nxt.repair else 0] += 1
        sent_bytes += len(datagram)
        pacer.sent(len(datagram) + framer.overhead, now)
        sent += 1
        now = loop.time()
        if pacer.delay(now) > 0:
            break
    if sent:
        _count(cast, metrics, counts, sent_bytes)
    return sent


async def _send_blocked(
    exc: OSError,
    sock: socket.socket,
    datagram: bytes,
    target: tuple[str, int],
    metrics: ServerMetrics,
    bound: Any,
) -> bool:
    """A ``sendto`` that did not go through: a full local queue is waited out; any other
    error loses the page (True when it went out after all)."""
    try:
        if not isinstance(exc, BlockingIOError | InterruptedError) and exc.errno != errno.ENOBUFS:
            raise exc
        await _send(sock, datagram, target, metrics)
        return True
    except OSError as failed:
        name = errno.errorcode.get(failed.errno or 0, str(failed.errno))
        metrics.send_errors.labels(errno=name).inc()
        bound.warning("cast.send.failed", errno=name, error=failed.strerror)
        await asyncio.sleep(0.05)
        return False


def _count(cast: Cast, metrics: ServerMetrics, counts: list[int], sent_bytes: int) -> None:
    cast.pages_sent += counts[0]
    cast.pages_resent += counts[1]
    cast.pages_repeated += counts[2]
    cast.parity_sent += counts[3]
    metrics.parity_sent.inc(counts[3])
    metrics.pages_sent.inc(counts[0])
    metrics.pages_resent.inc(counts[1])
    metrics.pages_repeated.inc(counts[2])
    metrics.bytes_sent.inc(sent_bytes)


async def _pause(cast: Cast, bound: Any) -> None:
    """Paused: wait for a join, leave or NACK, or for the idle rule (or a repeat) due."""
    core = cast.core
    assert core is not None
    loop = asyncio.get_running_loop()
    now = loop.time()
    cast.wake.clear()
    timeout = max(0.0, core.idle_deadline(now) - now) + 0.001
    if core.retry_at is not None:
        timeout = min(timeout, max(0.0, core.retry_at - now) + 0.0005)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(cast.wake.wait(), min(timeout, 1.0))
    bound.debug("cast.paused", paused_s=round(loop.time() - now, 4),
                pages_sent=cast.pages_sent, pages_resent=cast.pages_resent)  # fmt: skip


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
