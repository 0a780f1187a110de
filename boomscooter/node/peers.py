"""A node's calls to other nodes (gRPC): their Status, their batches, their logs.

* :func:`survey` asks several nodes for their Status at once and returns what the rules
  need (:class:`~boomscooter.node.rules.PeerStatus`); a node that does not answer within
  ``STATUS_TIMEOUT_S`` is left out. :func:`fence` (a promotion) tells them the claimed
  epoch first (Fence) and returns their Status after.
* :func:`reconcile` finds where this node's log diverged from a peer's
  (:class:`~boomscooter.node.replicas.CommonPoint`, comparing the batches both hold at a
  probed seqno) and truncates this log after it. Each leader incarnation writes under an
  epoch no earlier writer used, so two logs holding the same batch at a seqno agree on
  everything before it (Raft's log matching property).
* :func:`copy_from` appends a peer's batches after this log's end.
* :func:`gather` (a promotion): both, with the peer whose log is the most up to date.

Failures of a peer while gathering raise :class:`PeerFailed`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import grpc

from boomscooter.node import convert
from boomscooter.node.config import GRPC_MESSAGE_BYTES
from boomscooter.node.replicas import CommonPoint
from boomscooter.node.rules import PeerStatus
from boomscooter.rpc import create_channel
from boomscooter.storage.batch import Batch, split_batches
from boomscooter.v1 import boomscooter_pb2 as pb
from boomscooter.v1 import boomscooter_pb2_grpc as pb_grpc
from bootcast.logs import get_logger

if TYPE_CHECKING:
    from boomscooter.node.runtime import Node

log = get_logger("boomscooter.peers")

STATUS_TIMEOUT_S = 1.0
# A fenced leader first lets its in-flight appends end and stops its stream; its state
# save is an fsync: generous on a loaded host.
FENCE_TIMEOUT_S = 5.0
COPY_BYTES = 4 << 20


class PeerFailed(Exception):
    """A peer failed while this node needed it (unreachable, an error answer)."""


def node_channel(address: str) -> grpc.aio.Channel:
    return create_channel(address, max_message_bytes=GRPC_MESSAGE_BYTES)


async def status_of(address: str) -> PeerStatus | None:
    channel = node_channel(address)
    try:
        stub = pb_grpc.BoomscooterStub(channel)
        response: pb.StatusResponse = await stub.Status(
            pb.StatusRequest(), timeout=STATUS_TIMEOUT_S
        )
        return convert.peer_status(response)
    except grpc.aio.AioRpcError:
        return None
    finally:
        await channel.close()


async def fenced_status(address: str, epoch: int, leader: str) -> PeerStatus | None:
    """Tell ``address`` that ``leader`` claimed ``epoch`` (Fence); its Status after."""
    channel = node_channel(address)
    try:
        stub = pb_grpc.BoomscooterStub(channel)
        request = pb.FenceRequest(epoch=epoch, leader=leader)
        response: pb.FenceResponse = await stub.Fence(request, timeout=FENCE_TIMEOUT_S)
        return convert.peer_status(response.status)
    except grpc.aio.AioRpcError as exc:
        log.warning("promote.fence_failed", peer=address, code=exc.code().name,
                    details=exc.details())  # fmt: skip
        return None
    finally:
        await channel.close()


async def fence(addresses: Iterable[str], epoch: int, leader: str) -> dict[str, PeerStatus]:
    """Fence every node among ``addresses`` at once; the Status of each that answered."""
    wanted = sorted(set(addresses))
    answers = await asyncio.gather(*(fenced_status(a, epoch, leader) for a in wanted))
    return {a: s for a, s in zip(wanted, answers, strict=True) if s is not None}


async def survey(addresses: Iterable[str]) -> dict[str, PeerStatus]:
    """The Status of every reachable node among ``addresses`` (asked at once)."""
    wanted = sorted(set(addresses))
    answers = await asyncio.gather(*(status_of(a) for a in wanted))
    return {a: s for a, s in zip(wanted, answers, strict=True) if s is not None}


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


async def _local_batch(node: Node, seqno: int) -> Batch:
    batches = await asyncio.to_thread(node.log.read_batches, seqno, to_seqno=seqno, max_bytes=1)
    return batches[0]


def same_batch(ours: Batch, theirs: Batch | None) -> bool:
    return theirs is not None and bytes(ours.data) == bytes(theirs.data)


async def reconcile(node: Node, stub: Any, peer_first: int) -> int:
    """Truncate this node's log after the last batch it shares with the peer's; returns
    the records dropped."""
    floor = max(peer_first, node.log.first_seqno) - 1
    search = CommonPoint(node.log.last_seqno, floor=max(floor, 0))
    while (seqno := search.probe()) is not None:
        ours = await _local_batch(node, seqno)
        if same_batch(ours, await remote_batch(stub, seqno)):
            search.matched(ours.last_seqno)
        else:
            search.differs(ours.base_seqno)
    dropped = node.log.last_seqno - search.result
    if dropped > 0:
        # Shielded: a cancelled caller (stop, promote) must not leave the truncation done
        # and the dedupe table, journal and held seqno still describing the old tail.
        await node.exclusive(lambda: node.truncate_after(search.result))
        log.warning("log.truncated_to_common_point", after_seqno=search.result,
                    dropped_records=dropped, probes=search.probes)  # fmt: skip
    return max(0, dropped)


async def copy_from(node: Node, stub: Any, to_seqno: int) -> int:
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


def _append_all(node: Node, batches: list[Batch]) -> None:
    for batch in batches:
        node.log.append_batch(batch)


async def gather(node: Node, source: str, first_seqno: int, last_seqno: int) -> int:
    """Make ``source``'s log this node's: reconcile with it and copy what it holds beyond,
    up to ``last_seqno``; returns the records copied. Raises :class:`PeerFailed`."""
    channel = node_channel(source)
    try:
        stub = pb_grpc.BoomscooterStub(channel)
        dropped = await reconcile(node, stub, first_seqno)
        gathered = await copy_from(node, stub, last_seqno)
    except grpc.aio.AioRpcError as exc:
        raise PeerFailed(f"a peer failed ({exc.code().name}: {exc.details()})") from exc
    except OSError as exc:
        raise PeerFailed(str(exc)) from exc
    finally:
        await channel.close()
    log.info("promote.gathered", peer=source, records=gathered, dropped_records=dropped)
    return gathered
