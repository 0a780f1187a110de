"""Redis Streams, a peer of :mod:`bench.log_bench`: one :class:`bench.harness.ServerRunner`.

Debian ``redis-server`` (``--appendonly yes --appendfsync everysec``; RDB snapshots off,
``--save ""``, so no fork lands in a run), redis-py (hiredis parser when installed), RESP2.
Producer: ``XADD`` pipelined (no MULTI) in chunks of 1000, each chunk's replies awaited
before the next; queued with ``execute_command("XADD", ...)``, ~30 % less client CPU than
redis-py's ``xadd()`` argument building. Subscribers: ``XREAD COUNT 1000 BLOCK 1000`` from
``0-0``, each on its own connection. Latency run: one ``XADD`` per record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import (
    Endpoint,
    Pacer,
    ProducerResult,
    ServerRunner,
    SubscriberResult,
    Tally,
    Workload,
    filler,
    stamped,
)
from bench.processes import HOST

CHUNK = 1000
"""Records per pipelined XADD chunk / per XREAD."""
REDIS_KEY = "logbench"
REDIS_FIELD = b"d"


def _redis(endpoint: Endpoint) -> Any:
    import redis

    return redis.Redis(host=HOST, port=endpoint["port"], protocol=2)


class RedisRunner(ServerRunner):
    name = "redis"
    binary = "redis-server"
    module = "redis"

    def describe(self) -> str:
        import redis
        import redis.utils

        parser = "hiredis" if redis.utils.HIREDIS_AVAILABLE else "pure-Python parser"
        return (
            f"redis: redis-server appendonly, appendfsync everysec, no RDB; redis-py "
            f"{redis.__version__} ({parser}), XADD pipelined x{CHUNK}, XREAD COUNT {CHUNK}"
        )

    def start(self, workdir: Path) -> Endpoint:
        port = self.launch(
            workdir,
            lambda port, d: [
                "redis-server",
                "--port", str(port),
                "--bind", HOST,
                "--dir", str(d),
                "--appendonly", "yes",
                "--appendfsync", "everysec",
                "--save", "",
                "--daemonize", "no",
                "--logfile", "",
            ],
        )  # fmt: skip
        client = _redis({"port": port})
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except Exception as exc:  # redis.BusyLoadingError and friends while starting
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis not ready: {exc}") from exc
                time.sleep(0.05)
        client.close()
        return {"port": port}

    @staticmethod
    def producer(endpoint: Endpoint, work: Workload, ready: Callable[[], None]) -> ProducerResult:
        client = _redis(endpoint)
        client.ping()
        body = filler(work.payload_bytes)
        ready()
        start = time.time_ns()
        if work.rate is None:
            pipe = client.pipeline(transaction=False)
            for first in range(0, work.records, CHUNK):
                for _ in range(min(CHUNK, work.records - first)):
                    pipe.execute_command("XADD", REDIS_KEY, "*", REDIS_FIELD, body)
                pipe.execute()
        else:
            pacer = Pacer(work.rate)
            for i in range(work.records):
                pacer.wait(i)
                client.xadd(REDIS_KEY, {REDIS_FIELD: stamped(body)})
        end = time.time_ns()
        client.close()
        return ProducerResult(start_ns=start, end_ns=end, records=work.records)

    @staticmethod
    def subscriber(
        endpoint: Endpoint, work: Workload, index: int, ready: Callable[[], None]
    ) -> SubscriberResult:
        client = _redis(endpoint)
        client.ping()
        ready()
        tally = Tally(work)
        last: bytes | str = "0-0"
        while not tally.done:
            reply = client.xread({REDIS_KEY: last}, count=CHUNK, block=1000)
            if not reply:
                continue
            entries = reply[0][1]
            last = entries[-1][0]
            tally.add([fields[REDIS_FIELD] for _, fields in entries])
        client.close()
        return tally.result()
