"""Shared by the leader RPC tests (test_leader_rpc.py: Produce; test_leader_reads.py: the
reading RPCs): an in-process leader with a raw gRPC stub, and request/response helpers."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from boomscooter.node.runtime import Node
from boomscooter.storage import FsyncMode, FsyncPolicy, split_batches
from boomscooter.storage.batch import (
    Entry,
    Record,
    batch_crc,
    encode_batch,
)
from boomscooter.v1 import boomscooter_pb2 as pb
from boomscooter.v1 import boomscooter_pb2_grpc

from support.log import running_leader

if TYPE_CHECKING:
    from boomscooter.v1.boomscooter_pb2_grpc import BoomscooterAsyncStub

OK = grpc.StatusCode.OK
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
ALWAYS = FsyncPolicy(mode=FsyncMode.ALWAYS)
SMALL_BATCH_BYTES = 1024
SERVICE = "boomscooter.v1.Boomscooter"


@dataclass
class Leader:
    node: Node
    channel: grpc.aio.Channel
    stub: BoomscooterAsyncStub


StartLeader = Callable[..., Awaitable[Leader]]


@asynccontextmanager
async def leader_starter(tmp_path: Path) -> AsyncIterator[StartLeader]:
    """``await start(**NodeConfig options)``: a leader in ``tmp_path`` (fsync always, so
    the commit follows each append) and a channel to it; both closed on exit."""
    async with AsyncExitStack() as stack:

        async def starter(**options: Any) -> Leader:
            options.setdefault("fsync", ALWAYS)
            node = await stack.enter_async_context(running_leader(tmp_path, **options))
            channel = grpc.aio.insecure_channel(node.address)
            stack.push_async_callback(channel.close)
            return Leader(node, channel, boomscooter_pb2_grpc.BoomscooterStub(channel))

        yield starter


async def default_leader(start: StartLeader) -> Leader:
    return await start(max_batch_bytes=SMALL_BATCH_BYTES, node_id="test-node")


def records(*payloads: bytes, channel: str | None = None, ts: int = 0) -> pb.RecordList:
    return pb.RecordList(
        records=[pb.Record(payload=p, channel=channel, timestamp_ms=ts) for p in payloads]
    )


def good(
    sequence: int, *payloads: bytes, ack: pb.AckLevel.ValueType = pb.ACK_LEVEL_LEADER
) -> pb.ProduceRequest:
    return pb.ProduceRequest(
        batch_sequence=sequence, ack_level=ack, record_list=records(*(payloads or (b"ok",)))
    )


async def produce(leader: Leader, *requests: pb.ProduceRequest) -> list[pb.ProduceResponse]:
    """Send ``requests`` on one Produce stream, half-close, read every response; the
    stream must end with OK."""
    call = leader.stub.Produce()
    for request in requests:
        await call.write(request)
    await call.done_writing()
    responses = [r async for r in call]
    assert await call.code() == OK
    return responses


async def fetch(leader: Leader, **fields: Any) -> pb.FetchResponse:
    return await leader.stub.Fetch(pb.FetchRequest(**fields))


def fetched(response: pb.FetchResponse | pb.SubscribeResponse) -> list[Record]:
    """The records a response means (``first_seqno`` … ``last_seqno`` of its batches)."""
    return [
        r
        for b in split_batches(response.batches)
        for r in b.records(response.first_seqno, response.last_seqno)
    ]


async def stored(leader: Leader) -> list[bytes]:
    response = await fetch(leader, from_seqno=1, include_uncommitted=True)
    return [r.payload for b in split_batches(response.batches) for r in b.records()]


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def encoded(*payloads: bytes, channel: str | None = None, base: int = 1, epoch: int = 0) -> bytes:
    batch = encode_batch([Entry(1, p, channel) for p in payloads], base_seqno=base, epoch=epoch)
    return bytes(batch.data)


def with_crc(raw: bytearray) -> bytes:
    """``raw`` with a CRC32C that matches it (so only the tampered content is wrong)."""
    struct.pack_into("<I", raw, 4, batch_crc(raw, 0, len(raw)))
    return bytes(raw)


def bad_crc() -> bytes:
    raw = bytearray(encoded(b"hello"))
    raw[-1] ^= 0xFF
    return bytes(raw)


def bad_utf8_channel() -> bytes:
    raw = bytearray(encoded(b"p", channel="ab"))
    at = raw.index(b"abp")
    raw[at : at + 2] = b"\xff\xfe"
    return with_crc(raw)


def bad_magic() -> bytes:
    raw = bytearray(encoded(b"p"))
    raw[8] = 0x00
    return with_crc(raw)


async def three_batches(leader: Leader) -> None:
    """Seqnos 1..3, 4..5, 6 with payloads p1 … p6."""
    await produce(
        leader,
        good(1, b"p1", b"p2", b"p3"),
        good(2, b"p4", b"p5"),
        good(3, b"p6"),
    )
