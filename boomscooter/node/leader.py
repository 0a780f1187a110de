"""The leader node (asyncio shell): storage, sequencing, the multicast stream, gRPC.

``await start_leader(config)`` opens (recovering) the log in ``data_dir``, loads the
producer journal, starts the stream sender, the gRPC server (:mod:`boomscooter.node.servicer`)
and, with ``cast_listen``, a bootcast server offering the sealed segments as
``/join/segments/<file>``. Appends run one at a time; under ``fsync=always`` on a
dedicated thread (the append blocks for an fdatasync; the event loop must not), otherwise
inline (a pwrite into the page cache costs less than the thread hop).

What the leader *holds* (its vote in the commit rule) is its durable seqno — fsynced under
``always`` and ``interval``; under ``never`` every appended record counts, since that
policy promises nothing more. Subscribers deliver only committed records, so a record a
subscriber saw is never lost to a leader crash the policy covers, and a seqno is never
reused for other data. The epoch is the newest batch's epoch (1 for a new log); the
stream's cast id is the epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from boomscooter.errors import (
    BatchEncodeError,
    ConfigError,
    ExpectedSeqnoError,
    RequestError,
    ServerUnavailableError,
)
from boomscooter.node.core import Appended, CommitTracker, DedupeTable
from boomscooter.node.journal import ProducerJournal
from boomscooter.node.multicast import StreamSender, split_group
from boomscooter.storage import Batch, Entry, FsyncMode, FsyncPolicy, LogConfig, SegmentedLog
from boomscooter.storage.batch import encode_batch, restamp
from boomscooter.stream import DEFAULT_PAGE_SIZE, MIN_PAGE_SIZE
from bootcast import joinreply
from bootcast import server as bserver

log = structlog.get_logger("boomscooter.leader")

DEFAULT_GROUP = "239.255.66.1:7600"
DEFAULT_MAX_BATCH_BYTES = 16 << 20
GRPC_MESSAGE_BYTES = DEFAULT_MAX_BATCH_BYTES + (1 << 20)
SEGMENT_PREFIX = "segments/"


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaderConfig:
    data_dir: str
    listen: str = "127.0.0.1:0"
    group: str = DEFAULT_GROUP
    interface: str | None = None
    cast_listen: str | None = None
    min_insync: int = 1
    fsync: FsyncPolicy = field(default_factory=FsyncPolicy)
    page_size_bytes: int = DEFAULT_PAGE_SIZE
    rate_mbit: float = 0.0
    ttl: int = 1
    heartbeat_ms: int = 100
    segment_bytes: int = 256 << 20
    retention_bytes: int | None = None  # delete the oldest sealed segments above this
    retention_ms: int | None = None  # delete sealed segments whose newest record is older
    retention_check_s: float = 10.0
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
    node_id: str = field(default_factory=socket.gethostname)
    advertise: str | None = None  # the gRPC address others should use (default: bound)

    def __post_init__(self) -> None:
        if not MIN_PAGE_SIZE <= self.page_size_bytes <= 65000:
            raise ConfigError(f"--page-size must be in [{MIN_PAGE_SIZE}, 65000]")
        if self.rate_mbit < 0:
            raise ConfigError("--rate must not be negative (0 = unpaced)")
        if not 10 <= self.heartbeat_ms <= 60_000:
            raise ConfigError("--heartbeat-ms must be in [10, 60000]")
        if not 60 <= self.max_batch_bytes <= DEFAULT_MAX_BATCH_BYTES:
            raise ConfigError(f"--max-batch-bytes must be in [60, {DEFAULT_MAX_BATCH_BYTES}]")
        try:
            split_group(self.group, 7600)
        except ValueError as exc:
            raise ConfigError(f"--group: {exc}") from None
        split_hostport(self.listen, "--listen")
        if self.cast_listen is not None:
            split_hostport(self.cast_listen, "--cast-listen")


@dataclass(frozen=True, slots=True, kw_only=True)
class ProduceBatch:
    """A producer's batch as the servicer hands it over (no protobuf here)."""

    producer_id: str
    batch_sequence: int
    expected_first_seqno: int | None
    encoded: bytes | None = None
    entries: Sequence[Entry] | None = None


@dataclass(frozen=True, slots=True)
class ProduceOutcome:
    appended: Appended
    duplicate: bool


