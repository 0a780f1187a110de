"""A replica's duties (asyncio shell): follow the leader's stream into the local log.

One *session* per connection to the leader:

1. open ``Replicate`` with the replica's state; the leader answers with its stream
   (group, port, epoch, source port), commit and last seqno, its other replicas and, when
   the replica is behind the start of the leader's active segment, its sealed segments;
2. **reconcile**: find the last seqno where the two logs agree
   (:class:`~boomscooter.node.replication.CommonPoint`, comparing batches fetched from the
   leader) and truncate after it — a tail written under an older epoch that the leader
   does not hold is dropped before anything is appended or counted as committed;
3. **catch up by cast**: whole sealed segments the replica lacks are fetched through the
   leader's bootcast endpoint (``/join/segments/<file>``; replicas catching up at once share
   one multicast), checked batch by batch and appended;
4. **live**: join the stream, feed pages to a :class:`~boomscooter.stream.StreamReceiver`
   (it delivers batches in seqno order exactly once and reports gaps), append what it
   delivers (under ``fsync=always`` each append is fdatasynced), ``Fetch`` the gaps
   (including records not yet committed) from the leader, and acknowledge the durable seqno
   on the Replicate stream at once when it advances and as a keepalive otherwise (every
   ``keepalive_ms`` the leader names: a quarter of its in-sync timeout; ``KEEPALIVE_S``
   when it names none).

The session ends on any failure (the leader gone, a new epoch on the stream, a refused
append); the follower then looks for the leader — the last one, or whoever the known peers
name with the highest epoch — and starts a new session.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from boomscooter.errors import BoomscooterError
from boomscooter.node import failover
from boomscooter.node.core import Appended
from boomscooter.node.servicer import session_from_pb
from boomscooter.storage.batch import Batch, split_batches
from boomscooter.storage.segment import parse_file_name
from boomscooter.stream import BatchReceived, CommitAdvanced, EpochChanged, Gap, StreamReceiver
from boomscooter.v1 import boomscooter_pb2 as pb
from boomscooter.v1 import boomscooter_pb2_grpc as pb_grpc
from bootcast import mcast

if TYPE_CHECKING:
    from boomscooter.node.leader import LeaderNode

log = structlog.get_logger("boomscooter.replica")

KEEPALIVE_S = 1.0
FETCH_BYTES = 4 << 20
MAX_PENDING_BYTES = 64 << 20
_DRAIN_MAX = 256
_RETRY_S = (0.1, 0.2, 0.5, 1.0, 2.0)


class SessionEnded(Exception):
    """The session with the leader is over (the reason is the message)."""


class StaleLeader(SessionEnded):
    """The node at ``address`` leads an epoch this replica must not follow."""

    def __init__(self, message: str, address: str, epoch: int) -> None:
        super().__init__(message)
        self.address = address
        self.epoch = epoch


class Follower:
    def __init__(self, node: LeaderNode, leader_address: str) -> None:
        self.node = node
        self.leader_address = leader_address
        self.peers: list[str] = []
        self.min_insync = 0
        self.keepalive_s = KEEPALIVE_S
        self.stats = {
            "sessions": 0,
            "pages": 0,
            "gaps": 0,
            "fetched_batches": 0,
            "appended_batches": 0,
            "imported_records": 0,
            "truncations": 0,
            "segments_cast": 0,
            "segment_cast_bytes": 0,
        }
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self._ack_wake = asyncio.Event()
        self._append_wake = asyncio.Event()
        self._refused: dict[str, int] = {}  # stale leaders seen: address -> their epoch
        self._restart = asyncio.Event()
        self._drained = asyncio.Event()
        self._pending: list[Batch] = []
        self._pending_bytes = 0
        self._sock: socket.socket | None = None
        self._receiver: StreamReceiver | None = None
        self._source: tuple[str | None, int | None] = (None, None)
        self._gaps: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        self._timer: asyncio.TimerHandle | None = None
        self.drops: dict[str, int] = {}

    def start(self) -> None:
        _remove_catchup_files(self.node.config.data_dir)  # left by a crash mid-catch-up
        self._task = self._loop.create_task(self._run(), name="follower")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._leave()

    def durable_changed(self) -> None:
        self._ack_wake.set()

    # -- sessions -------------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self._session(self.leader_address)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
            except StaleLeader as exc:
                self._refused[exc.address] = exc.epoch
                reason = str(exc)
            except (SessionEnded, BoomscooterError, OSError) as exc:
                reason = str(exc)
            except Exception as exc:  # a bug must not stop the replica for good
                log.exception("replica.session_failed")
                reason = repr(exc)
            else:
                reason = "the leader ended the session"
            finally:
                self._leave()
            failures += 1
            log.info("replica.session_ended", leader=self.leader_address, reason=reason)
            known = self.node.state.epoch
            skip = frozenset(a for a, e in self._refused.items() if e <= known)
            found = await failover.newer_leader(
                self.node,
                {*self.peers, *self.node.state.peers, self.leader_address},
                or_same=True,
                skip=skip,
            )
            if found is not None and found[0] != self.leader_address:
                log.info("replica.new_leader", leader=found[0], epoch=found[1])
                self.leader_address = found[0]
                self.node.leader_address = found[0]
                failures = 0
            await asyncio.sleep(_RETRY_S[max(0, min(failures, len(_RETRY_S)) - 1)])

    def _hello(self) -> pb.ReplicateRequest:
        node = self.node
        return pb.ReplicateRequest(
            replica_id=node.node_id,
            address=node.address,
            durable_seqno=node.held_seqno(),
            last_seqno=node.log.last_seqno,
            last_epoch=node.log.last_epoch,
        )

    async def _session(self, address: str) -> None:
        channel = failover.node_channel(address)
        try:
            stub = pb_grpc.BoomscooterStub(channel)
            call = stub.Replicate()
            await call.write(self._hello())
            first = await call.read()
            if not isinstance(first, pb.ReplicateResponse):
                raise SessionEnded("the leader closed the Replicate stream")
            self.stats["sessions"] += 1
            self._check_not_stale(address, first.session.epoch)
            self._adopt(address, first)
            await self._learn_producers(first)
            await self._reconcile(stub, first.first_seqno)
            if first.sealed_segments and first.cast_address:
                await self._catch_up_by_cast(stub, first)
            self.node.leader_commit = max(self.node.leader_commit, first.commit_seqno)
            self.node._commit_moved()
            self._join(first.session)
            if first.last_seqno >= self.node.log.next_seqno:
                self._gaps.put_nowait((self.node.log.next_seqno, first.last_seqno))
            tasks = [
                self._loop.create_task(self._acks(call)),
                self._loop.create_task(self._responses(call)),
                self._loop.create_task(self._appender()),
                self._loop.create_task(self._fetcher(stub)),
                self._loop.create_task(self._restart.wait()),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
                raise SessionEnded("a new epoch on the stream")
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                call.cancel()
        finally:
            await channel.close()

    async def _learn_producers(self, response: pb.ReplicateResponse) -> None:
        if not response.producer_batches:
            return
        async with self.node._append_lock:  # the journal is not being compacted meanwhile
            learn_producer_batches(
                self.node,
                [
                    (
                        e.producer_id,
                        e.batch_sequence,
                        Appended(e.base_seqno, e.record_count, e.epoch),
                    )
                    for e in response.producer_batches
                ],
            )

    def _check_not_stale(self, address: str, epoch: int) -> None:
        """Never follow a leader whose epoch is older than one this node has seen, nor a
        second leader under the epoch of the one it followed (an epoch taken twice)."""
        node = self.node
        known = node.state.epoch
        if epoch < known or (epoch == known and node.state.leader and node.state.leader != address):
            raise StaleLeader(
                f"{address} leads at epoch {epoch}, but this node has seen epoch {known} "
                f"(led by {node.state.leader or 'another node'}): a stale leader",
                address,
                epoch,
            )

    def _adopt(self, address: str, first: pb.ReplicateResponse) -> None:
        node = self.node
        session = first.session
        self.peers = [a for a in first.replica_addresses if a != node.address]
        self.min_insync = first.min_insync
        self.keepalive_s = first.keepalive_ms / 1000 if first.keepalive_ms else KEEPALIVE_S
        node.leader_address = address
        node.session = session_from_pb(session)
        node.epoch = session.epoch
        peers = sorted({*node.state.peers, *self.peers, address} - {node.address})
        if (
            session.epoch > node.state.epoch
            or peers != sorted(node.state.peers)
            or node.state.leader != address
        ):
            node.state.epoch = max(node.state.epoch, session.epoch)
            node.state.peers = peers
            node.state.leader = address
            node._save_state_soon()
        log.info("replica.session", leader=address, epoch=session.epoch,
                 leader_last=first.last_seqno, commit=first.commit_seqno,
                 last_seqno=node.log.last_seqno)  # fmt: skip

    async def _rebase(self, base: int) -> None:
        """A replica whose log ends before the leader's starts (empty, or behind retention):
        its log starts again where the leader's does. Runs under :meth:`LeaderNode.exclusive`."""
        node = self.node
        await asyncio.to_thread(node.log.rebase, base)
        node._committed_end = node.log.active_segment()
        node._committed_end_seqno = base - 1
        node.held_seen = min(node.held_seen, base - 1)
        node.dedupe.forget_after(base - 1)
        await asyncio.to_thread(node.journal.replace, node.journal.encoded(node.dedupe))
        log.info("replica.rebased", first_seqno=base)

    async def _reconcile(self, stub: Any, leader_first: int) -> None:
        node = self.node
        if node.log.next_seqno < leader_first:
            # Empty, or everything it holds is older than what the leader still stores
            # (retention deleted the records between): start again where the leader's log
            # starts. Nothing lost: those records were committed and trimmed everywhere.
            if node.log.last_seqno:
                log.warning("replica.behind_retention", last_seqno=node.log.last_seqno,
                            leader_first_seqno=leader_first)  # fmt: skip
            await node.exclusive(lambda: self._rebase(leader_first))
        if await failover.reconcile(node, stub, leader_first):
            self.stats["truncations"] += 1

    # -- catch-up through segment casts ---------------------------------------------------

    async def _catch_up_by_cast(self, stub: Any, first: pb.ReplicateResponse) -> None:
        from bootcast.client import FetchConfig, fetch

        node = self.node
        names = sorted(n for n in first.sealed_segments if parse_file_name(n) is not None)
        bases = [parse_file_name(n).base_seqno for n in names]  # type: ignore[union-attr]
        for i, name in enumerate(names):
            end = bases[i + 1] - 1 if i + 1 < len(bases) else None
            if end is not None and end < node.log.next_seqno:
                continue  # already held
            if bases[i] < node.log.next_seqno:
                if end is not None:  # finish this segment record by record
                    await failover.copy_from(node, stub, end)
                continue
            if bases[i] > node.log.next_seqno:
                return  # not contiguous with our log: the live path Fetches instead
            url = f"http://{first.cast_address}/join/segments/{name}"
            handle, path = tempfile.mkstemp(prefix=CATCHUP_PREFIX, dir=node.config.data_dir)
            os.close(handle)
            try:
                config = FetchConfig(
                    url=url, output=path, progress="none", interface=node.config.interface
                )
                result = await asyncio.to_thread(fetch, config)
                async with node._append_lock:  # not beside retention or a truncation
                    records = await asyncio.to_thread(node.log.import_segment, path, bases[i])
                self.stats["imported_records"] += records
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            self.stats["segments_cast"] += 1
            self.stats["segment_cast_bytes"] += result.size
            log.info("replica.segment_cast", segment=name, bytes=result.size, records=records,
                     mbyte_per_s=round(result.mbyte_per_s, 1))  # fmt: skip

    # -- the live stream ------------------------------------------------------------------

    def _join(self, session: pb.MulticastSession) -> None:
        interface = self.node.config.interface or session.interface_hint or None
        self._sock = mcast.receiver_socket(session.group, session.port, interface=interface)
        self._receiver = StreamReceiver(
            session.epoch, self.node.log.next_seqno, page_size_bytes=session.page_size_bytes
        )
        self._source = mcast.expected_source(session.interface_hint, session.source_port)
        self._restart.clear()
        self._loop.add_reader(self._sock.fileno(), self._readable)

    def _leave(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._receiver is not None:
            for reason, n in self._receiver.drops.items():
                self.drops[reason.value] = self.drops.get(reason.value, 0) + n
            self._receiver = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending.clear()
        self._pending_bytes = 0
        while not self._gaps.empty():
            self._gaps.get_nowait()

    def _readable(self) -> None:
        sock, receiver = self._sock, self._receiver
        if sock is None or receiver is None:
            return
        now = self._loop.time()
        events: list[Any] = []
        for data in mcast.receive_from(sock, self._source, self.drops, limit=_DRAIN_MAX):
            self.stats["pages"] += 1
            events.extend(receiver.datagram(data, now))
        self._handle(events)

    def _poll(self) -> None:
        self._timer = None
        if self._receiver is not None:
            self._handle(self._receiver.poll(self._loop.time()))

    def _handle(self, events: list[Any]) -> None:
        node = self.node
        for event in events:
            if isinstance(event, BatchReceived):
                self._pending.append(event.batch)
                self._pending_bytes += event.batch.header.length
                self._append_wake.set()
            elif isinstance(event, CommitAdvanced):
                if event.commit_seqno > node.leader_commit:
                    node.leader_commit = event.commit_seqno
                    node._commit_moved()
                    node._notify()
            elif isinstance(event, Gap):
                self.stats["gaps"] += 1
                self._gaps.put_nowait((event.from_seqno, event.to_seqno))
            elif isinstance(event, EpochChanged):
                self._restart.set()
        if self._sock is not None and self._pending_bytes > MAX_PENDING_BYTES:
            self._loop.remove_reader(self._sock.fileno())  # the disk is behind: Fetch later
        self._arm()

    def _arm(self) -> None:
        receiver = self._receiver
        deadline = receiver.next_deadline() if receiver is not None else None
        if deadline is None or self._timer is not None:
            return
        self._timer = self._loop.call_at(max(deadline, self._loop.time()), self._poll)

    async def _appender(self) -> None:
        node = self.node
        while True:
            await self._append_wake.wait()
            self._append_wake.clear()
            batches, self._pending = self._pending, []
            self._pending_bytes = 0
            self._drained.set()
            if self._sock is not None:
                self._loop.remove_reader(self._sock.fileno())
                self._loop.add_reader(self._sock.fileno(), self._readable)
            if not batches:
                continue
            async with node._append_lock:
                # pwrites into the page cache (every fsync policy leaves the fdatasyncs to
                # the storage's syncer thread): cheaper inline than a thread hop per group.
                ends = self._store(batches)
            node._ends.extend(ends)
            self.stats["appended_batches"] += len(batches)
            node._commit_moved()
            node._held(node.held_seqno())

    def _store(self, batches: list[Batch]) -> list[tuple[int, str, int]]:
        log_ = self.node.log
        ends = []
        for batch in batches:
            log_.append_batch(batch)
            ends.append((batch.last_seqno, *log_.active_segment()))
        return ends

    async def _fetcher(self, stub: Any) -> None:
        while True:
            start, end = await self._gaps.get()
            while (receiver := self._receiver) is not None:
                start = max(start, receiver.next_seqno)
                if start > end:
                    break
                while self._pending_bytes > MAX_PENDING_BYTES:  # the disk is behind
                    self._drained.clear()
                    await self._drained.wait()
                request = pb.FetchRequest(
                    from_seqno=start, to_seqno=end, max_bytes=FETCH_BYTES, include_uncommitted=True
                )
                response: pb.FetchResponse = await stub.Fetch(request, timeout=30)
                batches = list(split_batches(response.batches))
                if not batches:
                    break
                events = []
                for batch in batches:
                    self.stats["fetched_batches"] += 1
                    events.extend(receiver.repaired(batch.data))
                self._handle(events)
                start = response.last_seqno + 1

    async def _acks(self, call: Any) -> None:
        sent: tuple[int, int] | None = None
        sent_at = 0.0
        while True:
            self._ack_wake.clear()
            hello = self._hello()
            state = (hello.durable_seqno, hello.last_seqno)
            # Sent when the durable seqno moved (the ack the commit waits for), and as a
            # keepalive: the leader counts a silent replica out of sync.
            keepalive_s = self.keepalive_s
            if sent is None or state[0] != sent[0] or self._loop.time() - sent_at >= keepalive_s:
                await call.write(hello)
                sent, sent_at = state, self._loop.time()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(keepalive_s):
                    await self._ack_wake.wait()

    async def _responses(self, call: Any) -> None:
        node = self.node
        while isinstance(response := await call.read(), pb.ReplicateResponse):
            session = response.session
            current = node.session
            if current is not None and (session.epoch, session.source_port) != (
                current.epoch,
                current.source_port,
            ):
                raise SessionEnded("the leader's stream changed")
            if response.commit_seqno > node.leader_commit:
                node.leader_commit = response.commit_seqno
                node._commit_moved()
                node._notify()
            self.peers = [a for a in response.replica_addresses if a != node.address]
            await self._learn_producers(response)
        raise SessionEnded("the leader ended the Replicate stream")


def learn_producer_batches(node: LeaderNode, entries: list[tuple[str, int, Appended]]) -> None:
    """As a replica: the leader's dedupe entries, kept (and journaled) so that after a
    promotion a producer's retry of a batch this log holds is not stored twice.
    Entries beyond the log are pruned when it is promoted or restarted."""
    for producer_id, sequence, appended in entries:
        if not node.dedupe.holds(producer_id, sequence):
            node.journal.append(producer_id, sequence, appended)
            node._remember(producer_id, sequence, appended)


CATCHUP_PREFIX = ".catchup-"


def _remove_catchup_files(directory: str) -> None:
    for name in os.listdir(directory):
        if name.startswith((CATCHUP_PREFIX, "." + CATCHUP_PREFIX)):  # and bootcast's part files
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))
                log.info("replica.catchup_file_removed", file=name)
