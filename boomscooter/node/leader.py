"""A node (asyncio shell): storage, sequencing, the multicast stream, gRPC — as the
leader, or as a replica following one.

``await start_leader(config)`` opens (recovering) the log in ``data_dir``, loads the
producer journal, asks the peers it knows (``node.json``, :mod:`boomscooter.node.state`)
whether someone leads with a higher epoch (then it follows that leader: fencing), takes a
new epoch, starts the stream sender, the gRPC server (:mod:`boomscooter.node.servicer`)
and, with ``cast_listen``, a bootcast server offering the sealed segments as
``/join/segments/<file>``. ``await start_replica(config)`` (``config.follow`` names the
leader) opens the log and starts a :class:`~boomscooter.node.follower.Follower`; a replica
becomes leader through :meth:`LeaderNode.promote`, and a leader that learns of a higher
epoch becomes a replica (:meth:`LeaderNode.follow`). Appends run one at a time, inline (a
pwrite into the page cache costs less than a thread hop); fdatasyncs run on the storage's
syncer thread — under ``fsync=always`` back to back, each covering every batch appended
meanwhile (group commit, :func:`~boomscooter.node.config.storage_fsync`), and nothing
counts as held before its fdatasync returned.

What the leader *holds* (its vote in the commit rule) is its durable seqno — fsynced under
``always`` and ``interval``; under ``never`` every appended record counts, since that
policy promises nothing more. Subscribers deliver only committed records, so a record a
subscriber saw is never lost to a leader crash the policy covers, and a seqno is never
reused for other data. With replicas, the commit seqno is the highest seqno
``min_insync`` copies hold durably (:class:`~boomscooter.node.replication.ReplicaSet`);
on a replica it is the leader's commit seqno, capped at what the replica stores. Every
leader incarnation writes under an epoch no one used before (the stream's cast id is the
epoch).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from boomscooter.errors import (
    BatchEncodeError,
    ConfigError,
    ExpectedSeqnoError,
    NotLeaderError,
    RequestError,
    ServerUnavailableError,
    StorageError,
)
from boomscooter.node.config import DEFAULT_GROUP as DEFAULT_GROUP
from boomscooter.node.config import DEFAULT_MAX_BATCH_BYTES as DEFAULT_MAX_BATCH_BYTES
from boomscooter.node.config import GRPC_MESSAGE_BYTES as GRPC_MESSAGE_BYTES
from boomscooter.node.config import LeaderConfig as LeaderConfig
from boomscooter.node.config import ProduceBatch as ProduceBatch
from boomscooter.node.config import ProduceOutcome as ProduceOutcome
from boomscooter.node.config import split_hostport as split_hostport
from boomscooter.node.config import storage_fsync
from boomscooter.node.core import Appended, CommitTracker, DedupeTable, StreamSession
from boomscooter.node.journal import ProducerJournal
from boomscooter.node.multicast import StreamSender, split_group
from boomscooter.node.replication import ReplicaSet
from boomscooter.node.state import NodeState, load_state, next_version, save_state
from boomscooter.storage import Batch, FsyncMode, LogConfig, SegmentedLog
from boomscooter.storage.batch import encode_batch, restamp
from boomscooter.storage.segment import SEGMENT_HEADER_BYTES
from bootcast import server as bserver

log = structlog.get_logger("boomscooter.leader")

FEED_ENTRIES = 100_000


def _log_journal_sync(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and (exc := done.exception()) is not None:
        log.warning("journal.sync_failed", error=str(exc))


class LeaderNode:
    """A running node, leader or replica. Create with :func:`start_leader` or
    :func:`start_replica`; stop with :meth:`stop`."""

    def __init__(self, config: LeaderConfig, log_: SegmentedLog, state: NodeState) -> None:
        self.config = config
        self.log = log_
        self.state = state
        self.log_dir = os.path.abspath(config.data_dir)  # what Notifications announce
        self.role = "starting"
        self.started_at = time.time()
        self.epoch = max(state.epoch, log_.last_epoch)
        self.group, self.group_port = split_group(config.group, 7600)
        self.dedupe = DedupeTable()
        self.journal = ProducerJournal(config.data_dir)
        # On open the leader's whole log is durable: committed when its copy suffices.
        # With more copies required, what they held is not known here: start from 0
        # rather than commit records no quorum ever held.
        start_commit = log_.last_seqno if config.min_insync == 1 else 0
        self.tracker = CommitTracker(config.min_insync, commit_seqno=start_commit)
        self.replicas = ReplicaSet(self.tracker, insync_timeout_s=config.insync_timeout_s)
        self.leader_commit = 0  # as a replica: the leader's commit seqno (after reconciling)
        self.leader_address = ""
        self.session: StreamSession | None = None  # the stream subscribers join
        self.sender: StreamSender | None = None
        self.follower: Any = None  # boomscooter.node.follower.Follower while a replica
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="boomscooter-append")
        self._append_lock = asyncio.Lock()
        self._compaction: asyncio.Task[None] | None = None
        self.promote_lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()  # replaced on every change: a broadcast
        self.grpc_server: Any = None
        self.port = 0
        self.address = ""
        self.node_id = config.node_id or ""
        self.cast_port: int | None = None
        self.cast_address = ""  # host:port of the segment casts ("" without --cast-listen)
        self.cast_runner: Any = None
        self.cast_server: bserver.BootcastServer | None = None
        self.housekeeping_tasks: list[asyncio.Task[None]] = []
        self._tasks: list[asyncio.Task[None]] = []  # the leader's background duties
        # (last seqno, segment file, size after it) of appended, not yet committed batches.
        self._ends: deque[tuple[int, str, int]] = deque()
        # Where committed batches end (Notifications), and the seqno that ends there; found
        # in the log (committed_end) when no appended batch of this process says.
        self._committed_end = (log_.segment_files()[0][0], SEGMENT_HEADER_BYTES)
        self._committed_end_seqno = log_.first_seqno - 1
        self.counters = {"batches": 0, "records": 0, "duplicates": 0, "rejected": 0}
        # The leader's recent dedupe entries, numbered, for its replicas' sessions.
        self.dedupe_feed: deque[tuple[int, str, int, Appended]] = deque(maxlen=FEED_ENTRIES)
        self._feed_index = 0
        # The held seqno as the event loop last learned it (the syncer thread reports it
        # through call_soon_threadsafe): what acks=leader waits for, in step with the commit.
        self.held_seen = 0

    # -- state ------------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self.role == "leader"

    @property
    def commit_seqno(self) -> int:
        if self.is_leader:
            return self.tracker.commit_seqno
        return min(self.leader_commit, self.log.last_seqno)

    def held_seqno(self) -> int:
        if self.config.fsync.mode is FsyncMode.NEVER:
            return self.log.last_seqno
        return self.log.durable_seqno

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _commit_moved(self) -> None:
        commit = self.commit_seqno
        while self._ends and self._ends[0][0] <= commit:
            seqno, name, size = self._ends.popleft()
            self._committed_end, self._committed_end_seqno = (name, size), seqno
        if self.sender is not None:
            self.sender.commit_advanced()

    def _held(self, seqno: int) -> None:
        self.held_seen = max(self.held_seen, seqno)
        if self.is_leader and self.tracker.held("", seqno):
            self._commit_moved()
        if self.follower is not None:
            self.follower.durable_changed()
        self._notify()

    def committed_end(self) -> tuple[str, int]:
        """``(segment file, size)`` where the committed batches end (what Notifications
        announce: a reader of the files never reads an uncommitted record)."""
        commit = self.commit_seqno
        if self._committed_end_seqno < commit and commit >= self.log.first_seqno:
            # Committed before this process appended anything (a restart, a promotion, a
            # catch-up): the log says where that batch ends.
            with contextlib.suppress(StorageError):
                self._committed_end = self.log.end_of(commit)
                self._committed_end_seqno = commit
        return self._committed_end

    async def wait_change(self, timeout_s: float) -> None:
        """Return when anything was appended or committed, or after ``timeout_s``."""
        event = self._changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await event.wait()

    async def wait_commit(self, seqno: int, timeout_s: float) -> bool:
        """Wait until ``seqno`` is committed (False after ``timeout_s``); raises
        :class:`NotLeaderError` when this node stops leading meanwhile."""
        return await self._wait_leading(lambda: self.tracker.commit_seqno, seqno, timeout_s)

    async def wait_durable(self, seqno: int, timeout_s: float) -> bool:
        """Wait until the leader holds ``seqno`` durably (False after ``timeout_s``); raises
        :class:`NotLeaderError` when this node stops leading meanwhile (as a replica it may
        truncate the record)."""
        return await self._wait_leading(lambda: self.held_seen, seqno, timeout_s)

    async def _wait_leading(
        self, position: Callable[[], int], seqno: int, timeout_s: float
    ) -> bool:
        deadline = self._loop.time() + timeout_s
        epoch = self.epoch
        while position() < seqno:
            if not self.is_leader or self.epoch != epoch:
                raise self.not_leader()
            left = deadline - self._loop.time()
            if left <= 0:
                return False
            await self.wait_change(left)
        return True

    def not_leader(self) -> NotLeaderError:
        where = f"; the leader is {self.leader_address}" if self.leader_address else ""
        return NotLeaderError(
            f"this node is a {self.role}, not the leader{where}",
            leader_address=self.leader_address,
        )

    def segment_files(self) -> list[tuple[str, int]]:
        return self.log.segment_files()

    # -- appends (leader) -------------------------------------------------------------------

    async def append(self, request: ProduceBatch) -> ProduceOutcome:
        """Sequence, store and queue one producer batch (one at a time, in order).

        Shielded: a caller cancelled mid-append (a broken Produce stream, a stopping
        server) must not leave a batch stored without its dedupe entry, or the
        producer's retry would be stored a second time. The append completes; only
        the caller stops waiting for it."""
        if not self.is_leader:
            raise self.not_leader()
        return await asyncio.shield(self._append(request))

    async def _append(self, request: ProduceBatch) -> ProduceOutcome:
        async with self._append_lock:
            if not self.is_leader or self.sender is None:
                raise self.not_leader()
            if request.producer_id:
                DedupeTable.check_id(request.producer_id)
                earlier = self.dedupe.lookup(request.producer_id, request.batch_sequence)
                if earlier is not None:
                    self.counters["duplicates"] += 1
                    return ProduceOutcome(earlier, True)
            next_seqno = self.log.next_seqno
            expected = request.expected_first_seqno
            if expected is not None and expected != next_seqno:
                raise ExpectedSeqnoError(
                    f"expected first seqno {expected}, but the log continues at {next_seqno}",
                    next_seqno=next_seqno,
                )
            batch = self._stamp(request, next_seqno)
            appended = Appended(batch.base_seqno, batch.record_count, self.epoch)
            if request.producer_id:
                self.journal.append(request.producer_id, request.batch_sequence, appended)
            try:  # a pwrite into the page cache (fdatasyncs run on the syncer thread)
                self.log.append_batch(batch)
            except BaseException:
                if request.producer_id:
                    self.journal.undo(request.producer_id, request.batch_sequence, appended)
                raise
            if request.producer_id:
                self._remember(request.producer_id, request.batch_sequence, appended)
                self._feed_index += 1
                self.dedupe_feed.append(
                    (self._feed_index, request.producer_id, request.batch_sequence, appended)
                )
            self._ends.append((batch.last_seqno, *self.log.active_segment()))
            self.counters["batches"] += 1
            self.counters["records"] += batch.record_count
            await self.sender.enqueue(bytes(batch.data))
            self._held(self.held_seqno())
            return ProduceOutcome(appended, False)

    def _remember(self, producer_id: str, batch_sequence: int, appended: Appended) -> None:
        """A dedupe entry into the table (the journal already holds it). Called under the
        append lock."""
        self.dedupe.add(producer_id, batch_sequence, appended)
        if (fd := self.journal.sync_due()) is not None:
            synced = self._loop.run_in_executor(self._io, self.journal.sync_fd, fd)
            synced.add_done_callback(_log_journal_sync)
        if self.journal.needs_compaction() and self._compaction is None:
            self._compaction = self._loop.create_task(self._compact_journal())

    async def _compact_journal(self) -> None:
        """Rewrite the journal compactly on the storage thread (its fsyncs stall nobody),
        appends held off meanwhile (the append lock)."""
        try:
            async with self._append_lock:
                data = self.journal.encoded(self.dedupe)
                await self._loop.run_in_executor(self._io, self.journal.replace, data)
        except Exception as exc:  # the next append tries again
            log.warning("journal.compaction_failed", error=str(exc))
        finally:
            self._compaction = None

    async def exclusive(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` under the append lock, to its end even if the caller is cancelled
        meanwhile (a truncation, a rebase: the log and what describes it must change
        together); the lock is released only when ``work`` is done."""
        await self._append_lock.acquire()

        async def run() -> None:
            try:
                await work()
            finally:
                self._append_lock.release()

        await asyncio.shield(self._loop.create_task(run()))

    def _stamp(self, request: ProduceBatch, base_seqno: int) -> Batch:
        limit = self.config.max_batch_bytes
        try:
            if request.encoded is not None:
                if len(request.encoded) > limit:
                    raise RequestError(
                        f"batch of {len(request.encoded)} bytes exceeds the leader's limit of "
                        f"{limit} bytes; send smaller batches",
                        code="INVALID_ARGUMENT",
                    )
                batch = restamp(
                    Batch.from_bytes(request.encoded), base_seqno=base_seqno, epoch=self.epoch
                )
            else:
                entries = request.entries or ()
                if not entries:
                    raise RequestError("a batch needs at least one record")
                now_ms = time.time_ns() // 1_000_000
                stamped = [
                    e if e.timestamp_ms else e._replace(timestamp_ms=now_ms) for e in entries
                ]
                batch = encode_batch(stamped, base_seqno=base_seqno, epoch=self.epoch)
        except BatchEncodeError as exc:
            raise RequestError(str(exc)) from None
        if len(batch.data) > limit:
            raise RequestError(
                f"batch of {len(batch.data)} bytes exceeds the leader's limit of {limit} bytes"
            )
        return batch

    def check_quorum_possible(self) -> None:
        copies = self.replicas.in_sync_copies()
        if copies < self.tracker.min_insync:
            raise ServerUnavailableError(
                f"acks=quorum needs {self.tracker.min_insync} in-sync copies, {copies} available"
            )

    # -- replicas (leader side) -------------------------------------------------------------

    def _save_state(self) -> asyncio.Future[None]:
        """Write a snapshot of ``self.state``, numbered: an older one never lands last."""
        state = NodeState(self.state.epoch, list(self.state.peers), self.state.leader)
        return self._loop.run_in_executor(
            None, save_state, self.config.data_dir, state, next_version()
        )

    def _save_state_soon(self) -> None:
        self._save_state().add_done_callback(_log_state_save)

    # -- roles ------------------------------------------------------------------------------

    async def lead(self, *, epoch: int, min_insync: int, commit_seqno: int) -> None:
        """Become the leader of ``epoch`` (persisted first: an epoch is never reused)."""
        async with self._append_lock:
            await self._stop_following()
            self.state.epoch = max(self.state.epoch, epoch)
            self.state.leader = self.address
            await self._save_state()
            if self.sender is not None:  # never two streams
                await self.sender.close()
                self.sender = None
            self.epoch = epoch
            self.tracker = CommitTracker(min_insync, commit_seqno=commit_seqno)
            self.replicas = ReplicaSet(self.tracker, insync_timeout_s=self.config.insync_timeout_s)
            self._ends.clear()
            self.sender = StreamSender(
                self.group,
                self.group_port,
                epoch=epoch,
                page_size_bytes=self.config.page_size_bytes,
                interface=self.config.interface,
                ttl=self.config.ttl,
                rate_mbit=self.config.rate_mbit,
                heartbeat_ms=self.config.heartbeat_ms,
                position=lambda: (self.log.last_seqno, self.tracker.commit_seqno),
            )
            self.sender.start()
            self.session = StreamSession(
                group=self.group,
                port=self.group_port,
                cast_id=epoch,
                page_size_bytes=self.config.page_size_bytes,
                epoch=epoch,
                interface_hint=self.config.interface or "",
                heartbeat_ms=self.config.heartbeat_ms,
                source_port=self.sender.source_port,
            )
            self.role = "leader"
            self.leader_address = self.address
            from boomscooter.node import failover, replicate

            self.held_seen = self.held_seqno()  # as a replica it may have truncated since
            self._tasks = [
                self._loop.create_task(replicate.expire_replicas(self), name="replica-expiry"),
                self._loop.create_task(failover.watch_for_newer_leader(self), name="fencing"),
            ]
            self._held(self.held_seqno())
        log.info("node.leading", epoch=epoch, min_insync=min_insync, commit_seqno=commit_seqno,
                 last_seqno=self.log.last_seqno)  # fmt: skip

    async def follow(self, leader_address: str, *, epoch: int = 0) -> None:
        """Become (or stay) a replica of ``leader_address``; a leader steps down (fenced:
        it learned of a newer epoch and must never write again under its own)."""
        from boomscooter.node.follower import Follower

        async with self._append_lock:
            was = self.role
            await self._stop_leading()
            await self._stop_following()
            # Named before the save (an await): a peer asking meanwhile sees the new epoch
            # only with the leader of that epoch.
            self.leader_address = leader_address
            if epoch and epoch >= self.state.epoch:  # fenced by a leader of this epoch too
                self.state.epoch, self.state.leader = epoch, leader_address
                await self._save_state()
            self.role = "replica"
            self.leader_commit = 0  # known again once the follower reconciled
            self.session = None
            self.follower = Follower(self, leader_address)
            self.follower.start()
        if was == "leader":
            log.warning("node.fenced", leader=leader_address, epoch=epoch, own_epoch=self.epoch)
        log.info("node.following", leader=leader_address)

    async def _stop_leading(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        if self.sender is not None:
            sender, self.sender = self.sender, None
            await sender.close()
        if self.role == "leader":
            # It names no leader until it knows whom it follows (follow() names it): a peer
            # asking meanwhile must not take it for a replica of itself (two leaders fencing
            # each other).
            self.role, self.leader_address = "stepping-down", ""
        self._notify()  # quorum waiters see the role change

    async def _stop_following(self) -> None:
        if self.follower is not None:
            follower, self.follower = self.follower, None
            await follower.stop()

    async def promote(self, min_insync: int = 0, *, force: bool = False) -> dict[str, int]:
        """Manual failover (see :func:`boomscooter.node.failover.promote`)."""
        from boomscooter.node import failover

        return await failover.promote(self, min_insync, force=force)

    # -- lifecycle --------------------------------------------------------------------------

    def _durable_from_thread(self, seqno: int) -> None:
        if self.config.fsync.mode is not FsyncMode.NEVER:
            self._loop.call_soon_threadsafe(self._held, seqno)

    async def _start(self) -> None:
        from boomscooter.node import failover, housekeeping
        from boomscooter.node.servicer import serve_node  # the rpc edge imports this module

        loaded = await self._loop.run_in_executor(
            self._io, lambda: self.journal.load(self.dedupe, last_seqno=self.log.last_seqno)
        )
        self.log.on_durable = self._durable_from_thread
        self.grpc_server, self.port = await serve_node(self, self.config.listen)
        host, _ = split_hostport(self.config.listen)
        self.address = self.config.advertise or f"{host}:{self.port}"
        self.node_id = self.node_id or self.address
        housekeeping.start(self)
        if self.config.cast_listen:
            await housekeeping.start_segment_casts(self)
        newer = None
        if self.config.follow is None:
            newer = await failover.newer_leader(self, self.state.peers)
        if self.config.follow is not None or newer is not None:
            address, epoch = newer or (self.config.follow or "", 0)
            await self.follow(address, epoch=epoch)
        else:
            await self.lead(
                epoch=self.epoch + 1,
                min_insync=self.config.min_insync,
                commit_seqno=self.tracker.commit_seqno,
            )
        log.info(
            f"{self.role}.started",  # leader.started / replica.started
            listen=f"{host}:{self.port}",
            group=f"{self.group}:{self.group_port}",
            epoch=self.epoch,
            first_seqno=self.log.first_seqno,
            last_seqno=self.log.last_seqno,
            producers=len(self.dedupe),
            journal_entries=loaded,
            fsync=self.config.fsync.mode.value,
            cast_listen=f"{self.config.cast_listen.rpartition(':')[0]}:{self.cast_port}"
            if self.config.cast_listen
            else None,
        )

    async def apply_retention(self) -> int:
        """Apply the retention rules now (also done every ``retention_check_s``)."""
        async with self._append_lock:
            deleted = await self._loop.run_in_executor(self._io, self.log.apply_retention)
        if deleted:
            log.info("node.retention", segments=deleted, first_seqno=self.log.first_seqno)
            self._notify()
        return deleted

    def sealed_segment(self, name: str) -> bool:
        files = self.log.segment_files()
        return any(n == name for n, _ in files[:-1])

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop serving, let the sender drain, close the log (fsyncing it)."""
        from boomscooter.node import housekeeping

        role, commit = self.role, self.commit_seqno
        stats = dict(self.follower.stats) if self.follower is not None else {}
        if role == "stopped":
            return
        housekeeping.stop(self)
        await self._stop_following()
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace_s)
        if self.cast_runner is not None:
            await self.cast_runner.cleanup()
        # Appends still under way (shielded) finish first, while the sender still drains
        # the queue they may wait on; then the sender stops (releasing any waiter).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s + 5):
                async with self._append_lock:
                    pass
        await self._stop_leading()
        async with self._append_lock:
            await self._loop.run_in_executor(self._io, self._close_storage)
        self._io.shutdown(wait=True)
        self.role = "stopped"
        log.info(f"{role}.stopped", last_seqno=self.log.last_seqno, commit_seqno=commit, **stats)

    def _close_storage(self) -> None:
        try:
            self.journal.close()
        finally:
            self.log.close()


def _log_state_save(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and (exc := done.exception()) is not None:
        log.warning("node.state_save_failed", error=str(exc))


async def start_leader(config: LeaderConfig) -> LeaderNode:
    """Open the log and start serving (see the module docstring): as the leader, unless
    ``config.follow`` names one or a peer leads with a higher epoch."""
    os.makedirs(config.data_dir, exist_ok=True)
    log_config = LogConfig(
        fsync=storage_fsync(config.fsync),
        segment_bytes=config.segment_bytes,
        max_batch_bytes=config.max_batch_bytes,
        retention_bytes=config.retention_bytes,
        retention_ms=config.retention_ms,
    )
    storage = await asyncio.to_thread(SegmentedLog.open, config.data_dir, log_config)
    try:
        state = await asyncio.to_thread(load_state, config.data_dir)
    except BaseException:
        storage.close()
        raise
    node = LeaderNode(config, storage, state)
    try:
        await node._start()
    except BaseException:
        await node._stop_leading()
        await node._stop_following()
        if node.grpc_server is not None:
            await node.grpc_server.stop(0)
        storage.close()
        raise
    return node


async def start_replica(config: LeaderConfig) -> LeaderNode:
    """Open the log and follow ``config.follow`` (required)."""
    if config.follow is None:
        raise ConfigError("a replica needs --leader HOST:PORT")
    return await start_leader(config)
