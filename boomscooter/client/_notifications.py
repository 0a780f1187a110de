"""Notifications mode: the server says where the log ends; the records are read from the
segment files directly (:class:`~boomscooter.storage.LogReader`), never sent.

For readers on the server's host or a shared filesystem. ``data_dir`` overrides the log
directory the server reports (a shared filesystem mounted elsewhere). A lost server is
waited for (resubscribing) for up to ``server_timeout_s``; records keep coming only as far
as the last notification allowed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from boomscooter.client._retry import Retry
from boomscooter.client.delivery import Delivery
from boomscooter.errors import SeqnoOutOfRangeError, TrimmedError
from boomscooter.storage import LogReader
from boomscooter.storage.batch import Record
from boomscooter.v1 import boomscooter_pb2 as pb
from bootcast.logs import get_logger

log = get_logger("boomscooter.subscriber")

READ_BYTES = 4 << 20


class NotificationsEngine:
    def __init__(
        self,
        stub: Any,
        delivery: Delivery,
        *,
        emit: Callable[[list[Record]], Awaitable[None]],
        data_dir: str | None,
        min_interval_ms: int,
        server_timeout_s: float,
    ) -> None:
        self.stub = stub
        self.delivery = delivery
        self.emit = emit
        self.data_dir = data_dir
        self.min_interval_ms = min_interval_ms
        self.server_timeout_s = server_timeout_s
        self.reader: LogReader | None = None
        self.stats = {"notifications": 0, "read_batches": 0, "reconnects": 0}

    async def run(self) -> None:
        retry = Retry(self.server_timeout_s)
        try:
            while not self.delivery.done:
                request = pb.NotificationsRequest(min_interval_ms=self.min_interval_ms)
                try:
                    async for note in self.stub.Notifications(request):
                        retry.succeeded()
                        await self._handle(note)
                        if self.delivery.done:
                            return
                except grpc.aio.AioRpcError as exc:
                    await retry.failed(exc)
                    self.stats["reconnects"] += 1
        finally:
            if self.reader is not None:
                self.reader.close()

    async def _handle(self, note: pb.NotificationsResponse) -> None:
        self.stats["notifications"] += 1
        delivery = self.delivery
        if self.reader is None:
            directory = self.data_dir or note.log_dir
            if delivery.received_end < note.first_seqno:
                raise TrimmedError(
                    f"seqno {delivery.received_end} is below the first available seqno "
                    f"{note.first_seqno}",
                    first_seqno=note.first_seqno,
                )
            self.reader = LogReader(directory, from_seqno=delivery.received_end)
            log.info("subscriber.reading_files", directory=directory)
        reader = self.reader
        reader.notify(note.segment_file, note.file_size_bytes)
        delivery.commit(note.commit_seqno)
        while not delivery.done:
            try:
                batches = await asyncio.to_thread(reader.read_batches, max_bytes=READ_BYTES)
            except SeqnoOutOfRangeError as exc:  # retention deleted what comes next
                raise TrimmedError(str(exc), first_seqno=note.first_seqno) from exc
            if not batches:
                break
            self.stats["read_batches"] += len(batches)
            for batch in batches:
                delivery.add(batch)
            records = delivery.release()
            if records:
                await self.emit(records)
        records = delivery.release()
        if records:
            await self.emit(records)
