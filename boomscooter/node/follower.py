"""A replica's duties (asyncio shell): follow the leader's stream into the local log.

One *session* per connection to the leader:

1. open ``Replicate`` with the replica's state; the leader answers with its stream
   (group, port, epoch, source port), commit and last seqno, its other replicas and, when
   the replica is behind the start of the leader's active segment, its sealed segments;
2. **reconcile**: find the last seqno where the two logs agree
   (:class:`~boomscooter.node.replicas.CommonPoint`, comparing batches fetched from the
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
   when it names none). The leader speaks on the session at least every 0.5 s; silent
   for ``--leader-timeout`` it is presumed lost.

The session ends on any failure (the leader gone, a new epoch on the stream, a refused
append); the node's machine then looks for the leader — the last one, or whoever the known
peers name with the highest epoch — and the follower starts a new session when it says.
Every decision (is this leader stale, what does its commit count for, whom to follow next)
is the machine's (:class:`~boomscooter.node.machine.NodeMachine`); this module does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from typing import TYPE_CHECKING, Any

import grpc

from boomscooter.errors import BoomscooterError
from boomscooter.node import convert, peers
from boomscooter.node.machine import RetrySession, StaleLeader
from boomscooter.storage.batch import Batch, split_batches
from boomscooter.storage.segment import parse_file_name
from boomscooter.stream import BatchReceived, CommitAdvanced, EpochChanged, Gap
from boomscooter.stream.listener import StreamListener, listen
from boomscooter.v1 import boomscooter_pb2 as pb
from boomscooter.v1 import boomscooter_pb2_grpc as pb_grpc
from bootcast.client import FetchConfig, fetch
from bootcast.logs import get_logger

if TYPE_CHECKING:
    from boomscooter.node.runtime import Node

log = get_logger("boomscooter.replica")

FETCH_BYTES = 4 << 20
MAX_PENDING_BYTES = 64 << 20


class SessionEnded(Exception):
    """The session with the leader is over (the reason is the message)."""


class Follower:
    def __init__(self, node: Node, leader_address: str) -> None:
        self.node = node
        self.machine = node.machine
        self.leader_address = leader_address
        self._counts = {
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
        self._restart = asyncio.Event()
        self._drained = asyncio.Event()
        self._pending: list[Batch] = []
        self._pending_bytes = 0
        self._listener: StreamListener | None = None
        self._gaps: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        self.drops: dict[str, int] = {}

    @property
    def stats(self) -> dict[str, int]:
        """The replica's counters (pages: of every session, the current one included)."""
        live = self._listener.pages if self._listener is not None else 0
        return {**self._counts, "pages": self._counts["pages"] + live}

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
        while True:
            try:
                await self._session(self.leader_address)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
            except (SessionEnded, BoomscooterError, OSError) as exc:
                reason = str(exc)
            except Exception as exc:  # a bug must not stop the replica for good
                log.exception("replica.session_failed")
                reason = repr(exc)
            else:
                reason = "the leader ended the session"
            finally:
                self._leave()
            left = await self.node.run(self.machine.session_ended(reason))
            retry = next((c for c in left if isinstance(c, RetrySession)), None)
            if retry is None:  # no longer a replica: the runtime stops this follower
                return
            self.leader_address = retry.leader
            await asyncio.sleep(retry.delay_s)

    def _hello(self) -> pb.ReplicateRequest:
        node = self.node
        return pb.ReplicateRequest(
            replica_id=node.node_id,
            address=node.address,
            durable_seqno=self.machine.held_seqno(),
            last_seqno=node.log.last_seqno,
            last_epoch=node.log.last_epoch,
        )

    async def _session(self, address: str) -> None:
        channel = peers.node_channel(address)
        try:
            stub = pb_grpc.BoomscooterStub(channel)
            call = stub.Replicate()
            await call.write(self._hello())
            first = await call.read()
            if not isinstance(first, pb.ReplicateResponse):
                raise SessionEnded("the leader closed the Replicate stream")
            self._counts["sessions"] += 1
            try:
                self.node.apply(self.machine.session_offered(address, convert.session_offer(first)))
            except StaleLeader as exc:
                raise SessionEnded(str(exc)) from None
            log.info("replica.session", leader=address, epoch=first.session.epoch,
                     leader_last=first.last_seqno, commit=first.commit_seqno,
                     last_seqno=self.node.log.last_seqno)  # fmt: skip
            await self._learn_producers(first)
            await self._reconcile(stub, first.first_seqno)
            if first.sealed_segments and first.cast_address:
                await self._catch_up_by_cast(stub, first)
            self.node.apply(self.machine.session_reconciled(first.commit_seqno))
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
        async with self.node.append_lock:  # the journal is not being compacted meanwhile
            self.node.learn_producers(convert.producer_batches(response))

    async def _reconcile(self, stub: Any, leader_first: int) -> None:
        node = self.node
        if node.log.next_seqno < leader_first:
            # Empty, or everything it holds is older than what the leader still stores
            # (retention deleted the records between): start again where the leader's log
            # starts. Nothing lost: those records were committed and trimmed everywhere.
            if node.log.last_seqno:
                log.warning("replica.behind_retention", last_seqno=node.log.last_seqno,
                            leader_first_seqno=leader_first)  # fmt: skip
            await node.exclusive(lambda: node.rebase(leader_first))
            log.info("replica.rebased", first_seqno=leader_first)
        if await peers.reconcile(node, stub, leader_first):
            self._counts["truncations"] += 1

    # -- catch-up through segment casts ---------------------------------------------------

    async def _catch_up_by_cast(self, stub: Any, first: pb.ReplicateResponse) -> None:
        node = self.node
        names = sorted(n for n in first.sealed_segments if parse_file_name(n) is not None)
        bases = [parse_file_name(n).base_seqno for n in names]  # type: ignore[union-attr]
        for i, name in enumerate(names):
            end = bases[i + 1] - 1 if i + 1 < len(bases) else None
            if end is not None and end < node.log.next_seqno:
                continue  # already held
            if bases[i] < node.log.next_seqno:
                if end is not None:  # finish this segment record by record
                    await peers.copy_from(node, stub, end)
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
                records = await node.import_segment(path, bases[i])
                self._counts["imported_records"] += records
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            self._counts["segments_cast"] += 1
            self._counts["segment_cast_bytes"] += result.size
            log.info("replica.segment_cast", segment=name, bytes=result.size, records=records,
                     mbyte_per_s=round(result.mbyte_per_s, 1))  # fmt: skip

    # -- the live stream ------------------------------------------------------------------

    def _join(self, session: pb.MulticastSession) -> None:
        self._restart.clear()
        self._listener = listen(
            session,
            self.node.log.next_seqno,
            interface=self.node.config.interface,
            sink=self._handle,
            gaps=self._gaps,
        )

    def _leave(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
            self._counts["pages"] += listener.pages
            for reason, n in listener.drops.items():
                self.drops[reason] = self.drops.get(reason, 0) + n
        self._pending.clear()
        self._pending_bytes = 0

    def _handle(self, events: list[Any]) -> None:
        node = self.node
        for event in events:
            if isinstance(event, BatchReceived):
                self._pending.append(event.batch)
                self._pending_bytes += event.batch.header.length
                self._append_wake.set()
            elif isinstance(event, CommitAdvanced):
                node.apply(self.machine.leader_commit_seen(event.commit_seqno))
            elif isinstance(event, Gap):
                self._counts["gaps"] += 1
            elif isinstance(event, EpochChanged):
                self._restart.set()
        if self._listener is not None and self._pending_bytes > MAX_PENDING_BYTES:
            self._listener.pause()  # the disk is behind: Fetch later

    async def _appender(self) -> None:
        node = self.node
        while True:
            await self._append_wake.wait()
            self._append_wake.clear()
            batches, self._pending = self._pending, []
            self._pending_bytes = 0
            self._drained.set()
            if self._listener is not None:
                self._listener.resume()
            if not batches:
                continue
            async with node.append_lock:
                # pwrites into the page cache (every fsync policy leaves the fdatasyncs to
                # the storage's syncer thread): cheaper inline than a thread hop per group.
                node.store_replicated(batches)
            self._counts["appended_batches"] += len(batches)
            node.apply(self.machine.log_grew())
            node.durable_moved(self.machine.held_seqno())

    async def _fetcher(self, stub: Any) -> None:
        while True:
            start, end = await self._gaps.get()
            while (listener := self._listener) is not None:
                start = max(start, listener.receiver.next_seqno)
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
                for batch in batches:
                    self._counts["fetched_batches"] += 1
                    listener.repaired(batch.data)
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
            keepalive_s = self.machine.keepalive_s
            if sent is None or state[0] != sent[0] or self._loop.time() - sent_at >= keepalive_s:
                await call.write(hello)
                sent, sent_at = state, self._loop.time()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(keepalive_s):
                    await self._ack_wake.wait()

    async def _responses(self, call: Any) -> None:
        node = self.node
        while isinstance(response := await self._from_leader(call), pb.ReplicateResponse):
            session = response.session
            current = node.session
            if current is not None and (session.epoch, session.source_port) != (
                current.epoch,
                current.source_port,
            ):
                raise SessionEnded("the leader's stream changed")
            addresses = tuple(response.replica_addresses)
            node.apply(self.machine.session_update(response.commit_seqno, addresses))
            await self._learn_producers(response)
        raise SessionEnded("the leader ended the Replicate stream")

    async def _from_leader(self, call: Any) -> Any:
        """The leader's next session message. It speaks every ``UPDATE_S`` (0.5 s) even
        when idle: silent for ``--leader-timeout`` (frozen, cut off, its host gone without
        a reset), it is presumed lost and the session ends — the machine then asks the
        peers who leads."""
        timeout_s = self.node.config.leader_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await call.read()
        except TimeoutError:
            raise SessionEnded(f"no word from the leader for {timeout_s:g} s") from None


CATCHUP_PREFIX = ".catchup-"


def _remove_catchup_files(directory: str) -> None:
    for name in os.listdir(directory):
        if name.startswith((CATCHUP_PREFIX, "." + CATCHUP_PREFIX)):  # and bootcast's part files
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))
                log.info("replica.catchup_file_removed", file=name)
