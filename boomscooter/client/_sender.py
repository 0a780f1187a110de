"""The producer's sender: its connection to the log, as aiokafka's ``Sender`` is to its
accumulator.

:class:`Sender` runs one task, a supervisor. It opens a ``Produce`` stream (a *session*),
writes the batches the :class:`~boomscooter.client._accumulator.Accumulator` has queued while
the window has room, and a reader task feeds every response back to the accumulator. When a
session ends (the stream broke, the leader went, a NOT_LEADER answer) the supervisor follows
a redirect or tries the next listed node, fails what waited longer than
``retry_timeout_s``, backs off with jitter and opens the next session, in which every
unresolved batch is written again with its original ``batch_sequence`` (the leader answers a
duplicate with the original seqnos).

What the accumulator hands back as completions goes to ``resolve`` (the
:class:`~boomscooter.client.producer.Producer` resolves its futures and flushers there); the
sender signals ``room`` when the accumulator accepts records again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from typing import Any

import grpc

from boomscooter import rpc
from boomscooter.client._accumulator import (
    Accumulator,
    Ack,
    AckLevel,
    Completion,
    Handle,
    OutBatch,
    Reconnect,
)
from boomscooter.client._servers import ServerList, ask_leader
from boomscooter.errors import ClientError, NotLeaderError, ServerUnavailableError
from boomscooter.v1 import boomscooter_pb2, boomscooter_pb2_grpc

_ACK_PB = {
    AckLevel.NONE: boomscooter_pb2.ACK_LEVEL_NONE,
    AckLevel.LEADER: boomscooter_pb2.ACK_LEVEL_LEADER,
    AckLevel.QUORUM: boomscooter_pb2.ACK_LEVEL_QUORUM,
}

Resolve = Callable[[list[Completion[Handle]]], None]


class SessionEnd(Exception):
    """Why a stream session ended; ``address`` is where to reconnect (a redirect)."""

    def __init__(self, error: ClientError, address: str | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.address = address


class Sender:
    """Writes an accumulator's batches to the leader over one stream at a time."""

    def __init__(
        self,
        accumulator: Accumulator[Handle],
        *,
        producer_id: str,
        servers: ServerList,
        channel_options: list[tuple[str, Any]],
        resolve: Resolve,
        room: asyncio.Event,
        log: Any,
    ) -> None:
        self._acc = accumulator
        self._settings = accumulator.settings
        self._producer_id = producer_id
        self._servers = servers
        self.address = servers.current  # where the stream goes (a redirect changes it)
        self._channel_options = channel_options
        self._resolve = resolve
        self._room = room
        self._log = log
        self._ack_pb = _ACK_PB[self._settings.ack_level]
        self._nagle = self._settings.linger_s == 0
        self._wake = asyncio.Event()  # the writer or supervisor has something to do
        self._session_end: SessionEnd | None = None
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._heard_at = 0.0  # when the stream's leader last said anything
        self._channel: grpc.aio.Channel | None = None
        self._rng = random.Random()
        self.closing = False  # the producer is closing: a stream that ends is not retried
        # Counters for applications' metrics and for tests.
        self.reconnects = 0  # Produce streams that ended other than by close()
        self.resent_batches = 0  # batches written again after a broken stream

    def wake(self) -> None:
        """Something to send: a batch was queued, the window has room, a flush asks."""
        self._wake.set()

    def has_work(self) -> bool:
        """A batch is queued, or (``linger_ms=0``) an open batch may go now."""
        return bool(self._acc.queued) or self._open_to_send()

    def _open_to_send(self) -> bool:
        """With ``linger_ms=0``, an open batch goes as soon as the writer is free and the
        window has room: records that arrive while a write is under way form the next
        batch (batching that adapts to the load, with no timer)."""
        acc = self._acc
        return (
            self._nagle
            and acc.open_deadline is not None
            and acc.in_flight < self._settings.max_in_flight
        )

    # -- the connection ----------------------------------------------------------------

    def _channel_for(self, address: str) -> grpc.aio.Channel:
        if self._channel is None:
            max_bytes = self._settings.max_batch_bytes
            max_message = max(rpc.DEFAULT_MAX_MESSAGE_BYTES, max_bytes + (1 << 16))
            self._channel = rpc.create_channel(
                address, max_message_bytes=max_message, options=self._channel_options
            )
        return self._channel

    async def close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    async def end_stream(self, timeout_s: float = 5.0) -> None:
        """Half-close the stream and wait for the leader to end it: what was written
        (acks=none batches above all) reaches the leader before the channel closes."""
        call, reader = self._call, self._reader
        if call is None or reader is None or reader.done():
            return
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await call.done_writing()
        await asyncio.wait([reader], timeout=timeout_s)

    # -- the supervisor ----------------------------------------------------------------

    async def run(self) -> None:
        """A session per stream; after one ends, requeue, back off, retry."""
        acc = self._acc
        while True:
            if not acc.queued and not acc.in_flight and not self._open_to_send():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._session()
                end = SessionEnd(ServerUnavailableError("stream ended"))
            except SessionEnd as exc:
                end = exc
            now = time.monotonic()
            acc.on_disconnect(now)
            if self.closing and not acc.queued:
                continue  # close() ended the stream; it cancels this task next
            self.reconnects += 1
            if not await self._follow(end):
                continue
            self._resolve(acc.expire(now, str(end.error)))
            if not acc.queued and not acc.in_flight:
                continue
            delay = acc.backoff_s(self._rng.random())
            deadline = acc.retry_deadline
            if deadline is not None:
                delay = min(delay, max(0.0, deadline - now))
            await asyncio.sleep(delay)
            self._resolve(acc.expire(time.monotonic(), str(end.error)))

    async def _follow(self, end: SessionEnd) -> bool:
        """Where the next session goes after ``end``: a redirect, the next listed node, or
        the same. False when the stream as a whole was refused (pending batches failed)."""
        error, address = end.error, end.address
        if address is None and isinstance(error, NotLeaderError):
            # A node that names no leader has lost it (or is being promoted): the next
            # listed node may know better. Its Status is the last resort (it may name the
            # leader it lost).
            if self._servers.rotate():
                self.address = self._servers.current
                await self.close_channel()
                return True
            address = await ask_leader(self._channel_for(self.address))
        if address is not None and address != self.address:
            self._log.info("producer.redirected", address=address, previous=self.address)
            self._acc.redirected()
            self.address = self._servers.current = address
            await self.close_channel()
        elif not error.retriable:
            # The stream as a whole was refused (e.g. UNIMPLEMENTED): the same request
            # cannot succeed later; fail what is pending and keep the producer usable.
            self._log.warning("producer.stream.refused", address=self.address, error=str(error))
            self._resolve(self._acc.fail_all(error))
            return False
        else:
            self._log.info("producer.disconnected", address=self.address, error=str(error))
            # Unreachable (the leader died?): ask the next listed node; a replica's
            # NOT_LEADER answer then points at whoever leads now.
            if isinstance(error, ServerUnavailableError) and self._servers.rotate():
                self.address = self._servers.current
                await self.close_channel()
        return True

    # -- one session -------------------------------------------------------------------

    async def _session(self) -> None:
        """One Produce stream: write queued batches while the window has room; a reader
        task feeds responses to the accumulator. Ends by raising :class:`SessionEnd`."""
        stub = boomscooter_pb2_grpc.BoomscooterStub(self._channel_for(self.address))
        call = stub.Produce()
        self._call = call
        self._session_end = None
        loop = asyncio.get_running_loop()
        self._heard_at = time.monotonic()
        reader = loop.create_task(self._read(call), name="producer.read")
        watchdog = loop.create_task(self._watch(call), name="producer.watch")
        self._reader = reader
        self._log.debug("producer.stream.opened", address=self.address)
        try:
            await self._write_loop(call, reader)
        finally:
            call.cancel()
            watchdog.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self._call = self._reader = None
        assert self._session_end is not None
        raise self._session_end

    async def _write_loop(self, call: Any, reader: asyncio.Task[None]) -> None:
        acc = self._acc
        while self._session_end is None:
            batch = acc.next_to_send()
            if batch is None and self._open_to_send():
                acc.close_open()  # linger 0: the writer is free, send what is open
                batch = acc.next_to_send()
            if batch is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            if acc.accepting:
                self._room.set()
            if acc.in_flight == 1:  # this one alone awaits an answer: silence counts from now
                self._heard_at = time.monotonic()
            if batch.sends > 1:
                self.resent_batches += 1
                self._log.debug("producer.batch.resent", batch_sequence=batch.sequence)
            try:
                await call.write(self._request(batch))
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
                # The reader sees the call's status: let it name the error first.
                await asyncio.wait([reader], timeout=1.0)
                self._end(ServerUnavailableError(f"Produce stream to {self.address} broke"))
                return
            except asyncio.CancelledError:
                # grpc raises CancelledError from a write on a call cancelled locally
                # (the reader ended the session); a cancellation of this task goes on.
                task = asyncio.current_task()
                if self._session_end is None or (task is not None and task.cancelling()):
                    raise
                return
            completion = acc.on_written(batch)
            if completion is not None:
                self._resolve([completion])

    def _request(self, batch: OutBatch[Handle]) -> boomscooter_pb2.ProduceRequest:
        request = boomscooter_pb2.ProduceRequest(
            producer_id=self._producer_id,
            batch_sequence=batch.sequence,
            ack_level=self._ack_pb,
            encoded_batch=batch.data,
        )
        if batch.expected_first_seqno is not None:
            request.expected_first_seqno = batch.expected_first_seqno
        return request

    def _end(self, error: ClientError, address: str | None = None) -> None:
        if self._session_end is None:
            self._session_end = SessionEnd(error, address)
            self._wake.set()

    async def _watch(self, call: Any) -> None:
        """End the session when the leader went silent (:meth:`Accumulator.leader_lost`)."""
        timeout_s = self._settings.leader_timeout_s
        while self._session_end is None:
            await asyncio.sleep(timeout_s / 4)
            if self._acc.leader_lost(time.monotonic(), self._heard_at):
                error = ServerUnavailableError(f"no word from {self.address} for {timeout_s:g} s")
                self._end(error)
                call.cancel()
                return

    async def _read(self, call: Any) -> None:
        try:
            while True:
                response = await call.read()
                self._heard_at = time.monotonic()
                if response is grpc.aio.EOF:
                    self._end(ServerUnavailableError(f"{self.address} ended the Produce stream"))
                    return
                if not self._answer(call, response):
                    return
        except grpc.aio.AioRpcError as exc:
            error = rpc.error_from_rpc(exc, address=self.address)
            if exc.code() is grpc.StatusCode.FAILED_PRECONDITION:
                error = NotLeaderError(str(error))
            self._end(error)

    def _answer(self, call: Any, response: boomscooter_pb2.ProduceResponse) -> bool:
        """Feed one response to the accumulator; False when it ends the session."""
        acc, sequence = self._acc, response.batch_sequence
        result = response.WhichOneof("result")
        if result is None:
            return True  # the leader's keepalive
        if result == "ack":
            a = response.ack
            ack = Ack(sequence, a.base_seqno, a.record_count, a.epoch, a.commit_seqno, a.duplicate)
            completion = acc.on_ack(ack)
            if completion is not None:
                self._resolve([completion])
            return True
        error = rpc.error_from_pb(response.error)
        action = acc.on_rejection(sequence, error)
        if isinstance(action, Reconnect):
            self._end(action.error, action.address)
            call.cancel()
            return False
        if action is None:
            self._log.warning("producer.batch.rejected", batch_sequence=sequence, error=str(error))
        else:
            self._resolve([action])
        return True
