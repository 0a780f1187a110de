"""Helpers for the replication acceptance tests, whose nodes are real processes
(:class:`support.process.Node`): the CLI, a node's Status, producers and subscribers of the
SDK that note what they were acked and what they delivered, and the checks on logs read back
from the data directories after every node stopped."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from boomscooter.client.producer import Producer
from boomscooter.client.subscriber import Subscriber
from boomscooter.rpc import create_channel
from boomscooter.storage import LogReader
from boomscooter.storage.batch import Record
from boomscooter.v1 import boomscooter_pb2 as pb
from boomscooter.v1 import boomscooter_pb2_grpc as pb_grpc

from support.log import payload
from support.log import raw_batch as log_raw_batch
from support.process import CLI, ENV, REPO, Node
from support.waiting import PATIENCE_S


def run_cli(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, timeout=timeout_s, env=ENV, cwd=REPO, check=False
    )


async def cli(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[bytes]:
    return await asyncio.to_thread(functools.partial(run_cli, *args, timeout_s=timeout_s))


def three_nodes(root: Path, *options: str) -> tuple[Node, Node, Node]:
    """A leader and two replicas of it, all with ``options`` (none started)."""
    leader = Node("leader", root / "leader", "leader", list(options))
    replicas = [
        Node(name, root / name, "replica", list(options), leader=leader.address)
        for name in ("replica-a", "replica-b")
    ]
    return leader, replicas[0], replicas[1]


async def status(address: str, timeout_s: float = PATIENCE_S) -> pb.StatusResponse:
    """The node's Status. Retried while it is unreachable: a node just (re)started on a port
    this process failed to reach shortly before is reached once gRPC's reconnect backoff
    (at most 2 s in the SDK's channels) has passed."""
    deadline = time.monotonic() + timeout_s
    channel = create_channel(address)
    try:
        stub = pb_grpc.BoomscooterStub(channel)
        while True:
            try:
                response: pb.StatusResponse = await stub.Status(pb.StatusRequest(), timeout=30)
                return response
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await channel.close()


async def wait_status(
    address: str,
    predicate: Callable[[pb.StatusResponse], bool],
    what: str,
    *,
    timeout_s: float = PATIENCE_S,
) -> pb.StatusResponse:
    deadline = time.monotonic() + timeout_s
    while True:
        current = await status(address)
        if predicate(current):
            return current
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {current}"
        await asyncio.sleep(0.1)


def replica_view(leader_status: pb.StatusResponse, node: Node) -> pb.ReplicaStatus | None:
    for replica in leader_status.replicas:
        if replica.address == node.address:
            return replica
    return None


def in_sync(node: Node) -> Callable[[pb.StatusResponse], bool]:
    """A predicate on the leader's status: ``node`` is an in-sync replica."""

    def check(leader_status: pb.StatusResponse) -> bool:
        view = replica_view(leader_status, node)
        return view is not None and view.in_sync and view.connected

    return check


# -- producers and subscribers ---------------------------------------------------------------


@dataclass
class ProducerRun:
    """Sends ``payload(name, i)`` for i = 0 … ``total - 1`` (or until stopped); notes every
    ack and every failure."""

    name: str
    producer: Producer
    total: int
    sent: int = 0
    acked: dict[int, bytes] = field(default_factory=dict)
    failed: list[tuple[bytes, BaseException]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    gate: Callable[[], bool] = lambda: True  # sending pauses while it is False

    def _on_done(self, data: bytes, future: asyncio.Future[int | None]) -> None:
        if future.cancelled():
            self.failed.append((data, asyncio.CancelledError()))
        elif (error := future.exception()) is not None:
            self.failed.append((data, error))
        else:
            seqno = future.result()
            assert seqno is not None and seqno not in self.acked, f"seqno {seqno} acked twice"
            self.acked[seqno] = data

    async def run(self, per_tick: int = 500, tick_s: float = 0.001) -> None:
        while self.sent < self.total and not self.stop.is_set():
            if not self.gate():
                await asyncio.sleep(0.02)
                continue
            for _ in range(min(per_tick, self.total - self.sent)):
                data = payload(self.name, self.sent)
                future = await self.producer.send(data)
                future.add_done_callback(functools.partial(self._on_done, data))
                self.sent += 1
            await asyncio.sleep(tick_s)
        with contextlib.suppress(Exception):  # the failures are in the futures
            await self.producer.flush()


@dataclass
class SubscriberRun:
    """A subscriber whose deliveries are all noted (across restarts of the subscription)."""

    node: Node
    mode: str
    records: list[Record] = field(default_factory=list)
    error: BaseException | None = None
    restarts: int = 0
    subscriber: Subscriber | None = None
    task: asyncio.Task[None] | None = None

    @property
    def next_seqno(self) -> int:
        return self.records[-1].seqno + 1 if self.records else 1

    def start(self) -> None:
        assert self.task is None
        self.subscriber = Subscriber(
            self.node.address, start=self.next_seqno, mode=self.mode, interface="127.0.0.1",
            server_timeout_s=30, subscriber_id=f"{self.node.name}-{self.mode}-{self.restarts}",
        )  # fmt: skip
        self.restarts += 1
        self.task = asyncio.create_task(self._run(self.subscriber))

    async def _run(self, subscriber: Subscriber) -> None:
        try:
            async for batch in subscriber.batches():
                self.records.extend(batch)
        except Exception as exc:  # checked by the test
            self.error = exc

    async def stop(self) -> None:
        task, subscriber = self.task, self.subscriber
        self.task = self.subscriber = None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if subscriber is not None:
            await subscriber.close()


@contextlib.asynccontextmanager
async def subscribers(*runs: SubscriberRun) -> AsyncIterator[tuple[SubscriberRun, ...]]:
    for run in runs:
        run.start()
    try:
        yield runs
    finally:
        for run in runs:
            await run.stop()


def raw_batch(producer_id: str, sequence: int, payloads: list[bytes]) -> pb.ProduceRequest:
    """What the SDK sends at ``acks=quorum``."""
    return log_raw_batch(producer_id, sequence, payloads, pb.ACK_LEVEL_QUORUM)


# -- checks on stopped nodes' logs -----------------------------------------------------------


def read_log(data_dir: Path) -> list[Record]:
    records: list[Record] = []
    with LogReader(data_dir) as reader:
        while chunk := reader.read():
            records.extend(chunk)
    return records


def check_contiguous(seqnos: list[int], first: int = 1) -> None:
    """Strictly increasing and contiguous from ``first``, each once."""
    assert seqnos == list(range(first, first + len(seqnos))), (
        f"not contiguous from {first}: first break after "
        f"{next((a for a, b in itertools.pairwise(seqnos) if b != a + 1), None)}"
    )


def check_identical_logs(*data_dirs: Path) -> list[Record]:
    """The logs in ``data_dirs`` hold the very same records; returns them."""
    logs = [read_log(d) for d in data_dirs]
    first = logs[0]
    check_contiguous([r.seqno for r in first])
    for data_dir, other in zip(data_dirs[1:], logs[1:], strict=True):
        assert len(other) == len(first), f"{data_dir}: {len(other)} records, not {len(first)}"
        differ = next((a for a, b in zip(first, other, strict=True) if a != b), None)
        assert differ is None, f"{data_dir} differs from {data_dirs[0]} at {differ}"
    return first


def segment_bytes(data_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(data_dir.glob("*.log"))}


def check_stored(records: list[Record], runs: list[ProducerRun], *, exactly_once: bool) -> None:
    """Every acked seqno holds the payload it was acked for, and each producer's records
    are in ``records`` in its send order: each once (``exactly_once``), or at least once."""
    stored = {r.seqno: r.payload for r in records}
    by_name: dict[str, list[int]] = {run.name: [] for run in runs}
    for record in records:
        name, _, index = record.payload.partition(b"-")
        by_name[name.decode()].append(int(index))
    for run in runs:
        indexes = by_name[run.name]
        if exactly_once:
            assert len(indexes) == len(set(indexes)), f"{run.name}: a record stored twice"
            assert indexes == sorted(indexes), f"{run.name}: records out of send order"
        else:  # a batch stored twice repeats its records right after the first copy
            firsts = list(dict.fromkeys(indexes))
            assert firsts == sorted(firsts), f"{run.name}: records out of send order"
        assert set(indexes) == set(range(run.sent)), f"{run.name}: a sent record is missing"
        wrong = [(s, p, stored.get(s)) for s, p in run.acked.items() if stored.get(s) != p]
        assert not wrong, f"{run.name}: acked records not stored as acked: {wrong[:5]}"
