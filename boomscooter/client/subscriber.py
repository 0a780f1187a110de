"""``boomscooter.Subscriber``: committed records, in order, exactly once.

::

    async with Subscriber("leader:7700", start="earliest") as sub:
        async for record in sub:             # Record(seqno, timestamp_ms, channel, key, payload)
            ...

    with Subscriber("leader:7700", count=10) as sub:   # the same, blocking
        for record in sub:
            ...

Modes: ``multicast`` (the default: the leader's page stream, loss repaired and backlog
caught up with Fetch; falls back to ``unicast`` when no page arrives within
``multicast_timeout_s``), ``unicast`` (the Subscribe stream) and ``notifications`` (read
the segment files directly; for readers on the server's host). ``start`` is a seqno,
``"earliest"``, ``"latest"`` (records committed from now on) or — with ``start_time_ms`` —
the first record at or after a time. ``until`` (inclusive seqno) or ``count`` end the
subscription; ``channel`` keeps records whose channel starts with the prefix.

Errors are explicit, never a silent gap: :class:`~boomscooter.errors.TrimmedError` when
the start (or the catch-up) is below what retention kept, and
:class:`~boomscooter.errors.ServerUnavailableError` when the server stays unreachable for
``server_timeout_s``. ``batches()`` yields lists of records (one list per stored batch or
more) for speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc

from boomscooter.client._multicast import MulticastEngine, NoMulticast
from boomscooter.client._notifications import NotificationsEngine
from boomscooter.client._retry import Retry
from boomscooter.client._servers import ServerList
from boomscooter.client._unicast import UnicastEngine
from boomscooter.client.blocking import BackgroundLoop
from boomscooter.client.delivery import Delivery
from boomscooter.errors import ConfigError, ServerUnavailableError, TrimmedError
from boomscooter.rpc import create_channel
from boomscooter.storage.batch import Record
from boomscooter.v1 import boomscooter_pb2 as pb
from boomscooter.v1 import boomscooter_pb2_grpc as pb_grpc
from bootcast.logs import get_logger

log = get_logger("boomscooter.subscriber")

MODES = ("multicast", "unicast", "notifications")
_END = object()


class Subscriber:
    """See the module docstring."""

    def __init__(
        self,
        server: str,
        *,
        start: int | str = "latest",
        start_time_ms: int | None = None,
        until: int | None = None,
        count: int | None = None,
        channel: str | None = None,
        mode: str = "multicast",
        interface: str | None = None,
        data_dir: str | None = None,
        min_interval_ms: int = 10,
        multicast_timeout_s: float = 2.0,
        server_timeout_s: float = 30.0,
        subscriber_id: str = "",
        max_queued_batches: int = 256,
        page_filter: Callable[[bytes], bool] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if isinstance(start, str) and start not in ("earliest", "latest"):
            raise ConfigError(f"start must be a seqno, 'earliest' or 'latest', got {start!r}")
        if isinstance(start, int) and start < 1:
            raise ConfigError(f"start seqno must be at least 1, got {start}")
        if until is not None and count is not None:
            raise ConfigError("give until or count, not both")
        if count is not None and count < 1:
            raise ConfigError("count must be at least 1")
        if until is not None and until < 1:
            raise ConfigError("until must be at least 1")
        self._servers = ServerList(server)
        self.server = self._servers.current  # the node followed now (failover moves it)
        self.start = start
        self.start_time_ms = start_time_ms
        self.until = until
        self.count = count
        self.channel = channel
        self.mode = mode
        self.interface = interface
        self.data_dir = data_dir
        self.min_interval_ms = min_interval_ms
        self.multicast_timeout_s = multicast_timeout_s
        # With several nodes, a silent one is given up sooner: another can serve.
        self.server_timeout_s = (
            server_timeout_s
            if len(self._servers.servers) == 1
            else max(2.0, server_timeout_s / len(self._servers.servers))
        )
        self.subscriber_id = subscriber_id
        # For tests: multicast datagrams for which it returns False are dropped (as lost).
        self.page_filter = page_filter
        self.active_mode = ""
        self.delivery: Delivery | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue(max_queued_batches)
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None
        self._engine: Any = None
        self._sync: _SyncRunner | None = None

    # -- async API --------------------------------------------------------------------------

    async def __aenter__(self) -> Subscriber:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        self._channel = create_channel(self.server)
        self._task = asyncio.create_task(self._run(), name="subscriber")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def __aiter__(self) -> AsyncIterator[Record]:
        return self._records()

    async def _records(self) -> AsyncIterator[Record]:
        async for records in self.batches():
            for record in records:
                yield record

    async def batches(self) -> AsyncIterator[list[Record]]:
        """Records in lists as they arrive (the fast path: no per-record await)."""
        if self._task is None:
            await self.open()
        while True:
            item = await self._queue.get()
            if item is _END:
                self._queue.put_nowait(_END)
                return
            if isinstance(item, BaseException):
                self._queue.put_nowait(item)
                raise item
            yield item

    @property
    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.active_mode}
        if self.delivery is not None:
            out.update(
                delivered=self.delivery.stats.records,
                next_seqno=self.delivery.next_seqno,
                commit_seqno=self.delivery.commit_seqno,
            )
        if self._engine is not None:
            out.update(self._engine.stats)
            out.update({f"drop_{k}": v for k, v in getattr(self._engine, "drops", {}).items()})
        return out

    # -- the subscription -------------------------------------------------------------------

    async def _emit(self, records: list[Record]) -> None:
        await self._queue.put(records)

    async def _run(self) -> None:
        try:
            await self._follow_servers()
            await self._queue.put(_END)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("subscriber.failed", error=str(exc), kind=type(exc).__name__)
            await self._queue.put(exc)

    async def _follow_servers(self) -> None:
        """Subscribe on the current node; when it stays unreachable and other nodes were
        given, go on from the next delivery seqno on the next node (failover). Gives up
        after a whole round of the nodes without a record delivered."""
        tried, progress = 0, -1
        while True:
            try:
                await self._subscribe()
                return
            except ServerUnavailableError as exc:
                delivered = self.delivery.next_seqno if self.delivery is not None else 0
                tried = 0 if delivered != progress else tried + 1
                progress = delivered
                if self.mode == "notifications" or tried >= len(self._servers.servers):
                    raise
                if not self._servers.rotate():
                    raise
                log.warning("subscriber.failover", previous=self.server,
                            server=self._servers.current, error=str(exc))  # fmt: skip
                self.server = self._servers.current
                if self._channel is not None:
                    await self._channel.close()
                self._channel = create_channel(self.server)

    async def _handshake(self, stub: Any) -> pb.HandshakeResponse:
        retry = Retry(self.server_timeout_s, address=self.server, connecting=True)
        while True:
            try:
                request = pb.HandshakeRequest(subscriber_id=self.subscriber_id)
                response: pb.HandshakeResponse = await stub.Handshake(request, timeout=5)
                return response
            except grpc.aio.AioRpcError as exc:
                await retry.failed(exc)

    async def _start_seqno(self, stub: Any, hello: pb.HandshakeResponse) -> int:
        if self.start_time_ms is not None:
            return await self._seqno_at_time(stub, hello)
        if self.start == "earliest":
            return hello.first_seqno
        if self.start == "latest":
            return hello.commit_seqno + 1
        assert isinstance(self.start, int)
        if self.start < hello.first_seqno:
            raise TrimmedError(
                f"seqno {self.start} is below the first available seqno {hello.first_seqno}",
                first_seqno=hello.first_seqno,
            )
        return self.start

    async def _seqno_at_time(self, stub: Any, hello: pb.HandshakeResponse) -> int:
        """The first seqno at or after ``start_time_ms``: the server's Subscribe by time
        answers with that record once it is committed, or with a heartbeat (within a
        second) when no stored record is that recent — then the next record is the start."""
        assert self.start_time_ms is not None
        retry = Retry(self.server_timeout_s, address=self.server)
        request = pb.SubscribeRequest(time_ms=self.start_time_ms, count=1)
        while True:
            call = stub.Subscribe(request)
            try:
                async for response in call:
                    if response.batches:
                        return max(int(response.first_seqno), hello.first_seqno)
                    return int(hello.last_seqno) + 1
            except grpc.aio.AioRpcError as exc:
                await retry.failed(exc)
            finally:
                call.cancel()

    async def _subscribe(self) -> None:
        assert self._channel is not None
        stub = pb_grpc.BoomscooterStub(self._channel)
        hello = await self._handshake(stub)
        if self.delivery is None:
            start = await self._start_seqno(stub, hello)
            self.delivery = Delivery(start, until=self.until, count=self.count,
                                     channel=self.channel)  # fmt: skip
        else:  # failed over: go on where delivery stands; what was not committed may change
            start = self.delivery.next_seqno
            self.delivery.drop_uncommitted()
        delivery = self.delivery
        log.info("subscriber.started", server=self.server, mode=self.mode, start=start)
        mode = self.mode
        if mode == "multicast" and not hello.session.group:
            log.warning("subscriber.no_multicast", reason="the server does not multicast")
            mode = "unicast"
        if mode == "multicast":
            self.active_mode = "multicast"
            self._engine = MulticastEngine(
                stub,
                delivery,
                hello,
                interface=self.interface,
                emit=self._emit,
                rehandshake=lambda: self._handshake(stub),
                multicast_timeout_s=self.multicast_timeout_s,
                server_timeout_s=self.server_timeout_s,
                page_filter=self.page_filter,
            )
            try:
                await self._engine.run()
                return
            except NoMulticast as exc:
                log.warning("subscriber.fallback_unicast", reason=str(exc))
                delivery.drop_uncommitted()
                ready = self._engine.take_ready() + delivery.release()
                if ready:
                    await self._emit(ready)
                mode = "unicast"
        if mode == "unicast":
            self.active_mode = "unicast"
            self._engine = UnicastEngine(
                stub, delivery, emit=self._emit, server_timeout_s=self.server_timeout_s
            )
        else:
            self.active_mode = "notifications"
            self._engine = NotificationsEngine(
                stub,
                delivery,
                emit=self._emit,
                data_dir=self.data_dir,
                min_interval_ms=self.min_interval_ms,
                server_timeout_s=self.server_timeout_s,
            )
        await self._engine.run()

    # -- sync API ---------------------------------------------------------------------------

    def __enter__(self) -> Subscriber:
        self._sync = _SyncRunner(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sync is not None:
            self._sync.stop()
            self._sync = None

    def __iter__(self) -> Iterator[Record]:
        for records in self.iter_batches():
            yield from records

    def iter_batches(self) -> Iterator[list[Record]]:
        """Blocking ``batches()`` (inside ``with Subscriber(...)``)."""
        if self._sync is None:
            raise RuntimeError("use 'with Subscriber(...) as sub:' for blocking iteration")
        return self._sync.batches()


class _SyncRunner:
    """Runs the async subscriber on a background loop; hands its batches over a queue."""

    def __init__(self, subscriber: Subscriber) -> None:
        self.subscriber = subscriber
        self._out: queue.Queue[Any] = queue.Queue(64)
        self._stopping = False
        self._background = BackgroundLoop("subscriber-sync")
        self._pumping = asyncio.run_coroutine_threadsafe(self._pump(), self._background.loop)

    async def _pump(self) -> None:
        sub = self.subscriber
        sub._queue = asyncio.Queue(sub._queue.maxsize)
        try:
            async with sub:
                async for records in sub.batches():
                    await self._put(records)
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            await self._put(exc)
        finally:
            self._end()

    async def _put(self, item: Any) -> None:
        while not self._stopping:
            try:
                self._out.put_nowait(item)
                return
            except queue.Full:
                await asyncio.sleep(0.005)

    def _end(self) -> None:
        """The consumer must wake up and stop, even when the queue is full."""
        while True:
            try:
                self._out.put_nowait(_END)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._out.get_nowait()

    def batches(self) -> Iterator[list[Record]]:
        while True:
            item = self._out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def stop(self) -> None:
        self._stopping = True
        self._background.cancel_all()
        with contextlib.suppress(BaseException):  # its end was handed over already
            self._pumping.result(timeout=10)
        self._background.close(timeout_s=10)
