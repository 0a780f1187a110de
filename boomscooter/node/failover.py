"""Failover: manual promotion of a replica, and fencing of a leader that returns.

**Promotion** (:func:`promote`, the ``Promote`` RPC). The replica stops following, asks
every node it knows (the replicas its leader named, its saved peers) for its Status, and
makes its log the most up-to-date one among theirs — the log whose last batch has the
highest epoch, then the longest (Raft's rule): it truncates after the last batch it shares
with that log and copies the rest. A record acknowledged at quorum is held durably by
``min_insync`` copies, the leader's among them; with the leader gone, at least one surviving
replica holds it, so the promoted node has it whichever replica the operator picked (as long
as the replicas that hold it answer). Then it takes an epoch above every epoch it has seen
or heard of, persists it, and leads. Its commit seqno starts at what it knew committed; the
rest commits when ``min_insync`` copies hold it.

**Fencing** (:func:`newer_leader`, :func:`watch_for_newer_leader`). A leader asks its peers
at start (before it takes a new epoch) and every ``WATCH_INTERVAL_S`` while it leads; if any
names a leader of a higher epoch, it follows that leader: its Produce calls fail with
NOT_LEADER, its stream stops, and as a replica it truncates whatever it wrote that the new
leader does not hold (never committed: it lacked the quorum). Replicas following another
leader *at the same epoch* fence it too (an epoch taken twice: a deposed leader restarted
seeing no one), and a replica never follows a leader older than the epoch it knows, nor a
second leader under its epoch (:mod:`boomscooter.node.follower`). A replica whose log holds
a newer epoch than the leader's is refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from boomscooter.client._rpc import create_channel
from boomscooter.errors import RequestError
from boomscooter.node.replication import CommonPoint
from boomscooter.storage.batch import Batch, split_batches
from boomscooter.v1 import boomscooter_pb2 as pb
from boomscooter.v1 import boomscooter_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from boomscooter.node.leader import LeaderNode

log = structlog.get_logger("boomscooter.failover")

STATUS_TIMEOUT_S = 1.0
WATCH_INTERVAL_S = 2.0
COPY_BYTES = 4 << 20


def node_channel(address: str) -> grpc.aio.Channel:
    from boomscooter.node.leader import GRPC_MESSAGE_BYTES

    return create_channel(address, max_message_bytes=GRPC_MESSAGE_BYTES)


async def status_of(address: str) -> pb.StatusResponse | None:
    channel = node_channel(address)
    try:
        stub = pb_grpc.BoomscooterStub(channel)
        response: pb.StatusResponse = await stub.Status(
            pb.StatusRequest(), timeout=STATUS_TIMEOUT_S
        )
        return response
    except grpc.aio.AioRpcError:
        return None
    finally:
        await channel.close()


async def survey(addresses: Iterable[str]) -> dict[str, pb.StatusResponse]:
    """The Status of every reachable node among ``addresses`` (asked at once)."""
    wanted = sorted(set(addresses))
    answers = await asyncio.gather(*(status_of(a) for a in wanted))
    return {a: s for a, s in zip(wanted, answers, strict=True) if s is not None}


async def newer_leader(
    node: LeaderNode,
    addresses: Iterable[str],
    *,
    or_same: bool = False,
    skip: frozenset[str] = frozenset(),
) -> tuple[str, int] | None:
    """``(leader address, epoch)`` of the leader with the highest epoch the nodes at
    ``addresses`` report, if it is above this node's (``or_same``: or equal — a replica
    looking for its leader); None when there is none (or none answers).

    A replica that follows *another* leader at this node's own epoch counts too: two
    leaders under one epoch (a deposed leader that restarted seeing no one) must not both
    go on, and the one the replicas follow is the one that can commit — also for a leader
    still starting. Leaders in ``skip`` (a replica refused them as stale) are passed over."""
    answers = await survey(a for a in addresses if a and a != node.address)
    own = max(node.epoch, node.state.epoch)
    best: tuple[str, int] | None = None
    for address, status in answers.items():
        leader = address if status.role == pb.ROLE_LEADER else status.leader_address
        if not leader or leader == node.address or leader in skip:
            continue
        if status.role != pb.ROLE_LEADER and leader == address:
            continue  # a node naming itself without leading: in transition, not a leader
        replica_elsewhere = status.role == pb.ROLE_REPLICA and node.role != "replica"
        # A node still starting that finds another leader of its own epoch follows it
        # rather than take the next epoch from a log that may lack what that one committed.
        leader_while_starting = status.role == pb.ROLE_LEADER and node.role == "starting"
        same_counts = or_same or replica_elsewhere or leader_while_starting
        if status.epoch < own or (status.epoch == own and not same_counts):
            continue
        if best is None or status.epoch > best[1]:
            best = (leader, status.epoch)
    return best


async def watch_for_newer_leader(node: LeaderNode) -> None:
    """The leader's fencing check (see the module docstring)."""
    while node.is_leader:
        await asyncio.sleep(WATCH_INTERVAL_S)
        peers = set(node.state.peers) | set(node.replicas.addresses())
        found = await newer_leader(node, peers)
        if found is not None and node.is_leader:
            # follow() cancels this task: run it on its own.
            task = asyncio.get_running_loop().create_task(
                node.follow(found[0], epoch=found[1]), name="fenced"
            )
            _background.add(task)
            task.add_done_callback(_background.discard)
            return


