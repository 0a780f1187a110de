"""Multicast mode: the page stream, repaired and caught up with ``Fetch``.

The socket is drained in the event loop's reader callback straight into a
:class:`~boomscooter.stream.StreamReceiver`; its events feed the :class:`Delivery` (batches,
commit) and a fetch queue (gaps: mid-stream loss, tail loss behind a heartbeat, and the
backlog between the start seqno and the live stream, which the receiver reports as one
gap). One fetch worker reads the gaps in order, in chunks, through the receiver's
``repaired`` door, so a batch fetched and the same batch multicast are delivered once.
Fetch returns committed records only; a gap past the commit point waits for the commit.

No valid page within ``multicast_timeout_s`` of joining (multicast not routed, a firewall)
raises :class:`NoMulticast`, and the subscriber falls back to unicast. A new epoch
(failover) restarts the receiver from where delivery stands after a new handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from boomscooter.client._retry import Retry
from boomscooter.client.delivery import Delivery
from boomscooter.errors import ServerUnavailableError
from boomscooter.storage.batch import Record, split_batches
from boomscooter.stream import BatchReceived, CommitAdvanced, EpochChanged, Gap
from boomscooter.stream.listener import StreamListener, listen
from boomscooter.v1 import boomscooter_pb2 as pb
from bootcast.logs import get_logger

log = get_logger("boomscooter.subscriber")

FETCH_BYTES = 4 << 20
_MAX_PENDING_RECORDS = 1_000_000


class NoMulticast(Exception):
    """No page arrived: multicast does not reach this host."""


class MulticastEngine:
    def __init__(
        self,
        stub: Any,
        delivery: Delivery,
        handshake: pb.HandshakeResponse,
        *,
        interface: str | None,
        emit: Callable[[list[Record]], Awaitable[None]],
        rehandshake: Callable[[], Awaitable[pb.HandshakeResponse]],
        multicast_timeout_s: float,
        server_timeout_s: float,
        page_filter: Callable[[bytes], bool] | None = None,
    ) -> None:
        self.stub = stub
        self.page_filter = page_filter
        self.delivery = delivery
        self.session = handshake.session
        self.interface = interface or self.session.interface_hint or None
        self.emit = emit
        self.rehandshake = rehandshake
        self.multicast_timeout_s = multicast_timeout_s
        self.server_timeout_s = server_timeout_s
        self._counts = {"fetches": 0, "fetched_batches": 0, "gaps": 0, "epochs": 0}
        self._loop = asyncio.get_running_loop()
        self._gaps: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._commit_moved = asyncio.Event()
        self._drained = asyncio.Event()  # _ready was handed to the application
        self._new_epoch: int | None = None
        self._ready: list[Record] = []
        self._listener: StreamListener | None = None
        self._closed_pages = 0  # pages of listeners closed before the current one
        self._drops: dict[str, int] = {}  # of closed listeners
        self.delivery.commit(handshake.commit_seqno)

    # -- the stream (boomscooter.stream.listener) ----------------------------------------

    def _join(self) -> None:
        session = self.session
        self._listener = listen(
            session,
            self.delivery.received_end,
            interface=self.interface,
            sink=self._handle,
            page_filter=self.page_filter,
            gaps=self._gaps,
        )
        log.info(
            "subscriber.joined",
            group=f"{session.group}:{session.port}",
            epoch=session.epoch,
            interface=self.interface or "default",
            next_seqno=self.delivery.received_end,
        )

    def _leave(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
            self._closed_pages += listener.pages
            for reason, n in listener.drops.items():
                self._drops[reason] = self._drops.get(reason, 0) + n

    @property
    def stats(self) -> dict[str, int]:
        pages = self._closed_pages + (self._listener.pages if self._listener else 0)
        return {"pages": pages, **self._counts}

    @property
    def drops(self) -> dict[str, int]:
        """Dropped datagrams by reason (the socket's source filter and the receiver's)."""
        out = dict(self._drops)
        if (listener := self._listener) is not None:
            live = [*listener.drops.items()]
            live += [(r.value, n) for r, n in listener.receiver.drops.items()]
            for reason, n in live:
                out[reason] = out.get(reason, 0) + n
        return out

    def _handle(self, events: list[Any]) -> None:
        delivery = self.delivery
        for event in events:
            if isinstance(event, BatchReceived):
                delivery.add(event.batch)
            elif isinstance(event, CommitAdvanced):
                delivery.commit(event.commit_seqno)
                self._commit_moved.set()
            elif isinstance(event, Gap):
                self._counts["gaps"] += 1
            elif isinstance(event, EpochChanged):
                self._new_epoch = event.epoch
        self._ready.extend(delivery.release())
        if self._ready or self._new_epoch is not None or delivery.done:
            self._wake.set()
        if self._listener is not None and len(self._ready) > _MAX_PENDING_RECORDS:
            self._listener.pause()  # the application is behind

    # -- fetch side ----------------------------------------------------------------------

    async def _fetch_worker(self) -> None:
        while True:
            start, end = await self._gaps.get()
            if self._listener is not None:
                await self._fetch_range(self._listener, start, end)

    async def _fetch_range(self, listener: StreamListener, start: int, end: int) -> None:
        while listener is self._listener and listener.open:
            start = max(start, listener.receiver.next_seqno)
            if start > end:
                return
            if start > self.delivery.commit_seqno:  # not committed yet: Fetch has nothing
                self._commit_moved.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._commit_moved.wait()
                if start > self.delivery.commit_seqno:
                    continue
            while len(self._ready) > _MAX_PENDING_RECORDS:  # the application is behind
                self._drained.clear()
                await self._drained.wait()
            response = await self._call_fetch(start, end)
            self._counts["fetches"] += 1
            self.delivery.commit(response.commit_seqno)
            if not response.batches:
                return
            for batch in split_batches(response.batches):
                self._counts["fetched_batches"] += 1
                listener.repaired(batch.data)
            start = response.last_seqno + 1

    async def _call_fetch(self, start: int, end: int) -> pb.FetchResponse:
        retry = Retry(self.server_timeout_s)
        while True:
            try:
                request = pb.FetchRequest(from_seqno=start, to_seqno=end, max_bytes=FETCH_BYTES)
                response: pb.FetchResponse = await self.stub.Fetch(request, timeout=10)
                return response
            except grpc.aio.AioRpcError as exc:
                log.info("subscriber.fetch_retry", error=exc.code().name, seqno=start)
                await retry.failed(exc)

    # -- main loop -----------------------------------------------------------------------

    def take_ready(self) -> list[Record]:
        """Records released but not yet emitted (the subscriber emits them on fallback)."""
        ready, self._ready = self._ready, []
        self._drained.set()
        return ready

    async def run(self) -> None:
        self._join()
        worker = asyncio.create_task(self._fetch_worker(), name="subscriber-fetch")
        try:
            while not self.delivery.done or self._ready:
                if worker.done():
                    worker.result()  # re-raise its failure
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.25):
                        await self._wake.wait()
                self._wake.clear()
                if self._ready:
                    await self.emit(self.take_ready())
                    if self._listener is not None:
                        self._listener.resume()
                    continue
                if self._new_epoch is not None:
                    await self._restart_epoch()
                    continue
                await self._check_pages()
        finally:
            worker.cancel()
            self._leave()

    async def _check_pages(self) -> None:
        listener = self._listener
        if listener is None:
            return
        now = self._loop.time()
        if not listener.pages_seen and now - listener.joined_at > self.multicast_timeout_s:
            raise NoMulticast(
                f"no page from {self.session.group}:{self.session.port} within "
                f"{self.multicast_timeout_s:.1f} s"
            )
        if listener.pages_seen and now - listener.last_page_at > self.multicast_timeout_s:
            await self._check_server(listener.last_page_at)

    async def _check_server(self, last_page_at: float) -> None:
        """Pages stopped: the leader is gone (wait for it, up to server_timeout_s), or
        multicast stopped reaching us while it lives (fall back to unicast)."""
        try:
            await self.stub.Status(pb.StatusRequest(), timeout=2)
        except grpc.aio.AioRpcError as exc:
            if self._loop.time() - last_page_at > self.server_timeout_s:
                raise ServerUnavailableError(
                    f"lost the server: no page and no answer for {self.server_timeout_s:.0f} s "
                    f"({exc.code().name})"
                ) from exc
            return
        response = await self.rehandshake()
        if not self._same_stream(response.session):
            self._restart_session(response)
            return
        raise NoMulticast("the server answers but its pages stopped arriving")

    async def _restart_epoch(self) -> None:
        self._new_epoch = None
        response = await self.rehandshake()
        if self._same_stream(response.session):
            # A page with a newer cast id, but the server has not moved on: a stray or
            # forged datagram. The receiver counted and dropped it; carry on.
            self._counts["foreign_epochs"] = self._counts.get("foreign_epochs", 0) + 1
            return
        self._restart_session(response)

    def _same_stream(self, session: pb.MulticastSession) -> bool:
        current = self.session
        return (session.epoch, session.source_port) == (current.epoch, current.source_port)

    def _restart_session(self, response: pb.HandshakeResponse) -> None:
        """A new epoch (failover) or a restarted leader (a new source port): what was
        received but not committed may be replaced, so it is dropped and fetched again."""
        self._counts["sessions"] = self._counts.get("sessions", 0) + 1
        if response.session.epoch != self.session.epoch:
            self._counts["epochs"] += 1
        self._leave()
        self.delivery.drop_uncommitted()
        self.session = response.session
        self.delivery.commit(response.commit_seqno)
        log.info(
            "subscriber.new_session",
            epoch=self.session.epoch,
            source_port=self.session.source_port,
        )
        self._join()
