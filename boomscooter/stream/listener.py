"""One joined multicast stream (asyncio shell): the receive loop replicas and multicast
subscribers share.

:class:`StreamListener` joins the group on a socket of its own, drains it in the event loop's
reader callback (at most ``DRAIN_MAX`` datagrams a call, pages of any other source dropped
and counted) straight into a :class:`~boomscooter.stream.receiver.StreamReceiver`, keeps the
receiver's timer armed at its next deadline (re-armed earlier when a deadline moves closer),
and hands every batch of events to its owner's ``sink``. Gaps go to :attr:`gaps`, a queue the
owner's fetch worker reads; what it fetches comes back through :meth:`repaired`, so a batch
fetched and the same batch multicast are delivered once. The owner applies backpressure
with :meth:`pause` and :meth:`resume` (the socket buffer holds what arrives meanwhile, and
the receiver asks for anything lost to a full buffer).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from boomscooter.stream.receiver import Event, Gap, StreamReceiver
from bootcast import mcast

DRAIN_MAX = 256

Sink = Callable[[list[Event]], None]


class StreamListener:
    """The stream ``group:port`` of ``epoch`` from ``source_port`` (see the module)."""

    def __init__(
        self,
        *,
        group: str,
        port: int,
        epoch: int,
        next_seqno: int,
        page_size_bytes: int,
        interface: str | None,
        interface_hint: str,
        source_port: int,
        sink: Sink,
        page_filter: Callable[[bytes], bool] | None = None,
        gaps: asyncio.Queue[tuple[int, int]] | None = None,
    ) -> None:
        self.group, self.port, self.epoch = group, port, epoch
        self.sink = sink
        self.page_filter = page_filter  # for tests: datagrams it refuses are "lost"
        self.receiver = StreamReceiver(epoch, next_seqno, page_size_bytes=page_size_bytes)
        # The owner's queue outlives a listener (a new session keeps its fetch worker).
        self.gaps: asyncio.Queue[tuple[int, int]] = gaps if gaps is not None else asyncio.Queue()
        self.pages = 0  # datagrams read (valid or not)
        self.drops: dict[str, int] = {}  # by reason, including those of the socket filter
        self._loop = asyncio.get_running_loop()
        self.joined_at = self.last_page_at = self._loop.time()
        self.pages_seen = False  # some valid page arrived
        self._source = mcast.expected_source(interface_hint, source_port)
        self._sock: socket.socket | None = mcast.receiver_socket(group, port, interface=interface)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when the timer fires (uvloop's handles do not say)
        self._reading = False
        self.resume()

    def resume(self) -> None:
        """Read the socket again (the owner caught up)."""
        if self._sock is not None and not self._reading:
            self._loop.add_reader(self._sock.fileno(), self._readable)
            self._reading = True

    def pause(self) -> None:
        """Stop reading the socket (the owner is behind)."""
        if self._sock is not None and self._reading:
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False

    def close(self) -> None:
        """Leave the group; the receiver's drops join :attr:`drops`."""
        self.pause()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            for reason, n in self.receiver.drops.items():
                self.drops[reason.value] = self.drops.get(reason.value, 0) + n
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while not self.gaps.empty():
            self.gaps.get_nowait()

    @property
    def open(self) -> bool:
        return self._sock is not None

    def repaired(self, data: bytes | bytearray | memoryview) -> None:
        """A batch obtained by Fetch, through the receiver's repair door."""
        if self._sock is not None:
            self._handle(self.receiver.repaired(data))

    def _readable(self) -> None:
        sock, receiver = self._sock, self.receiver
        if sock is None:
            return
        now = self._loop.time()
        events: list[Event] = []
        drops_before = receiver.drops.total()
        pages = 0
        page_filter = self.page_filter
        for data in mcast.receive_from(sock, self._source, self.drops, limit=DRAIN_MAX):
            if page_filter is not None and not page_filter(data):
                continue
            pages += 1
            events.extend(receiver.datagram(data, now))
        self.pages += pages
        if pages > receiver.drops.total() - drops_before:  # some page was valid
            self.pages_seen = True
            self.last_page_at = now
        self._handle(events)

    def _poll(self) -> None:
        self._timer = None
        if self._sock is not None:
            self._handle(self.receiver.poll(self._loop.time()))

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Gap):
                self.gaps.put_nowait((event.from_seqno, event.to_seqno))
        if events:
            self.sink(events)
        self._arm()

    def _arm(self) -> None:
        deadline = self.receiver.next_deadline()
        if deadline is None or self._sock is None:
            return
        if self._timer is not None:
            if self._timer_at <= deadline:
                return
            self._timer.cancel()
        self._timer_at = max(deadline, self._loop.time())
        self._timer = self._loop.call_at(self._timer_at, self._poll)


def listen(
    session: Any,
    next_seqno: int,
    *,
    interface: str | None,
    sink: Sink,
    page_filter: Callable[[bytes], bool] | None = None,
    gaps: asyncio.Queue[tuple[int, int]] | None = None,
) -> StreamListener:
    """A listener for a stream session (anything with the ``MulticastSession`` fields)."""
    return StreamListener(
        group=session.group,
        port=session.port,
        epoch=session.epoch,
        next_seqno=next_seqno,
        page_size_bytes=session.page_size_bytes,
        interface=interface or session.interface_hint or None,
        interface_hint=session.interface_hint,
        source_port=session.source_port,
        sink=sink,
        page_filter=page_filter,
        gaps=gaps,
    )