_background: set[asyncio.Task[None]] = set()


# -- comparing and copying logs ---------------------------------------------------------------


async def remote_batch(stub: Any, seqno: int) -> Batch | None:
    """The peer's stored batch holding ``seqno`` (committed or not), None if it has none."""
    request = pb.FetchRequest(
        from_seqno=seqno, to_seqno=seqno, max_bytes=1, include_uncommitted=True
    )
    try:
        response: pb.FetchResponse = await stub.Fetch(request, timeout=10)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.OUT_OF_RANGE:
            return None
        raise
    for batch in split_batches(response.batches):
        if batch.base_seqno <= seqno <= batch.last_seqno:
            return batch
    return None


async def local_batch(node: LeaderNode, seqno: int) -> Batch:
    batches = await asyncio.to_thread(node.log.read_batches, seqno, to_seqno=seqno, max_bytes=1)
    return batches[0]


def same_batch(ours: Batch, theirs: Batch | None) -> bool:
    return theirs is not None and bytes(ours.data) == bytes(theirs.data)


async def reconcile(node: LeaderNode, stub: Any, peer_first: int) -> int:
    """Truncate this node's log after the last batch it shares with the peer's
    (:class:`~boomscooter.node.replication.CommonPoint`); returns the records dropped."""
    floor = max(peer_first, node.log.first_seqno) - 1
    search = CommonPoint(node.log.last_seqno, floor=max(floor, 0))
    while (seqno := search.probe()) is not None:
        ours = await local_batch(node, seqno)
        if same_batch(ours, await remote_batch(stub, seqno)):
            search.matched(ours.last_seqno)
        else:
            search.differs(ours.base_seqno)
    dropped = node.log.last_seqno - search.result
    if dropped > 0:
        # Shielded: a cancelled caller (stop, promote) must not leave the truncation done
        # and the dedupe table, journal and held seqno still describing the old tail.
        await node.exclusive(lambda: _truncate(node, search.result))
        log.warning("log.truncated_to_common_point", after_seqno=search.result,
                    dropped_records=dropped, probes=search.probes)  # fmt: skip
    return max(0, dropped)


async def _truncate(node: LeaderNode, seqno: int) -> None:
    await asyncio.to_thread(node.log.truncate_after, seqno)
    node.held_seen = min(node.held_seen, seqno)
    node.dedupe.forget_after(seqno)
    await asyncio.to_thread(node.journal.replace, node.journal.encoded(node.dedupe))
    node._ends.clear()


async def _last_position(stub: Any, status: pb.StatusResponse) -> tuple[int, int]:
    """(epoch of the last batch, last seqno) of a peer's log: how up to date it is."""
    if status.last_seqno < status.first_seqno:
        return (0, status.last_seqno)
    last = await remote_batch(stub, status.last_seqno)
    return (last.epoch if last is not None else 0, status.last_seqno)


async def _gather(node: LeaderNode, answers: dict[str, pb.StatusResponse]) -> int:
    """Make this node's log the most up-to-date one among the peers' (the highest epoch
    of a last batch, then the longest): reconcile with that peer and copy what it holds
    beyond. A log written later in a later epoch holds everything committed before it."""
    positions: list[tuple[tuple[int, int], str]] = []
    for address, status in answers.items():
        channel = node_channel(address)
        try:
            position = await _last_position(pb_grpc.BoomscooterStub(channel), status)
            positions.append((position, address))
        except grpc.aio.AioRpcError as exc:
            log.warning("promote.peer_failed", peer=address, error=exc.code().name)
        finally:
            await channel.close()
    ours = (node.log.last_epoch, node.log.last_seqno)
    if not positions or max(positions)[0] <= ours:
        return 0
    (_, last), address = max(positions)
    channel = node_channel(address)
    try:
        stub = pb_grpc.BoomscooterStub(channel)
        dropped = await reconcile(node, stub, answers[address].first_seqno)
        gathered = await copy_from(node, stub, last)
    finally:
        await channel.close()
    log.info("promote.gathered", peer=address, records=gathered, dropped_records=dropped)
    return gathered