def _log_journal_sync(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and (exc := done.exception()) is not None:
        log.warning("journal.sync_failed", error=str(exc))


def split_hostport(text: str, what: str = "address") -> tuple[str, int]:
    """bootcast's ``HOST:PORT`` parser, its errors as ConfigError; an empty host is any."""
    try:
        host, port = joinreply.split_hostport(text)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    return host or "0.0.0.0", port


class LeaderNode:
    """A running leader. Create with :func:`start_leader`; stop with :meth:`stop`."""

    def __init__(self, config: LeaderConfig, log_: SegmentedLog) -> None:
        self.config = config
        self.log = log_
        self.log_dir = os.path.abspath(config.data_dir)  # what Notifications announce
        self.role = "leader"
        self.started_at = time.time()
        self.epoch = max(1, self._last_epoch())
        self.group, self.group_port = split_group(config.group, 7600)
        self.dedupe = DedupeTable()
        self.journal = ProducerJournal(config.data_dir)
        # On open the leader's whole log is durable: committed when its copy suffices.
        # With more copies required, what they held is not known here: start from 0
        # rather than commit records no quorum ever held.
        start_commit = log_.last_seqno if config.min_insync == 1 else 0
        self.tracker = CommitTracker(config.min_insync, commit_seqno=start_commit)
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="boomscooter-append")
        self._append_lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()  # replaced on every change: a broadcast
        self.sender = StreamSender(
            self.group,
            self.group_port,
            epoch=self.epoch,
            page_size_bytes=config.page_size_bytes,
            interface=config.interface,
            ttl=config.ttl,
            rate_mbit=config.rate_mbit,
            heartbeat_ms=config.heartbeat_ms,
            position=lambda: (self.log.last_seqno, self.tracker.commit_seqno),
        )
        self.grpc_server: Any = None
        self.port = 0
        self.address = ""
        self.cast_port: int | None = None
        self._cast_runner: Any = None
        self._cast_server: bserver.BootcastServer | None = None
        self._retention: asyncio.Task[None] | None = None
        # (last seqno, segment file, size after it) of appended, not yet committed batches.
        self._ends: deque[tuple[int, str, int]] = deque()
        self._committed_end = log_.active_segment()  # on open everything is committed
        self.counters = {"batches": 0, "records": 0, "duplicates": 0, "rejected": 0}

    def _last_epoch(self) -> int:
        if self.log.last_seqno < self.log.first_seqno:
            return 0
        batches = self.log.read_batches(self.log.last_seqno, max_bytes=1)
        return batches[-1].epoch if batches else 0

    # -- state ------------------------------------------------------------------------------

    @property
    def commit_seqno(self) -> int:
        return self.tracker.commit_seqno

    def held_seqno(self) -> int:
        if self.config.fsync.mode is FsyncMode.NEVER:
            return self.log.last_seqno
        return self.log.durable_seqno

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _held(self, seqno: int) -> None:
        if self.tracker.held("", seqno):
            self.sender.commit_advanced()
            commit = self.tracker.commit_seqno
            while self._ends and self._ends[0][0] <= commit:
                _, name, size = self._ends.popleft()
                self._committed_end = (name, size)
        self._notify()

    def committed_end(self) -> tuple[str, int]:
        """``(segment file, size)`` where the committed batches end (what Notifications
        announce: a reader of the files never reads an uncommitted record)."""
        return self._committed_end

    async def wait_change(self, timeout_s: float) -> None:
        """Return when anything was appended or committed, or after ``timeout_s``."""
        event = self._changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await event.wait()

    async def wait_commit(self, seqno: int, timeout_s: float) -> bool:
        deadline = self._loop.time() + timeout_s
        while self.tracker.commit_seqno < seqno:
            left = deadline - self._loop.time()
            if left <= 0:
                return False
            await self.wait_change(left)
        return True

    def segment_files(self) -> list[tuple[str, int]]:
        return self.log.segment_files()

    # -- appends ----------------------------------------------------------------------------

    async def append(self, request: ProduceBatch) -> ProduceOutcome:
        """Sequence, store and queue one producer batch (one at a time, in order).

        Shielded: a caller cancelled mid-append (a broken Produce stream, a stopping
        server) must not leave a batch stored without its dedupe entry, or the
        producer's retry would be stored a second time. The append completes; only
        the caller stops waiting for it."""
        return await asyncio.shield(self._append(request))

    async def _append(self, request: ProduceBatch) -> ProduceOutcome:
        async with self._append_lock:
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
            try:
                if self.config.fsync.mode is FsyncMode.ALWAYS:  # blocks for an fdatasync
                    await self._loop.run_in_executor(self._io, self.log.append_batch, batch)
                else:  # a pwrite into the page cache: cheaper than a thread hop
                    self.log.append_batch(batch)
            except BaseException:
                if request.producer_id:
                    self.journal.undo(request.producer_id, request.batch_sequence, appended)
                raise
            if request.producer_id:
                self.dedupe.add(request.producer_id, request.batch_sequence, appended)
                if (fd := self.journal.sync_due()) is not None:
                    synced = self._loop.run_in_executor(self._io, self.journal.sync_fd, fd)
                    synced.add_done_callback(_log_journal_sync)
                if self.journal.needs_compaction():
                    self.journal.rewrite(self.dedupe)
            self._ends.append((batch.last_seqno, *self.log.active_segment()))
            self.counters["batches"] += 1
            self.counters["records"] += batch.record_count
            await self.sender.enqueue(bytes(batch.data))
            self._held(self.held_seqno())
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
        copies = 1  # the leader; replicas join the count in the replication issue
        if copies < self.tracker.min_insync:
            raise ServerUnavailableError(
                f"acks=quorum needs {self.tracker.min_insync} in-sync copies, {copies} available"
            )

    # -- lifecycle --------------------------------------------------------------------------

    def _durable_from_thread(self, seqno: int) -> None:
        if self.config.fsync.mode is not FsyncMode.NEVER:
            self._loop.call_soon_threadsafe(self._held, seqno)

    async def _start(self) -> None:
        from boomscooter.node.servicer import serve_node  # the rpc edge imports this module

        loaded = await self._loop.run_in_executor(
            self._io, lambda: self.journal.load(self.dedupe, last_seqno=self.log.last_seqno)
        )
        self.log.on_durable = self._durable_from_thread
        self.sender.start()
        if self.config.retention_bytes is not None or self.config.retention_ms is not None:
            self._retention = self._loop.create_task(self._retention_loop())
        self.grpc_server, self.port = await serve_node(self, self.config.listen)
        host, _ = split_hostport(self.config.listen)
        self.address = self.config.advertise or f"{host}:{self.port}"
        if self.config.cast_listen:
            await self._start_segment_casts()
        if self.config.min_insync > 1:
            log.warning(
                "leader.min_insync_unreachable",
                min_insync=self.config.min_insync,
                reason="this leader takes no replicas yet: nothing commits, acks=quorum fails",
            )
        log.info(
            "leader.started",
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
            log.info("leader.retention", segments=deleted, first_seqno=self.log.first_seqno)
            self._notify()
        return deleted

    async def _retention_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.retention_check_s)
            try:
                await self.apply_retention()
            except Exception as exc:  # a failed deletion must not stop the leader
                log.warning("leader.retention_failed", error=str(exc))

    def sealed_segment(self, name: str) -> bool:
        files = self.log.segment_files()
        return any(n == name for n, _ in files[:-1])

    async def _start_segment_casts(self) -> None:
        assert self.config.cast_listen is not None
        host, port = split_hostport(self.config.cast_listen)
        config = bserver.ServeConfig(
            root=Path(self.config.data_dir),
            host=host,
            port=port,
            interface=self.config.interface,
            ttl=self.config.ttl,
            prehash_bytes=0,
            path_prefix=SEGMENT_PREFIX,
            allow=self.sealed_segment,
        )
        self._cast_server, self._cast_runner, self.cast_port = await bserver.start_server(config)

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop serving, let the sender drain, close the log (fsyncing it)."""
        if self._retention is not None:
            self._retention.cancel()
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace_s)
        if self._cast_runner is not None:
            await self._cast_runner.cleanup()
        # Appends still under way (shielded) finish first, while the sender still drains
        # the queue they may wait on; then the sender stops (releasing any waiter).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s + 5):
                async with self._append_lock:
                    pass
        await self.sender.close()
        async with self._append_lock:
            await self._loop.run_in_executor(self._io, self._close_storage)
        self._io.shutdown(wait=True)
        log.info("leader.stopped", last_seqno=self.log.last_seqno, commit_seqno=self.commit_seqno)

    def _close_storage(self) -> None:
        try:
            self.journal.close()
        finally:
            self.log.close()


async def start_leader(config: LeaderConfig) -> LeaderNode:
    """Open the log and start serving (see the module docstring)."""
    os.makedirs(config.data_dir, exist_ok=True)
    log_config = LogConfig(
        fsync=config.fsync,
        segment_bytes=config.segment_bytes,
        max_batch_bytes=config.max_batch_bytes,
        retention_bytes=config.retention_bytes,
        retention_ms=config.retention_ms,
    )
    storage = await asyncio.to_thread(SegmentedLog.open, config.data_dir, log_config)
    node = LeaderNode(config, storage)
    try:
        await node._start()
    except BaseException:
        await node.sender.close()
        storage.close()
        raise
    return node
