"""Helpers for the log's tests: an in-process leader on a loopback group of its own,
records with checkable payloads, and the checks every subscriber view must pass."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from boomscooter.client.subscriber import Subscriber
from boomscooter.node.config import NodeConfig
from boomscooter.node.runtime import Node, start_leader
from boomscooter.rpc import create_channel
from boomscooter.storage import Entry, encode_batch
from boomscooter.storage.batch import Record
from boomscooter.v1 import boomscooter_pb2 as pb
from boomscooter.v1 import boomscooter_pb2_grpc as pb_grpc

from support.net import random_group
from support.waiting import eventually, within


@asynccontextmanager
async def running_leader(data_dir: Path, **options: Any) -> AsyncIterator[Node]:
    """A leader on 127.0.0.1 (any port), multicasting on its own group via 127.0.0.1."""
    settings: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "group": random_group(),
        "interface": "127.0.0.1",
        "heartbeat_ms": 50,
    }
    settings.update(options)
    node = await start_leader(NodeConfig(data_dir=str(data_dir), **settings))
    try:
        yield node
    finally:
        await node.stop()


async def following(sub: Subscriber) -> None:
    """Until ``sub`` follows its log: in multicast mode it has read a page of the stream (an
    idle leader heartbeats every 50 ms), in the other modes it has taken its start."""

    def ready() -> bool:
        stats = sub.stats
        if stats["mode"] == "multicast":
            return int(stats.get("pages", 0)) > 0
        return bool(stats["mode"]) and "next_seqno" in stats

    await eventually(ready, "the subscriber follows its log")


def payload(producer: str, index: int) -> bytes:
    return b"%s-%08d" % (producer.encode(), index)


def check_exactly_once(records: Iterable[Record], total: int, *, first: int = 1) -> None:
    """Seqnos ``first`` … ``total`` strictly increasing and contiguous, each once."""
    seqnos = [r.seqno for r in records]
    assert len(seqnos) == total - first + 1, f"{len(seqnos)} records, wanted {total - first + 1}"
    assert seqnos == list(range(first, total + 1)), "seqnos not contiguous and increasing"


def check_payloads(records: Iterable[Record], log_records: dict[int, bytes]) -> None:
    """Every record's payload is the one the log holds at its seqno."""
    for record in records:
        assert record.payload == log_records[record.seqno], f"payload differs at {record.seqno}"


def check_producer_order(records: Iterable[Record], producers: dict[str, int]) -> None:
    """Each producer's records appear exactly once, in the order it sent them."""
    seen: dict[str, int] = {name: 0 for name in producers}
    for record in records:
        name, _, index = record.payload.partition(b"-")
        key = name.decode()
        assert int(index) == seen[key], f"{key}: record {int(index)} where {seen[key]} was due"
        seen[key] += 1
    assert seen == producers, f"per-producer counts {seen}, wanted {producers}"


async def produce_raw(address: str, requests: list[pb.ProduceRequest]) -> list[pb.ProduceResponse]:
    """One Produce stream: each request written, its answer read before the next."""
    channel = create_channel(address)
    try:
        call = pb_grpc.BoomscooterStub(channel).Produce()
        responses: list[pb.ProduceResponse] = []
        for request in requests:
            await call.write(request)
            response = await within(call.read(), "the produce response")
            assert isinstance(response, pb.ProduceResponse), response
            responses.append(response)
        await call.done_writing()
        return responses
    finally:
        await channel.close()


def raw_batch(
    producer_id: str, sequence: int, payloads: list[bytes], ack_level: int = pb.ACK_LEVEL_LEADER
) -> pb.ProduceRequest:
    """What the SDK sends: an encoded batch (placeholder seqnos)."""
    entries = [Entry(int(time.time() * 1000), p, None, None) for p in payloads]
    return pb.ProduceRequest(
        producer_id=producer_id,
        batch_sequence=sequence,
        ack_level=ack_level,  # type: ignore[arg-type]
        encoded_batch=bytes(encode_batch(entries, base_seqno=1, epoch=0).data),
    )
