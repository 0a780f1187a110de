"""The log stream end to end in a seeded simulation: encoder → a lossy, reordering,
duplicating network with garbage → receiver, plus a fake Fetch that fails now and then.
Invariant after every event: seqnos contiguous, payloads exact, each delivered once.
``STREAM_SEED=n`` replays one seed."""

from __future__ import annotations

import heapq
import os
import random

import pytest

from boomscooter.storage import Batch, encode_batch
from boomscooter.stream import (
    BatchReceived,
    CommitAdvanced,
    Event,
    Gap,
    StreamEncoder,
    StreamReceiver,
)

from support.storage import random_entries

# -- simulation -----------------------------------------------------------------------------------


def simulate(seed: int) -> dict[str, int]:
    """Leader → lossy, reordering, duplicating network (with garbage) → receiver, whose gaps
    a fake Fetch repairs from the leader's log (itself failing sometimes). Checks on every
    event that batches arrive contiguous, exact and once, and at the end that all did."""
    rng = random.Random(seed)
    epoch = rng.randrange(1, 2**32)
    page_size = rng.choice([64, 100, 333, 1400])
    loss, dup, fetch_loss = rng.choice([0.0, 0.05, 0.3]), rng.choice([0.0, 0.1]), 0.2
    encoder = StreamEncoder(epoch, page_size)
    receiver = StreamReceiver(
        epoch,
        1,
        page_size_bytes=page_size,
        reorder_window_s=0.005,
        repair_timeout_s=0.1,
        max_buffered_bytes=rng.choice([3000, 1 << 20]),
    )
    log: list[Batch] = []
    network: list[tuple[float, int, bytes]] = []
    fetches: list[tuple[float, int, int, int]] = []
    counter = 0
    delivered: list[Batch] = []
    commit_seen = 0
    stats = {"gaps": 0, "repaired": 0}

    def send(datagram: bytes, now: float) -> None:
        nonlocal counter
        copies = 0 if rng.random() < loss else 1 + (rng.random() < dup)
        for _ in range(copies):
            counter += 1
            heapq.heappush(network, (now + rng.expovariate(1 / 0.002), counter, datagram))

    def handle(events: list[Event], now: float) -> None:
        nonlocal counter, commit_seen
        for event in events:
            if isinstance(event, BatchReceived):
                expected = log[len(delivered)]
                assert event.base_seqno == (delivered[-1].next_seqno if delivered else 1)
                assert event.data == expected.data and event.batch.header == expected.header
                delivered.append(event.batch)
                stats["repaired"] += event.repaired
            elif isinstance(event, CommitAdvanced):
                assert event.commit_seqno > commit_seen
                commit_seen = event.commit_seqno
            elif isinstance(event, Gap):
                assert receiver.next_seqno <= event.from_seqno <= event.to_seqno
                stats["gaps"] += 1
                counter += 1
                latency = rng.uniform(0.001, 0.02)
                heapq.heappush(fetches, (now + latency, counter, event.from_seqno, event.to_seqno))
            else:
                raise AssertionError(f"unexpected {event}")

    now, next_seqno, last_beat = 0.0, 1, 0.0
    for step in range(3000):
        now = step * 0.001
        if step < 2000 and rng.random() < 0.3:
            batch = encode_batch(
                random_entries(rng, rng.randrange(1, 6)), base_seqno=next_seqno, epoch=epoch
            )
            log.append(batch)
            next_seqno = batch.next_seqno
            commit = max(0, next_seqno - 1 - rng.randrange(10))
            for datagram in encoder.batch(batch.data, commit):
                send(datagram, now)
        if now - last_beat >= 0.02:
            send(encoder.heartbeat(next_seqno - 1, max(0, next_seqno - 1 - rng.randrange(3))), now)
            last_beat = now
        if rng.random() < 0.02:
            send(rng.randbytes(rng.randrange(100)), now)
        while network and network[0][0] <= now:
            handle(receiver.datagram(heapq.heappop(network)[2], now), now)
        while fetches and fetches[0][0] <= now:
            _, _, first, last = heapq.heappop(fetches)
            if rng.random() < fetch_loss:
                continue  # the Fetch failed: the receiver must ask again
            for batch in log:
                if batch.base_seqno <= last and batch.last_seqno >= first:
                    handle(receiver.repaired(batch.data), now)
        deadline = receiver.next_deadline()
        if deadline is not None and deadline <= now:
            handle(receiver.poll(now), now)
    assert [b.data for b in delivered] == [b.data for b in log], f"seed {seed}"
    assert receiver.buffered_bytes == 0
    return stats


SEEDS = [int(os.environ["STREAM_SEED"])] if "STREAM_SEED" in os.environ else list(range(12))


@pytest.mark.parametrize("seed", SEEDS)
def test_simulation(seed: int) -> None:
    stats = simulate(seed)
    print(f"seed {seed}: {stats}")


def test_simulation_exercises_repair() -> None:
    assert sum(simulate(seed)["repaired"] for seed in range(4)) > 0