async def copy_from(node: LeaderNode, stub: Any, to_seqno: int) -> int:
    """Append the peer's batches after our last seqno up to ``to_seqno``; records copied."""
    copied = 0
    while node.log.last_seqno < to_seqno:
        start = node.log.next_seqno
        request = pb.FetchRequest(
            from_seqno=start, to_seqno=to_seqno, max_bytes=COPY_BYTES, include_uncommitted=True
        )
        response: pb.FetchResponse = await stub.Fetch(request, timeout=30)
        batches = [b for b in split_batches(response.batches) if b.base_seqno >= start]
        if not batches:
            break
        await asyncio.to_thread(_append_all, node, batches)
        copied += sum(b.record_count for b in batches)
    return copied


def _append_all(node: LeaderNode, batches: list[Batch]) -> None:
    for batch in batches:
        node.log.append_batch(batch)


# -- promotion --------------------------------------------------------------------------------


async def promote(node: LeaderNode, min_insync: int = 0, *, force: bool = False) -> dict[str, int]:
    if node.promote_lock.locked():
        raise RequestError(f"{node.address} is being promoted already", code="FAILED_PRECONDITION")
    async with node.promote_lock:
        return await _promote(node, min_insync, force)


async def _promote(node: LeaderNode, min_insync: int, force: bool) -> dict[str, int]:
    if node.is_leader:
        raise RequestError(f"{node.address} is already the leader", code="FAILED_PRECONDITION")
    if node.role != "replica":
        raise RequestError(f"{node.address} is {node.role}", code="UNAVAILABLE")
    follower = node.follower
    learned_insync = follower.min_insync if follower is not None else 0
    peers = set(node.state.peers) | (set(follower.peers) if follower is not None else set())
    peers.discard(node.address)
    if node.leader_address:
        peers.add(node.leader_address)
    answers = await survey(peers)
    alive = [a for a, s in answers.items() if s.role == pb.ROLE_LEADER and s.epoch >= node.epoch]
    if alive and not force:
        raise RequestError(
            f"the leader {alive[0]} still answers: promotion is for a failed leader (stop it "
            "first, or force a switchover and accept that records it commits in the next "
            "seconds, before it notices the new epoch, may be lost)",
            code="FAILED_PRECONDITION",
        )
    async with node._append_lock:  # no append of the follower is under way past here
        await node._stop_following()
    try:
        return await _take_over(node, peers, min_insync or learned_insync)
    except BaseException as exc:
        # Not promoted: follow again rather than stay a node that neither follows nor leads.
        if not node.is_leader and node.follower is None and node.role == "replica":
            await node.follow(node.leader_address)
        if isinstance(exc, grpc.aio.AioRpcError):
            raise RequestError(
                f"promotion failed, still a replica: a peer failed ({exc.code().name}: "
                f"{exc.details()})",
                code="UNAVAILABLE",
            ) from exc
        if isinstance(exc, OSError):
            raise RequestError(f"promotion failed, still a replica: {exc}",
                               code="UNAVAILABLE") from exc  # fmt: skip
        raise


async def _take_over(node: LeaderNode, peers: set[str], min_insync: int) -> dict[str, int]:
    answers = await survey(peers)  # again: nothing moves on this node any more
    gathered = await _gather(node, answers)
    # Dedupe entries learned for batches this log does not hold (lost with the leader)
    # must not answer a retry as "already stored".
    node.dedupe.forget_after(node.log.last_seqno)
    await asyncio.to_thread(node.journal.replace, node.journal.encoded(node.dedupe))
    epochs = [node.epoch, node.state.epoch, *(s.epoch for s in answers.values())]
    epoch = max(epochs) + 1
    insync = min_insync or node.config.min_insync
    commit = node.commit_seqno
    await node.lead(epoch=epoch, min_insync=insync, commit_seqno=commit)
    log.warning("node.promoted", epoch=epoch, last_seqno=node.log.last_seqno, commit_seqno=commit,
                gathered_records=gathered, min_insync=insync)  # fmt: skip
    return {
        "epoch": epoch,
        "last_seqno": node.log.last_seqno,
        "commit_seqno": commit,
        "gathered_records": gathered,
    }
