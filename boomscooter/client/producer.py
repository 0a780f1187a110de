"""The producer SDK: :class:`Producer` (asyncio; its blocking twin is
:class:`~boomscooter.client.sync_producer.SyncProducer`).

The bookkeeping is the sans-I/O :class:`~boomscooter.client._accumulator.Accumulator`;
this module is its shell: one ``Produce`` stream per connection, a writer loop that hands
queued batches to gRPC while the window has room, a reader task that feeds responses back,
a linger timer per open batch, and a supervisor loop that reconnects with backoff after a
broken stream and resends every unresolved batch with its original ``batch_sequence`` (the
leader deduplicates: a duplicate is answered with the original seqnos).

Wire use: each batch is one ``ProduceRequest`` with the batch already encoded in the storage
format (``encoded_batch``, placeholders base seqno 1 and epoch 0: the leader restamps them).
``producer_id`` is a UUID chosen at construction and kept across reconnects.

What a future resolves to:

* ``send`` → the record's seqno at ack levels ``leader`` and ``quorum``; ``None`` at
  ``none``, as soon as the batch was handed to gRPC (there is no answer to wait for; a
  batch the leader rejects later is only logged and raised by the next ``flush``, and a
  batch lost with a broken stream is not sent again);
* ``send_batch`` → a :class:`ProduceResult` (``None`` at ``none``).

Failures are :mod:`boomscooter.errors` client errors: :class:`RequestError` (a record too
large — raised by ``send`` itself, before anything is sent — or a batch the leader refuses),
:class:`ExpectedSeqnoError` (``send_batch(expected_first_seqno=…)`` did not match; only that
batch fails), :class:`ServerUnavailableError` (no working stream for ``retry_timeout_s``:
every pending record fails, the producer stays usable). :class:`NotLeaderError` answers are
followed (reconnect to the named leader and resend, at once) and surface only if retries
run out. A leader that says nothing — no ack, no keepalive (it sends one every 0.5 s) — for
``leader_timeout_s`` while batches wait is given up (frozen, or its host gone without a
reset): the producer tries the next listed node, whose NOT_LEADER names the leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from boomscooter.client._accumulator import (
    CLOSED,
    DEFAULT,
    OPENED,
    Accumulator,
    AckLevel,
    Completion,
    DefaultChannel,
    Handle,
    ProduceResult,
    ProducerSettings,
    check_entry,
)
from boomscooter.client._sender import Sender
from boomscooter.client._servers import ServerList
from boomscooter.errors import ClientError, RequestError, ServerUnavailableError
from boomscooter.storage.batch import HEADER_BYTES, RECORD_OVERHEAD_BYTES, Entry
from bootcast.logs import get_logger

__all__ = ["AckLevel", "ProduceResult", "Producer"]

_FIXED_RECORD_BYTES = HEADER_BYTES + RECORD_OVERHEAD_BYTES


# Bound once: looked up per record in send().
_new_tuple = tuple.__new__
_time_ns = time.time_ns
_monotonic = time.monotonic
_Future = asyncio.Future


class Producer:
    """An asyncio producer of one log (see the module docstring).

    ``server`` is the leader's gRPC address ("host:port"), or several nodes of the log
    separated by commas: when the current one cannot be reached the producer tries the
    next, and a replica's NOT_LEADER answer redirects it to the leader (failover).
    ``acks`` is ``"none"``, ``"leader"`` or ``"quorum"``. A batch is sent when it holds
    ``max_batch_records`` records, would exceed ``max_batch_bytes`` encoded, or
    ``linger_ms`` after its first record; at most ``max_in_flight`` batches are
    unacknowledged at once, and ``send`` waits (backpressure) while one more is waiting.
    ``channel`` is the default record channel. Use it as ``async with Producer(...) as p:``
    (exit flushes and closes).
    """

    def __init__(
        self,
        server: str,
        *,
        acks: str | AckLevel = "leader",
        producer_id: str | None = None,
        linger_ms: float = 2.0,
        max_batch_records: int = 10_000,
        max_batch_bytes: int = 1 << 20,
        max_in_flight: int = 16,
        retry_timeout_s: float = 30.0,
        leader_timeout_s: float = 2.0,
        channel: str | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.settings = ProducerSettings(
            ack_level=AckLevel.parse(acks),
            linger_s=linger_ms / 1000,
            max_batch_records=max_batch_records,
            max_batch_bytes=max_batch_bytes,
            max_in_flight=max_in_flight,
            retry_timeout_s=retry_timeout_s,
            leader_timeout_s=leader_timeout_s,
        )
        self.producer_id = producer_id if producer_id is not None else uuid.uuid4().hex
        self.server = server
        self.default_channel = channel
        self._core: Accumulator[Handle] = Accumulator(self.settings)
        self._nagle = self.settings.linger_s == 0
        self._max_bytes = self.settings.max_batch_bytes
        self._max_plain_payload = self._max_bytes - _FIXED_RECORD_BYTES
        self._loop: asyncio.AbstractEventLoop | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._room = asyncio.Event()  # the core accepts records again
        self._linger_handle: asyncio.TimerHandle | None = None
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._closing = False
        self._closed = False
        self._log = get_logger("boomscooter.producer").bind(producer_id=self.producer_id)
        self._sender = Sender(
            self._core,
            producer_id=self.producer_id,
            servers=ServerList(server),
            channel_options=list(channel_options),
            resolve=self._complete_all,
            room=self._room,
            log=self._log,
        )

    @property
    def address(self) -> str:
        """Where the stream goes (a redirect or a failover changes it)."""
        return self._sender.address

    @property
    def reconnects(self) -> int:
        """Produce streams that ended other than by :meth:`close` (for metrics, tests)."""
        return self._sender.reconnects

    @property
    def resent_batches(self) -> int:
        """Batches written again after a broken stream."""
        return self._sender.resent_batches

    # -- public API --------------------------------------------------------------------

    async def __aenter__(self) -> Producer:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.close()
        else:  # keep the body's exception; the records' failures are in their futures
            try:
                await self.close()
            except ClientError as error:
                self._log.warning("producer.close.failed", error=str(error))

    async def send(
        self,
        payload: bytes,
        *,
        channel: str | DefaultChannel | None = DEFAULT,
        key: bytes | None = None,
        timestamp_ms: int = 0,
    ) -> asyncio.Future[int | None]:
        """Queue one record; the future resolves to its seqno (``None`` at acks=none).

        Awaits only while the window is full (backpressure). ``timestamp_ms`` 0 stamps the
        producer's clock now. Raises :class:`RequestError` at once for a record that can
        never be sent (too large, wrong types)."""
        core = self._core
        if not core.accepting or self._run_task is None or self._closing:
            await self.room()
        if channel is DEFAULT:
            channel = self.default_channel
        if (
            channel is None
            and key is None
            and not timestamp_ms
            and type(payload) is bytes
            and len(payload) <= self._max_plain_payload
        ):  # the common case, checked inline: this runs once per record
            entry = _new_tuple(Entry, (_time_ns() // 1_000_000, payload, None, None))
        else:
            entry = self.entry(payload, channel, key, timestamp_ms)
        future: asyncio.Future[int | None] = _Future(loop=self._loop)
        flags = core.append(entry, future, _monotonic())
        if flags:
            self._after_append(flags)
        return future

    async def send_batch(
        self,
        entries: Sequence[Entry],
        *,
        expected_first_seqno: int | None = None,
    ) -> asyncio.Future[ProduceResult | None]:
        """Queue ``entries`` as one batch of their own (after the records sent before it).

        ``expected_first_seqno`` asserts the seqno its first record gets; on a mismatch
        nothing is appended and the future fails with ``ExpectedSeqnoError`` (whose
        ``next_seqno`` is what the log assigns next)."""
        await self.room()
        assert self._loop is not None
        future: asyncio.Future[ProduceResult | None] = self._loop.create_future()
        self.add_batch(entries, future, expected_first_seqno)
        return future

    async def flush(self) -> None:
        """Send what is batched and wait until everything sent so far is resolved; raises
        the first failure since the previous flush (the failed records' futures hold
        theirs)."""
        self.start()
        core = self._core
        target = core.close_open()
        self._sender.wake()
        while not core.resolved_through(target):
            assert self._loop is not None
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._flush_waiters.append((target, waiter))
            await waiter
        error = core.take_first_error()
        if error is not None:
            raise error

    async def close(self) -> None:
        """Flush, then stop: close the stream and the channel. Records still unresolved
        (when the flush fails with retries exhausted) fail with ServerUnavailableError."""
        if self._closed:
            return
        self._closing = self._sender.closing = True
        try:
            if self._run_task is not None:
                await self.flush()
        finally:
            self._closed = True
            self._complete_all(self._core.fail_all(ServerUnavailableError("producer closed")))
            if self._linger_handle is not None:
                self._linger_handle.cancel()
                self._linger_handle = None
            await self._sender.end_stream()
            if self._run_task is not None:
                self._run_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._run_task
            await self._sender.close_channel()
            self._room.set()
            self._log.debug("producer.closed")

    # -- the hand-over interface (the blocking SyncProducer moves records in bulk) -----

    @property
    def accepting(self) -> bool:
        """The window has room for another record (else await :meth:`room`)."""
        return self._core.accepting

    def entry(
        self,
        payload: bytes,
        channel: str | DefaultChannel | None,
        key: bytes | None,
        timestamp_ms: int,
    ) -> Entry:
        """The record ``send`` would make (stamped, checked: raises :class:`RequestError`
        for one that can never be sent)."""
        if isinstance(channel, DefaultChannel):
            channel = self.default_channel
        if (
            channel is None
            and key is None
            and not timestamp_ms
            and type(payload) is bytes
            and len(payload) <= self._max_plain_payload
        ):
            return _new_tuple(Entry, (_time_ns() // 1_000_000, payload, None, None))
        if not timestamp_ms:
            timestamp_ms = _time_ns() // 1_000_000
        entry = Entry(timestamp_ms, payload, channel, key)
        check_entry(entry, self._max_bytes)
        return entry

    def append_entry(self, entry: Entry, handle: Handle) -> None:
        """Append a record made by :meth:`entry`; ``handle`` (a future of any kind) is resolved
        with its seqno. The caller awaited :meth:`room` while :attr:`accepting` was False."""
        flags = self._core.append(entry, handle, _monotonic())
        if flags:
            self._after_append(flags)

    def add_batch(
        self, entries: Sequence[Entry], handle: Handle, expected_first_seqno: int | None
    ) -> None:
        """Queue ``entries`` as one batch (see :meth:`send_batch`); ``handle`` is resolved
        with its :class:`ProduceResult`. The caller awaited :meth:`room`."""
        self._core.add_batch(entries, handle, expected_first_seqno=expected_first_seqno)
        self._sender.wake()

    def _after_append(self, flags: int) -> None:
        if flags & CLOSED:
            self._sender.wake()
        if flags & OPENED:
            if self._nagle:
                self._sender.wake()  # an idle writer takes the new batch at once
            elif self._linger_handle is None:
                self._arm_linger()

    def _arm_linger(self) -> None:
        deadline = self._core.open_deadline
        if deadline is not None and self._loop is not None:
            delay = max(0.0, deadline - time.monotonic())
            self._linger_handle = self._loop.call_later(delay, self._on_linger)

    def _on_linger(self) -> None:
        self._linger_handle = None
        if self._core.close_due(time.monotonic()):
            self._sender.wake()
        self._arm_linger()

    async def room(self) -> None:
        """Started, not closed, and room for a record (the backpressure wait)."""
        if self._closing:
            raise RequestError("producer is closed", code="FAILED_PRECONDITION")
        self.start()
        while not self._core.accepting:
            self._room.clear()
            await self._room.wait()
            if self._closing:
                raise RequestError("producer is closed", code="FAILED_PRECONDITION")

    def start(self) -> None:
        """Start the producer's task on the running loop (the first send does it too)."""
        if self._run_task is None:
            if self._closed:
                raise RequestError("producer is closed", code="FAILED_PRECONDITION")
            self._loop = asyncio.get_running_loop()
            self._run_task = self._loop.create_task(self._sender.run(), name="producer")

    # -- completions -------------------------------------------------------------------

    def _complete(self, completion: Completion[Handle]) -> None:
        batch, result, error = completion
        handles = batch.handles
        if error is not None:
            for handle in handles:
                if not handle.done():
                    handle.set_exception(error)
                    handle.exception()  # flush() reports it: no "never retrieved" noise
            if handles:
                self._log.warning(
                    "producer.batch.failed",
                    batch_sequence=batch.sequence,
                    records=batch.record_count,
                    error=str(error),
                    error_class=type(error).__name__,
                )
        elif result is None:
            for handle in handles:
                if not handle.done():
                    handle.set_result(None)
        else:
            seqno = result.base_seqno
            for handle in handles:
                if not handle.done():
                    handle.set_result(seqno)
                seqno += 1
        bh = batch.batch_handle
        if bh is not None and not bh.done():
            if error is not None:
                bh.set_exception(error)
                bh.exception()
            else:
                bh.set_result(result)

    def _complete_all(self, completions: list[Completion[Handle]]) -> None:
        for completion in completions:
            self._complete(completion)
        self._progress()

    def _progress(self) -> None:
        """After completions: wake flushers whose batches are all resolved, and senders."""
        if self._flush_waiters:
            core = self._core
            waiting = []
            for target, waiter in self._flush_waiters:
                if core.resolved_through(target):
                    if not waiter.done():
                        waiter.set_result(None)
                else:
                    waiting.append((target, waiter))
            self._flush_waiters = waiting
        if self._sender.has_work():
            self._sender.wake()  # the window may have room now
        else:
            self._room.set()
