"""What the ``boomscooter`` sub-commands do (the CLI parses, this runs)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from boomscooter.errors import ConfigError
from bootcast.logs import get_logger

log = get_logger("boomscooter.cli")


async def run_leader(args: argparse.Namespace) -> int:
    """``boomscooter leader`` and ``boomscooter replica`` (the same node, started as a
    replica when ``--leader`` names the leader)."""
    from boomscooter.node.config import NodeConfig
    from boomscooter.node.runtime import start_leader
    from boomscooter.storage import FsyncPolicy

    follow = getattr(args, "leader", None)
    config = NodeConfig(
        data_dir=args.data_dir,
        listen=args.listen,
        group=args.group,
        interface=args.interface,
        cast_listen=args.cast_listen,
        cast_group=args.cast_group,
        cast_port_base=args.cast_port_base,
        min_insync=args.min_insync,
        fsync=FsyncPolicy.parse(args.fsync),
        page_size_bytes=args.page_size,
        rate_mbit=args.rate,
        ttl=args.ttl,
        heartbeat_ms=args.heartbeat_ms,
        segment_bytes=args.segment_bytes,
        retention_bytes=args.retention_bytes,
        retention_ms=None if args.retention_hours is None else int(args.retention_hours * 3.6e6),
        advertise=args.advertise,
        node_id=args.node_id,
        follow=follow,
        insync_timeout_s=args.insync_timeout,
        leader_timeout_s=args.leader_timeout,
    )
    node = await start_leader(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info(f"{node.role}.stopping", bound_s=STOP_BOUND_S)
    for signum in (signal.SIGTERM, signal.SIGINT):  # a second one: exit at once
        loop.add_signal_handler(signum, _exit_now, "node.stop_interrupted")
    try:
        async with asyncio.timeout(STOP_BOUND_S):
            await node.stop()
    except TimeoutError:
        _exit_now("node.stop_timed_out")
    return 0


# A stopping node drains its producers, stops its stream and closes its log (an fsync)
# within this bound, or exits anyway (exit status 1): SIGTERM always ends it.
STOP_BOUND_S = 20.0


def _exit_now(event: str) -> None:
    log.error(event, bound_s=STOP_BOUND_S)
    sys.stderr.flush()
    os._exit(1)


async def run_promote(args: argparse.Namespace) -> int:
    from boomscooter.rpc import create_channel, error_from_rpc
    from boomscooter.v1 import boomscooter_pb2 as pb
    from boomscooter.v1 import boomscooter_pb2_grpc as pb_grpc

    channel = create_channel(args.server)
    try:
        stub = pb_grpc.BoomscooterStub(channel)
        try:
            request = pb.PromoteRequest(min_insync=args.min_insync or 0, force=args.force)
            done = await stub.Promote(request, timeout=args.timeout)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, address=args.server) from None
    finally:
        await channel.close()
    print(
        f"{args.server} leads at epoch {done.epoch}: last seqno {done.last_seqno}, "
        f"commit seqno {done.commit_seqno}, {done.gathered_records} records gathered "
        "from other replicas"
    )
    return 0


class LineReader:
    """Complete lines from a file descriptor, a chunk at a time (runs in a thread). It
    reads the descriptor itself, not ``sys.stdin.buffer``: a thread blocked inside a
    buffered reader holds its lock, and the interpreter cannot shut down past it."""

    def __init__(self, fd: int, chunk_bytes: int = 1 << 20) -> None:
        self.fd = fd
        self.chunk_bytes = chunk_bytes
        self._tail = b""

    def next_lines(self) -> list[bytes] | None:
        """The complete lines of the next chunk (the last line needs no newline); None at
        the end of the stream."""
        data = os.read(self.fd, self.chunk_bytes)
        if not data:
            tail, self._tail = self._tail, b""
            return [tail] if tail else None
        lines = (self._tail + data).split(b"\n")
        self._tail = lines.pop()
        return lines


async def stdin_chunks(reader: LineReader, *, ahead: int = 4) -> AsyncIterator[list[bytes]]:
    """The reader's line chunks, read by a daemon thread (at most ``ahead`` chunks ahead):
    a thread blocked in ``read`` must not keep Ctrl-C from ending the program, which an
    executor thread would (the loop waits for its executor on the way out)."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[list[bytes] | BaseException | None] = asyncio.Queue()
    slots = threading.Semaphore(ahead)

    def pump() -> None:
        while True:
            slots.acquire()
            try:
                item: list[bytes] | BaseException | None = reader.next_lines()
            except BaseException as exc:  # handed to the consumer
                item = exc
            try:
                loop.call_soon_threadsafe(chunks.put_nowait, item)
            except RuntimeError:  # the loop is gone: the program is ending
                return
            if item is None or isinstance(item, BaseException):
                return

    threading.Thread(target=pump, name="produce-stdin", daemon=True).start()
    while (item := await chunks.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        yield item
        slots.release()


async def run_produce(args: argparse.Namespace) -> int:
    from boomscooter.client.producer import Producer

    count = 0
    first: asyncio.Future[int | None] | None = None
    last: asyncio.Future[int | None] | None = None
    started = time.monotonic()
    async with Producer(
        args.server,
        acks=args.acks,
        channel=args.channel,
        linger_ms=args.linger_ms,
        max_batch_records=args.batch_records,
    ) as producer:
        async for lines in stdin_chunks(LineReader(sys.stdin.fileno())):
            for line in lines:
                last = await producer.send(line.removesuffix(b"\r"))
                first = first or last
                count += 1
        await producer.flush()
    seconds = time.monotonic() - started
    if not args.quiet:
        first_seqno = first.result() if first is not None else None
        last_seqno = last.result() if last is not None else None
        log.info(
            "produce.done",
            records=count,
            first_seqno=first_seqno,
            last_seqno=last_seqno,
            acks=args.acks,
            seconds=round(seconds, 3),
            records_per_s=round(count / seconds) if seconds > 0 else None,
        )
    return 0


def record_json(record: Any) -> str:
    payload: bytes = record.payload
    try:
        text: str | None = payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return json.dumps(
        {
            "seqno": record.seqno,
            "timestamp": record.timestamp_ms,
            "channel": record.channel,
            "key_b64": None if record.key is None else base64.b64encode(record.key).decode(),
            "payload": text,
            "payload_b64": base64.b64encode(payload).decode(),
        },
        ensure_ascii=False,
    )


async def run_subscribe(args: argparse.Namespace) -> int:
    from boomscooter.client.subscriber import Subscriber

    if args.mode != "notifications" and args.data_dir:
        raise ConfigError("--data-dir is for --mode notifications")
    out = sys.stdout.buffer
    delivered = 0
    subscriber = Subscriber(
        args.server,
        start=args.start,
        start_time_ms=args.from_time,
        until=args.until,
        count=args.count,
        channel=args.channel,
        mode=args.mode,
        interface=args.interface,
        data_dir=args.data_dir,
        server_timeout_s=args.timeout,
    )
    try:
        async with subscriber:
            async for records in subscriber.batches():
                if args.json:
                    text = "".join(record_json(r) + "\n" for r in records)
                    out.write(text.encode("utf-8"))
                else:
                    out.write(b"".join(r.payload + b"\n" for r in records))
                out.flush()
                delivered += len(records)
    except BrokenPipeError:  # `boomscooter subscribe | head`: the reader had enough
        return 0
    log.info("subscribe.done", records=delivered, **subscriber.stats)
    return 0


async def run_status(args: argparse.Namespace) -> int:
    from boomscooter.rpc import create_channel, error_from_rpc
    from boomscooter.v1 import boomscooter_pb2 as pb
    from boomscooter.v1 import boomscooter_pb2_grpc as pb_grpc

    channel = create_channel(args.server)
    try:
        stub = pb_grpc.BoomscooterStub(channel)
        try:
            status = await stub.Status(pb.StatusRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, address=args.server) from None
    finally:
        await channel.close()
    replicas = [
        {
            "replica_id": r.replica_id,
            "address": r.address,
            "connected": r.connected,
            "durable_seqno": r.durable_seqno,
            "lag_records": r.lag_records,
            "last_ack_age_ms": r.last_ack_age_ms,
            "in_sync": r.in_sync,
            "last_seqno": r.last_seqno,
        }
        for r in status.replicas
    ]
    fields: dict[str, Any] = {
        # A node starting, stepping down or stopping reports ROLE_UNSPECIFIED.
        "role": {pb.ROLE_LEADER: "leader", pb.ROLE_REPLICA: "replica"}.get(
            status.role, "transition"
        ),
        "node_id": status.node_id,
        "epoch": status.epoch,
        "first_seqno": status.first_seqno,
        "last_seqno": status.last_seqno,
        "commit_seqno": status.commit_seqno,
        "durable_seqno": status.durable_seqno,
        "leader_address": status.leader_address,
        "min_insync": status.min_insync,
        "log_bytes": status.log_bytes,
        "segment_count": status.segment_count,
        "replicas": replicas,
        "counters": dict(sorted(status.counters.items())),
    }
    if args.json:
        print(json.dumps(fields))
    else:
        width = max(len(k) for k in fields)
        for key, value in fields.items():
            if key not in ("replicas", "counters"):
                print(f"{key:<{width}}  {value}")
        counters = " ".join(f"{k}={v}" for k, v in fields["counters"].items())
        print(f"{'counters':<{width}}  {counters or 'none'}")
        print(f"{'replicas':<{width}}  {len(replicas) or 'none'}")
        for r in replicas:
            print(
                f"  {r['replica_id']} {r['address']} connected={r['connected']} "
                f"in_sync={r['in_sync']} durable={r['durable_seqno']} lag={r['lag_records']} "
                f"last_ack={r['last_ack_age_ms']} ms ago"
            )
    return 0


async def run_demo(args: argparse.Namespace) -> int:
    from boomscooter.demo import run_demo as demo

    return await demo(records=args.records)
