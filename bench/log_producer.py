"""One Python producer process against a boomscooter leader, nothing else running: how
many records/s the SDK's Producer sends (the issue's ≥ 200k goal, without the four
subscribers of ``bench.log_bench`` sharing the two cores).

Run: ``python -m bench.log_producer [--records 1000000] [--repeats 3]``. The leader runs as
in ``bench.log_bench`` (``--fsync interval:1``, 8 KiB pages, loopback); the producer sends
100-byte records with acks=leader in batches of up to 2000 and waits for the last ack.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from tempfile import TemporaryDirectory

# The leader of each run is started (forked) after gRPC ran in this process: no fork
# handlers (and no warning about them) are wanted.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from bench.harness import filler
from bench.log_boomscooter import BATCH_RECORDS, BoomscooterRunner
from boomscooter import loops


async def _produce(address: str, records: int) -> float:
    from boomscooter.client.producer import Producer

    body = filler(100)
    async with Producer(address, acks="leader", linger_ms=2, max_batch_records=BATCH_RECORDS) as p:
        start = time.perf_counter()
        send = p.send
        for _ in range(records):
            await send(body)
        await p.flush()
        return records / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rates = []
    for i in range(args.repeats):
        runner = BoomscooterRunner()
        with TemporaryDirectory(prefix="log-producer-") as workdir:
            try:
                endpoint = runner.start(Path(workdir))
                rates.append(loops.run(_produce(endpoint["address"], args.records)))
            finally:
                runner.stop()
        print(f"run {i + 1}: {rates[-1]:,.0f} records/s", flush=True)
    median = statistics.median(rates)
    verdict = "MET" if median >= 200_000 else "MISS"
    print(f"producer, median of {len(rates)}: {median:,.0f} records/s ({verdict} >= 200,000)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
