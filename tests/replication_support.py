"""Helpers for the replication acceptance tests: ``boomscooter leader`` / ``replica`` as real
processes (``python -m boomscooter.cli`` run from the repository, their ``--log-json``
stderr collected by a thread), a cluster of them that is always torn down, producers and
subscribers of the SDK that note what they were acked and what they delivered, and the
checks on logs read back from the data directories after every node stopped."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from log_support import random_group
from log_support import raw_batch as log_raw_batch
from waiting import PATIENCE_S, eventually

from boomscooter.client.producer import Producer
from boomscooter.client.subscriber import Subscriber
from boomscooter.rpc import create_channel
from boomscooter.storage import LogReader
from boomscooter.storage.batch import Record
from boomscooter.v1 import boomscooter_pb2 as pb
from boomscooter.v1 import boomscooter_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "boomscooter.cli"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
STARTED = ("leader.started", "replica.started")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, timeout=timeout_s, env=ENV, cwd=REPO, check=False
    )


async def cli(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[bytes]:
    return await asyncio.to_thread(functools.partial(run_cli, *args, timeout_s=timeout_s))


def _parse(line: bytes) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except ValueError:
        return {"event": "<not json>", "line": line.decode(errors="replace")}
    return event if isinstance(event, dict) else {"event": "<not json>", "line": str(event)}


@dataclass
class Node:
    """One node's command line (``leader`` or ``replica``) and its current process."""

    name: str
    data_dir: Path
    command: str  # "leader" or "replica"
    options: list[str]
    port: int = field(default_factory=free_port)
    group: str = field(default_factory=random_group)
    leader: str | None = None  # --leader of a replica
    proc: subprocess.Popen[bytes] | None = None
    log: list[dict[str, Any]] = field(default_factory=list)  # every incarnation's events
    starts: int = 0
    _drain: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        argv = [*CLI, "--log-json", self.command, "--data-dir", str(self.data_dir),
                "--listen", self.address, "--group", self.group, "--interface", "127.0.0.1",
                "--heartbeat-ms", "50", *self.options]  # fmt: skip
        if self.command == "replica":
            assert self.leader is not None
            argv += ["--leader", self.leader]
        return argv

    def _start_blocking(self) -> dict[str, Any]:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        self._reap()
        self.proc = subprocess.Popen(self.argv(), stderr=subprocess.PIPE, env=ENV, cwd=REPO)
        self.starts += 1
        assert self.proc.stderr is not None
        stream = self.proc.stderr
        for line in stream:
            event = _parse(line)
            event["incarnation"] = self.starts
            self.log.append(event)
            if event["event"] in STARTED:
                self._drain = threading.Thread(target=self._drain_rest, args=(stream,), daemon=True)
                self._drain.start()
                return event
        self.proc.wait(10)
        raise AssertionError(f"{self.name} exited {self.proc.returncode} before it started")

    def _drain_rest(self, stream: Any) -> None:
        incarnation = self.starts
        for line in stream:
            event = _parse(line)
            event["incarnation"] = incarnation
            self.log.append(event)

    async def start(self) -> dict[str, Any]:
        """Start the process; return its ``leader.started`` / ``replica.started`` event."""
        return await asyncio.to_thread(self._start_blocking)

    def _reap(self) -> None:
        if self._drain is not None:
            self._drain.join(5)
            self._drain = None
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def stop_blocking(self, signum: int = signal.SIGTERM) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signum)
            try:
                proc.wait(PATIENCE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._reap()
        self.proc = None
        return proc.returncode

    async def stop(self, signum: int = signal.SIGTERM) -> int | None:
        return await asyncio.to_thread(self.stop_blocking, signum)

    async def kill(self) -> None:
        """SIGKILL (no clean stop: what the replica had not fsynced may be gone)."""
        assert await self.stop(signal.SIGKILL) == -signal.SIGKILL

    async def pause(self) -> None:
        """SIGSTOP: the process is frozen, its connections stay open."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    async def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def events(self, name: str, incarnation: int | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in list(self.log)
            if e["event"] == name and incarnation in (None, e["incarnation"])
        ]

    async def wait_event(self, name: str, incarnation: int | None = None) -> None:
        where = self.starts if incarnation is None else incarnation
        await eventually(lambda: bool(self.events(name, where)), f"{self.name}: {name}")

    def stderr_tail(self, lines: int = 30) -> str:
        return "\n".join(json.dumps(e) for e in list(self.log)[-lines:])


@contextlib.contextmanager
def cluster(*nodes: Node) -> Iterator[tuple[Node, ...]]:
    """Every process of ``nodes`` is killed on the way out, whatever happened."""
    try:
        yield nodes
    finally:
        for node in nodes:
            node.stop_blocking(signal.SIGKILL)


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


def payload(producer: str, index: int) -> bytes:
    return b"%s-%d" % (producer.encode(), index)


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
