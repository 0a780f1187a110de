"""The blocking producer: :class:`SyncProducer` runs a :class:`Producer` on an event
loop in a background thread (see :mod:`boomscooter.client.producer`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections import deque
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from boomscooter.client._accumulator import DEFAULT, DefaultChannel, ProduceResult
from boomscooter.client.blocking import BackgroundLoop
from boomscooter.client.producer import Producer
from boomscooter.errors import ClientError, RequestError
from boomscooter.storage.batch import Entry

__all__ = ["SyncProducer"]


class SyncProducer:
    """The blocking twin of :class:`Producer` (same arguments): runs one in an event loop
    on a background thread. ``send`` returns a ``concurrent.futures.Future`` and blocks only
    for backpressure; ``flush``/``close`` block. Records handed to ``send`` are moved to the
    loop in bulk, so a tight loop of ``send`` calls costs little per record."""

    def __init__(self, server: str, **kwargs: Any) -> None:
        self._producer = Producer(server, **kwargs)
        self.producer_id = self._producer.producer_id
        self._high_water = max(1024, 4 * self._producer.settings.max_batch_records)
        self._pending: deque[tuple[Entry, concurrent.futures.Future[int | None]]] = deque()
        self._cond = threading.Condition()
        self._drain_scheduled = False
        self._drain_task: asyncio.Task[None] | None = None
        self._closed = False
        self._background = BackgroundLoop("boomscooter-producer")
        self._loop = self._background.loop
        self._call(self._start())

    def __enter__(self) -> SyncProducer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            with contextlib.suppress(ClientError):
                self.close()

    def _call(self, coro: Any) -> Any:
        return self._background.call(coro)

    async def _start(self) -> None:
        self._producer.start()

    def send(
        self,
        payload: bytes,
        *,
        channel: str | DefaultChannel | None = DEFAULT,
        key: bytes | None = None,
        timestamp_ms: int = 0,
    ) -> concurrent.futures.Future[int | None]:
        """Queue one record (see :meth:`Producer.send`)."""
        if self._closed:
            raise RequestError("producer is closed", code="FAILED_PRECONDITION")
        entry = self._producer.entry(payload, channel, key, timestamp_ms)
        future: concurrent.futures.Future[int | None] = concurrent.futures.Future()
        pending = self._pending
        if len(pending) >= self._high_water:
            with self._cond:
                while len(pending) >= self._high_water:
                    self._cond.wait()
        pending.append((entry, future))  # deque.append is atomic: no lock per record
        if not self._drain_scheduled:
            with self._cond:
                schedule = not self._drain_scheduled
                self._drain_scheduled = True
            if schedule:
                self._background.call_soon(self._start_drain)
        return future

    def send_batch(
        self, entries: Sequence[Entry], *, expected_first_seqno: int | None = None
    ) -> concurrent.futures.Future[ProduceResult | None]:
        """Queue one explicit batch (see :meth:`Producer.send_batch`)."""
        future: concurrent.futures.Future[ProduceResult | None] = concurrent.futures.Future()
        self._call(self._send_batch(list(entries), future, expected_first_seqno))
        return future

    async def _send_batch(
        self,
        entries: list[Entry],
        future: concurrent.futures.Future[ProduceResult | None],
        expected_first_seqno: int | None,
    ) -> None:
        await self._drained()
        await self._producer.room()
        self._producer.add_batch(entries, future, expected_first_seqno)

    def flush(self) -> None:
        """Block until everything sent so far is resolved (see :meth:`Producer.flush`)."""
        self._call(self._flush())

    async def _flush(self) -> None:
        await self._drained()
        await self._producer.flush()

    def close(self) -> None:
        """Flush, close the producer and stop the background thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._close())
        finally:
            self._background.close()

    async def _close(self) -> None:
        try:
            await self._drained()
        finally:
            await self._producer.close()

    async def _drained(self) -> None:
        while self._drain_task is not None and not self._drain_task.done():
            await self._drain_task
        if self._pending:  # scheduled but not started yet
            self._start_drain()
            await self._drained()

    def _start_drain(self) -> None:
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        producer = self._producer
        idle_rounds = 0
        while True:
            items = []
            pending = self._pending
            with self._cond:
                while pending:
                    items.append(pending.popleft())
                self._cond.notify_all()
                if not items and idle_rounds >= 2:
                    self._drain_scheduled = False
            if not self._drain_scheduled:
                if not pending:
                    return
                # A send appended after the last pop and saw the flag still set.
                self._drain_scheduled = True
                continue
            if not items:
                # Linger a moment before going idle: a caller in a tight loop then never
                # pays for waking this thread (a pipe write) per record.
                idle_rounds += 1
                await asyncio.sleep(0.0005)
                continue
            idle_rounds = 0
            for entry, future in items:
                if not producer.accepting:
                    try:
                        await producer.room()
                    except ClientError as error:
                        if not future.done():
                            future.set_exception(error)
                        continue
                producer.append_entry(entry, future)
