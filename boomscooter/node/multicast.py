"""The leader's multicast stream (asyncio shell around :class:`StreamEncoder`).

Stored batches are queued in seqno order and sent by one task, paced by a token bucket
(``rate_mbit``; 0 = unpaced). The commit seqno is read when a batch's pages are made, so
pages carry the newest commit point. When the commit advances and no batch is waiting, a
heartbeat goes out at once (subscribers deliver only committed records, so this is what
makes a record visible under ``fsync=interval``); when nothing at all was sent for
``heartbeat_ms``, a heartbeat says where the log ends so receivers notice loss at the tail.
The queue is bounded in bytes: :meth:`StreamSender.enqueue` waits while it is full, which
slows producers down to what the stream can carry.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections import deque
from collections.abc import Callable

from boomscooter.stream import StreamEncoder
from bootcast import mcast
from bootcast.logs import get_logger
from bootcast.pacing import Pacer

log = get_logger("boomscooter.multicast")

DEFAULT_QUEUE_BYTES = 64 << 20
_IP_UDP_HEADER_BYTES = 28


class StreamSender:
    """Sends queued batches and heartbeats on the stream group."""

    def __init__(
        self,
        group: str,
        port: int,
        *,
        epoch: int,
        page_size_bytes: int,
        interface: str | None,
        ttl: int = 1,
        rate_mbit: float = 0.0,
        heartbeat_ms: int = 100,
        position: Callable[[], tuple[int, int]],
        max_queue_bytes: int = DEFAULT_QUEUE_BYTES,
    ) -> None:
        self.group = group
        self.port = port
        self.encoder = StreamEncoder(epoch, page_size_bytes)
        self.heartbeat_s = heartbeat_ms / 1000
        self.max_queue_bytes = max_queue_bytes
        self._position = position  # () -> (last seqno, commit seqno)
        self._sock = mcast.sender_socket(group, interface=interface, ttl=ttl)
        # Bound now so the source port is known: receivers filter on it (a handshake
        # tells them), which keeps two logs on one group and port apart.
        self._sock.bind(("::" if ":" in group else "0.0.0.0", 0))
        self.source_port: int = self._sock.getsockname()[1]
        self._dest: tuple[str, int] = (group, port)
        self._pacer = Pacer(rate_mbit) if rate_mbit > 0 else None
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._sent_commit = -1
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self.pages_sent = 0
        self.bytes_sent = 0
        self.batches_sent = 0
        self.heartbeats_sent = 0
        self.send_errors = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="stream-sender")

    async def enqueue(self, batch: bytes) -> None:
        """Queue a stored batch (in seqno order); waits while the queue is full. After
        :meth:`close` it returns at once: the batch is stored, receivers Fetch it."""
        while self._queued_bytes >= self.max_queue_bytes and not self._closed:
            self._room.clear()
            await self._room.wait()
        if self._closed:
            return
        self._queue.append(batch)
        self._queued_bytes += len(batch)
        self._wake.set()

    def commit_advanced(self) -> None:
        self._wake.set()

    async def close(self) -> None:
        self._closed = True
        self._room.set()  # an append waiting for room goes on (and queues nothing)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._sock.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that lands as the wait ends, and close() would then wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                if self._queue:
                    while self._queue:
                        batch = self._queue.popleft()
                        self._queued_bytes -= len(batch)
                        if self._queued_bytes < self.max_queue_bytes:
                            self._room.set()
                        last, commit = self._position()
                        for page in self.encoder.batch(batch, commit):
                            await self._send(page, loop)
                        self._sent_commit = commit
                        self.batches_sent += 1
                    continue
                last, commit = self._position()
                # Idle (the wait timed out) or the commit moved without a batch to carry it.
                await self._send(self.encoder.heartbeat(last, commit), loop)
                self._sent_commit = commit
                self.heartbeats_sent += 1
            except OSError as exc:
                self.send_errors += 1
                log.warning("stream.send_failed", error=exc.strerror or str(exc))
                await asyncio.sleep(0.1)

    def needs_heartbeat(self, commit: int) -> bool:
        return commit != self._sent_commit

    async def _send(self, page: bytes, loop: asyncio.AbstractEventLoop) -> None:
        if self._pacer is not None:
            delay = self._pacer.delay(loop.time())
            if delay > 0:
                await asyncio.sleep(delay)
            self._pacer.sent(len(page) + _IP_UDP_HEADER_BYTES, loop.time())
        for attempt in range(1000):
            try:
                self._sock.sendto(page, self._dest)
                break
            except BlockingIOError:
                await loop.sock_sendto(self._sock, page, self._dest)
                break
            except OSError as exc:  # a full local queue (IP_RECVERR): wait, do not drop
                if exc.errno != errno.ENOBUFS or attempt == 999:
                    raise
                await asyncio.sleep(0.0005)
        self.pages_sent += 1
        self.bytes_sent += len(page)


def split_group(text: str, default_port: int) -> tuple[str, int]:
    """``ADDR:PORT``, ``[V6ADDR]:PORT`` or a bare address (``default_port``)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        number = int(port) if port else default_port
    except (OSError, ValueError):
        raise ValueError(f"not a group ADDR:PORT: {text!r}") from None
    if not 1 <= number <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host, number
