"""A node's asyncio runtime: storage, the multicast stream, gRPC, timers — carrying out what
its :class:`~boomscooter.node.machine.NodeMachine` decides.

``await start_leader(config)`` opens (recovering) the log in ``data_dir``, loads the
producer journal, serves gRPC (:mod:`boomscooter.node.servicer`) and, with ``cast_listen``,
a bootcast server offering the sealed segments as ``/join/segments/<file>``; then it starts
the machine: a leader asks the peers it knows (``node.json``) whether someone leads with a
higher epoch (then it follows that leader: fencing), or takes a new epoch and leads.
``await start_replica(config)`` (``config.follow`` names the leader) follows from the start.

The runtime decides nothing about roles, epochs or commits: it feeds the machine events (a
producer's batch, a durable seqno from the syncer thread, a replica's ack, a peer's Status,
a tick) and executes the commands it returns. Appends run one at a time, inline (a pwrite
into the page cache costs less than a thread hop); fdatasyncs run on the storage's syncer
thread — under ``fsync=always`` back to back, each covering every batch appended meanwhile
(group commit, :func:`~boomscooter.node.config.storage_fsync`), and nothing counts as held
before its fdatasync returned. The append lock keeps appends, truncations, journal
compaction and the stream's start and stop apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from boomscooter.errors import BatchEncodeError, ConfigError, RequestError, StorageError
from boomscooter.node import housekeeping, peers
from boomscooter.node import machine as m
from boomscooter.node.config import (
    NodeConfig,
    ProduceBatch,
    ProduceOutcome,
    split_hostport,
    storage_fsync,
)
from boomscooter.node.core import Appended, StreamSession
from boomscooter.node.follower import Follower
from boomscooter.node.journal import ProducerJournal
from boomscooter.node.multicast import StreamSender, split_group
from boomscooter.node.servicer import serve_node
from boomscooter.node.state import NodeState, load_state, next_version, save_state
from boomscooter.node.watchdog import LoopWatchdog
from boomscooter.storage import Batch, FsyncMode, LogConfig, SegmentedLog
from boomscooter.storage.batch import encode_batch, restamp
from boomscooter.storage.segment import SEGMENT_HEADER_BYTES
from bootcast import server as bserver
from bootcast.logs import get_logger

log = get_logger("boomscooter.node")

# The machine's ticks: replica expiry and the fencing check (the latter every
# MachineConfig.watch_interval_s).
MAX_TICK_S = 0.5


def _log_failure(what: str) -> Callable[[asyncio.Future[Any]], None]:
    def done(future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and (exc := future.exception()) is not None:
            log.warning(what, error=str(exc))

    return done


class Node:
    """A running node, leader or replica (its machine says which). Create with
    :func:`start_leader` or :func:`start_replica`; stop with :meth:`stop`."""

    def __init__(self, config: NodeConfig, log_: SegmentedLog, state: NodeState) -> None:
        self.config = config
        self.log = log_
        self.log_dir = os.path.abspath(config.data_dir)  # what Notifications announce
        self.machine = m.NodeMachine(
            m.MachineConfig(
                min_insync=config.min_insync,
                insync_timeout_s=config.insync_timeout_s,
                fsync_never=config.fsync.mode is FsyncMode.NEVER,
                follow=config.follow,
            ),
            log_,
            state,
            versions=next_version,
        )
        self.started_at = time.time()
        self.group, self.group_port = split_group(config.group, 7600)
        self.journal = ProducerJournal(config.data_dir)
        self.sender: StreamSender | None = None
        self.follower: Any = None  # boomscooter.node.follower.Follower while a replica
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="boomscooter-append")
        self.append_lock = asyncio.Lock()
        self._compaction: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()  # replaced on every change: a broadcast
        self._promotions: list[asyncio.Future[m.PromotionDone]] = []
        self._ticker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.grpc_server: Any = None
        self.port = 0
        self.node_id = config.node_id or ""
        self.cast_port: int | None = None
        self.cast_address = ""  # host:port of the segment casts ("" without --cast-listen)
        self.cast_runner: Any = None
        self.cast_server: bserver.BootcastServer | None = None
        self.housekeeping_tasks: list[asyncio.Task[None]] = []
        # (last seqno, segment file, size after it) of appended, not yet committed batches.
        self._ends: deque[tuple[int, str, int]] = deque()
        # Where committed batches end (Notifications), and the seqno that ends there; found
        # in the log (committed_end) when no appended batch of this process says.
        self._committed_end = (log_.segment_files()[0][0], SEGMENT_HEADER_BYTES)
        self._committed_end_seqno = log_.first_seqno - 1
        self.counters = {"batches": 0, "records": 0, "duplicates": 0, "rejected": 0}
        self.watchdog = LoopWatchdog()

    # -- what the machine knows ---------------------------------------------------------------

    @property
    def role(self) -> str:
        return self.machine.role.value

    @property
    def is_leader(self) -> bool:
        return self.machine.is_leader

    @property
    def epoch(self) -> int:
        return self.machine.epoch

    @property
    def state(self) -> NodeState:
        return self.machine.state

    @property
    def address(self) -> str:
        return self.machine.address

    @property
    def leader_address(self) -> str:
        return self.machine.leader_address

    @property
    def session(self) -> StreamSession | None:
        return self.machine.session

    @property
    def tracker(self) -> Any:
        return self.machine.tracker

    @property
    def replicas(self) -> Any:
        return self.machine.replicas

    @property
    def dedupe(self) -> Any:
        return self.machine.dedupe

    @property
    def commit_seqno(self) -> int:
        return self.machine.commit_seqno

    @property
    def durable_seen(self) -> int:
        return self.machine.durable_seen

    def held_seqno(self) -> int:
        return self.machine.held_seqno()

    def not_leader(self) -> Exception:
        return self.machine.not_leader()

    def segment_files(self) -> list[tuple[str, int]]:
        return self.log.segment_files()

    def sealed_segment(self, name: str) -> bool:
        files = self.log.segment_files()
        return any(n == name for n, _ in files[:-1])

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

    # -- waiting ------------------------------------------------------------------------------

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

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
        return await self._wait_leading(lambda: self.durable_seen, seqno, timeout_s)

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

    # -- carrying out commands ------------------------------------------------------------------

    def apply(self, commands: list[m.Command]) -> None:
        """Carry out commands that need no awaiting (from the hot paths)."""
        for command in commands:
            if isinstance(command, m.CommitMoved):
                self._commit_moved(command.commit_seqno)
            elif isinstance(command, m.Changed):
                self._notify()
            elif isinstance(command, m.Note):
                getattr(log, command.level)(command.event, **command.fields)
            elif isinstance(command, m.SaveState) and not command.wait:
                self._save(command).add_done_callback(_log_failure("node.state_save_failed"))
            else:
                raise AssertionError(f"{command!r} needs awaiting: use run()")

    async def run(self, commands: list[m.Command]) -> list[m.Command]:
        """Carry out ``commands`` in order, each awaited one's continuation right after
        it; returns those addressed to the caller (a replica's :class:`RetrySession`)."""
        queue = deque(commands)
        left: list[m.Command] = []
        while queue:
            command = queue.popleft()
            if isinstance(command, m.RetrySession):
                left.append(command)
                continue
            more = await self._execute(command)
            queue.extendleft(reversed(more))
        return left

    async def _execute(self, command: m.Command) -> list[m.Command]:
        machine = self.machine
        if isinstance(command, m.SaveState) and command.wait:
            await self._save(command)
            return machine.state_saved(command.version)
        if isinstance(command, m.Survey) and command.fence_epoch:
            answers = await peers.fence(command.addresses, command.fence_epoch, self.address)
            return machine.surveyed(command.token, answers, self._loop.time())
        if isinstance(command, m.Survey):
            answers = await peers.survey(command.addresses)
            return machine.surveyed(command.token, answers, self._loop.time())
        if isinstance(command, m.StartStream):
            return machine.stream_started(await self._start_stream(command.epoch))
        if isinstance(command, m.StopStream):
            await self._stop_stream()
        elif isinstance(command, m.StartFollowing):
            await self._stop_following(locked=True)
            self.follower = Follower(self, command.leader)
            self.follower.start()
        elif isinstance(command, m.StopFollowing):
            await self._stop_following(locked=True)
        elif isinstance(command, m.Gather):
            return await self._gather(command)
        elif isinstance(command, m.ForgetAfter):
            await self._rewrite_journal()
        elif isinstance(command, m.PromotionDone):
            for waiter in self._promotions:
                if not waiter.done():
                    waiter.set_result(command)
            self._promotions.clear()
        else:
            self.apply([command])
        return []

    def _background(self, work: Coroutine[Any, Any, Any], name: str) -> None:
        """Run ``work`` on a task of its own (it must finish even if its caller was
        cancelled), kept until it ends."""
        task: asyncio.Task[Any] = self._loop.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure(f"node.{name}_failed"))

    def _save(self, command: m.SaveState) -> asyncio.Future[None]:
        return self._loop.run_in_executor(
            None, save_state, self.config.data_dir, command.state, command.version
        )

    def _commit_moved(self, commit: int) -> None:
        while self._ends and self._ends[0][0] <= commit:
            seqno, name, size = self._ends.popleft()
            self._committed_end, self._committed_end_seqno = (name, size), seqno
        if self.sender is not None:
            self.sender.commit_advanced()

    def durable_moved(self, seqno: int) -> None:
        """This node holds everything up to ``seqno`` (the syncer, an append)."""
        self.apply(self.machine.durable_moved(seqno))
        if self.follower is not None:
            self.follower.durable_changed()

    def _durable_from_thread(self, seqno: int) -> None:
        if self.config.fsync.mode is not FsyncMode.NEVER:
            self._loop.call_soon_threadsafe(self.durable_moved, seqno)

    # -- the stream -----------------------------------------------------------------------------

    async def _start_stream(self, epoch: int) -> StreamSession:
        """A sender for ``epoch`` (the old one closed: never two streams)."""
        await self._stop_following(locked=True)
        async with self.append_lock:
            if self.sender is not None:  # never two streams
                await self.sender.close()
                self.sender = None
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
            return StreamSession(
                group=self.group,
                port=self.group_port,
                cast_id=epoch,
                page_size_bytes=self.config.page_size_bytes,
                epoch=epoch,
                interface_hint=self.config.interface or "",
                heartbeat_ms=self.config.heartbeat_ms,
                source_port=self.sender.source_port,
            )

    async def _stop_stream(self) -> None:
        # In-flight appends finish first (they may wait on the sender's queue).
        async with self.append_lock:
            if self.sender is not None:
                sender, self.sender = self.sender, None
                await sender.close()
        self._notify()  # quorum waiters see the role change

    async def _stop_following(self, *, locked: bool = False) -> None:
        """Stop the follower; ``locked``: once the work it does under the append lock (a
        truncation, a rebase, a segment import) is done — the log is then not changing
        under whoever comes next (a promotion's gather, a new leader's stream)."""
        if self.follower is None:
            return
        if locked:
            async with self.append_lock:
                follower, self.follower = self.follower, None
                if follower is not None:
                    await follower.stop()
        else:
            follower, self.follower = self.follower, None
            await follower.stop()

    async def _tick_loop(self) -> None:
        interval = min(MAX_TICK_S, self.config.insync_timeout_s / 4)
        check: asyncio.Task[list[m.Command]] | None = None
        try:
            while True:
                await asyncio.sleep(interval)
                commands = self.machine.tick(self._loop.time())
                surveys: list[m.Command] = [c for c in commands if isinstance(c, m.Survey)]
                self.apply([c for c in commands if not isinstance(c, m.Survey)])
                # The fencing check waits for slow peers on a task of its own: the expiry
                # of silent replicas does not wait for it.
                if surveys and (check is None or check.done()):
                    check = self._loop.create_task(self.run(surveys), name="fencing-check")
                    check.add_done_callback(_log_failure("node.fencing_check_failed"))
        finally:
            if check is not None:
                check.cancel()

    # -- appends (leader) ---------------------------------------------------------------------

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
        machine = self.machine
        async with self.append_lock:
            if not machine.is_leader or self.sender is None:
                raise self.not_leader()
            earlier = machine.earlier(request.producer_id, request.batch_sequence)
            if earlier is not None:
                self.counters["duplicates"] += 1
                return ProduceOutcome(earlier, True)
            next_seqno = self.log.next_seqno
            machine.check_expected(request.expected_first_seqno, next_seqno)
            batch = self._stamp(request, next_seqno)
            appended = Appended(batch.base_seqno, batch.record_count, machine.epoch)
            if request.producer_id:  # the journal entry first: a crash never splits them
                self.journal.append(request.producer_id, request.batch_sequence, appended)
            try:  # a pwrite into the page cache (fdatasyncs run on the syncer thread)
                self.log.append_batch(batch)
            except BaseException:
                if request.producer_id:
                    self.journal.undo(request.producer_id, request.batch_sequence, appended)
                raise
            machine.appended(request.producer_id, request.batch_sequence, appended)
            self._journal_upkeep()
            self._ends.append((batch.last_seqno, *self.log.active_segment()))
            self.counters["batches"] += 1
            self.counters["records"] += batch.record_count
            await self.sender.enqueue(bytes(batch.data))
            self.durable_moved(machine.held_seqno())
            return ProduceOutcome(appended, False)

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
        self.machine.check_produce(quorum=True)

    # -- appends, truncations and dedupe entries (replica) ------------------------------------

    def store_replicated(self, batches: list[Batch]) -> None:
        """Append batches received from the leader (under the append lock)."""
        log_ = self.log
        for batch in batches:
            log_.append_batch(batch)
            self._ends.append((batch.last_seqno, *log_.active_segment()))

    def learn_producers(self, entries: list[tuple[str, int, Appended]]) -> None:
        """As a replica: the leader's dedupe entries, kept (and journaled) so that after a
        promotion a producer's retry of a batch this log holds is not stored twice. Under
        the append lock (the journal is not being compacted meanwhile)."""
        for producer_id, sequence, appended in entries:
            if not self.dedupe.holds(producer_id, sequence):
                self.journal.append(producer_id, sequence, appended)
                self.machine.appended(producer_id, sequence, appended)
        self._journal_upkeep()

    def _journal_upkeep(self) -> None:
        if (fd := self.journal.sync_due()) is not None:
            synced = self._loop.run_in_executor(self._io, self.journal.sync_fd, fd)
            synced.add_done_callback(_log_failure("journal.sync_failed"))
        if self.journal.needs_compaction() and self._compaction is None:
            self._compaction = self._loop.create_task(self._compact_journal())

    async def _compact_journal(self) -> None:
        """Rewrite the journal compactly on the storage thread (its fsyncs stall nobody),
        appends held off meanwhile (the append lock)."""
        try:
            async with self.append_lock:
                data = self.journal.encoded(self.dedupe)
                await self._loop.run_in_executor(self._io, self.journal.replace, data)
        except Exception as exc:  # the next append tries again
            log.warning("journal.compaction_failed", error=str(exc))
        finally:
            self._compaction = None

    async def _rewrite_journal(self) -> None:
        data = self.journal.encoded(self.dedupe)
        await self._loop.run_in_executor(self._io, self.journal.replace, data)

    async def exclusive(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` under the append lock, to its end even if the caller is cancelled
        meanwhile (a truncation, a rebase: the log and what describes it must change
        together); the lock is released only when ``work`` is done."""
        await self.append_lock.acquire()

        async def run() -> None:
            try:
                await work()
            finally:
                self.append_lock.release()

        await asyncio.shield(self._loop.create_task(run()))

    async def truncate_after(self, seqno: int) -> None:
        """Drop every record after ``seqno`` and the dedupe entries of those records (a
        diverged tail). Under :meth:`exclusive`."""
        await asyncio.to_thread(self.log.truncate_after, seqno)
        self.machine.truncated(seqno)
        await self._rewrite_journal()
        self._ends.clear()

    async def rebase(self, base: int) -> None:
        """The log starts again, empty, at ``base`` (its records are all older than what the
        leader still stores). Under :meth:`exclusive`."""
        await asyncio.to_thread(self.log.rebase, base)
        self._committed_end = self.log.active_segment()
        self._committed_end_seqno = base - 1
        self.machine.truncated(base - 1)
        await self._rewrite_journal()
        self._ends.clear()

    async def import_segment(self, path: str, base: int) -> int:
        """Append the batches of a fetched segment file that continue the log."""
        async with self.append_lock:  # not beside retention or a truncation
            return await asyncio.to_thread(self.log.import_segment, path, base)

    # -- promotion ------------------------------------------------------------------------------

    async def promote(self, min_insync: int = 0, *, force: bool = False) -> dict[str, int]:
        """Manual failover: this replica becomes the leader (the machine's promotion)."""
        waiter: asyncio.Future[m.PromotionDone] = self._loop.create_future()
        self._promotions.append(waiter)
        try:
            await self.run(self.machine.promote(min_insync, force=force))
        except BaseException as exc:
            # Cancelled (the RPC's deadline), or a failure of the log or a save: follow
            # again rather than stay a node that neither follows nor leads.
            if waiter in self._promotions:
                self._promotions.remove(waiter)
            if not isinstance(exc, RequestError):
                error = RequestError(f"promotion failed, still a replica: {exc!r}",
                                     code="UNAVAILABLE")  # fmt: skip
                recover = self.machine.promotion_failed(error)
                self._background(self.run(recover), "promotion-recovery")
            raise
        done = await waiter
        if done.error is not None:
            raise done.error
        assert done.result is not None
        return done.result

    async def _gather(self, command: m.Gather) -> list[m.Command]:
        try:
            records = await peers.gather(self, command.source, command.first_seqno,
                                         command.last_seqno)  # fmt: skip
            if self.config.fsync.mode is not FsyncMode.NEVER:
                await asyncio.to_thread(self.log.sync)  # see m.Gather
        except (peers.PeerFailed, StorageError) as exc:
            error = RequestError(f"promotion failed, still a replica: {exc}", code="UNAVAILABLE")
            return self.machine.promotion_failed(error)
        return self.machine.gathered(records)

    async def fence(self, epoch: int, leader: str) -> None:
        """A node being promoted claimed ``epoch`` (its Fence call): once this returns the
        claim is on disk and this node takes part in no older epoch (a leader stopped
        leading: appends and acks waiting for it end with NOT_LEADER). Carried out on a
        task of its own: a caller that gives up (its deadline, a claimant gone) must not
        leave the node stepping down halfway, neither leading nor following."""
        work = self._loop.create_task(self.run(self.machine.fence_asked(epoch, leader)))
        self._tasks.add(work)
        work.add_done_callback(self._tasks.discard)
        work.add_done_callback(_log_failure("node.fence_failed"))
        await asyncio.shield(work)

    async def follow(self, leader: str, *, epoch: int = 0) -> None:
        """Become (or stay) a replica of ``leader`` (a leader steps down: fenced)."""
        await self.run(self.machine.follow(leader, epoch))

    # -- lifecycle ------------------------------------------------------------------------------

    async def _start(self) -> None:
        loaded = await self._loop.run_in_executor(
            self._io, lambda: self.journal.load(self.dedupe, last_seqno=self.log.last_seqno)
        )
        self.log.on_durable = self._durable_from_thread
        self.grpc_server, self.port = await serve_node(self, self.config.listen)
        host, _ = split_hostport(self.config.listen)
        self.machine.address = self.config.advertise or f"{host}:{self.port}"
        self.node_id = self.node_id or self.address
        self.watchdog.start()
        housekeeping.start(self)
        if self.config.cast_listen:
            await housekeeping.start_segment_casts(self)
        self._ticker = self._loop.create_task(self._tick_loop(), name="node-ticks")
        await self.run(self.machine.start())
        if self.machine.role is m.Role.STARTING:
            raise RuntimeError("the node neither leads nor follows after starting")
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
        async with self.append_lock:
            deleted = await self._loop.run_in_executor(self._io, self.log.apply_retention)
        if deleted:
            log.info("node.retention", segments=deleted, first_seqno=self.log.first_seqno)
            self._notify()
        return deleted

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop serving, let the sender drain, close the log (fsyncing it)."""
        role, commit = self.role, self.commit_seqno
        stats = dict(self.follower.stats) if self.follower is not None else {}
        if role == "stopped":
            return
        housekeeping.stop(self)
        for task in list(self._tasks):
            task.cancel()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        await self._stop_following()
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace_s)
        if self.cast_runner is not None:
            await self.cast_runner.cleanup()
        # Appends still under way (shielded) finish first, while the sender still drains
        # the queue they may wait on; then the sender stops (releasing any waiter).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s + 5):
                async with self.append_lock:
                    pass
        if self.sender is not None:  # without the lock: its close frees a blocked append
            sender, self.sender = self.sender, None
            await sender.close()
        await self.run(self.machine.stop())
        await self._stop_stream()
        async with self.append_lock:
            await self._loop.run_in_executor(self._io, self._close_storage)
        self._io.shutdown(wait=True)
        self.watchdog.stop()
        log.info(f"{role}.stopped", last_seqno=self.log.last_seqno, commit_seqno=commit, **stats)

    def _close_storage(self) -> None:
        try:
            self.journal.close()
        finally:
            self.log.close()


async def start_leader(config: NodeConfig) -> Node:
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
    node = Node(config, storage, state)
    try:
        await node._start()
    except BaseException:
        await node.stop(grace_s=0)
        raise
    return node


async def start_replica(config: NodeConfig) -> Node:
    """Open the log and follow ``config.follow`` (required)."""
    if config.follow is None:
        raise ConfigError("a replica needs --leader HOST:PORT")
    return await start_leader(config)
