"""Log benchmark (issue 4): one producer → N subscribers (default 4), 100-byte records, on
loopback, every system side by side in the same run.

Run: ``python -m bench.log_bench [--quick] [--peers redis,nats] [--records 1000000]
[--subscribers 4] [--repeats 3] [--latency-seconds 10] [--json OUT]`` (root for the byte
counts).

Per system and repeat, two runs, each on a freshly started server (temp data dir, free
127.0.0.1 port), every subscriber and the producer in its own process (spawned):

* throughput: the subscribers subscribe from the start of the log, then the producer sends
  ``--records`` records as fast as it can. End-to-end records/s = records / (time the last
  subscriber held the last record − time the producer started sending); producer records/s
  = records / the producer's own elapsed time (until its last acknowledgement). Bytes the
  server sent (nftables counter on the output hook of ``lo``, only packets from the server's
  ports, producer replies included) per delivered payload byte (records × payload bytes ×
  subscribers), counting TCP/UDP payload; the figure with IP + TCP/UDP headers, as nft
  counts whole packets (on ``lo`` one header per GSO packet of up to 64 KiB), is in the JSON.
* latency: the producer sends at a fixed ``--latency-rate`` (5k records/s) for
  ``--latency-seconds``; each payload starts with the producer's ``time.time_ns()``; each
  subscriber records deliver − produce per record. p50/p99/p99.9 over every subscriber's
  samples after a warm-up (the first second or tenth of the records, whichever is less).

Each figure is the median of ``--repeats``. Rows are compared to the best peer per metric.
Goals (issue 4), checked for the rows that are not peers (boomscooter): end-to-end ≥ 2× the
best peer; ≤ 0.35 bytes sent per delivered payload byte; producer ≥ 200k records/s; latency
p50 ≤ 1 ms and p99 no worse than the best peer's.

Adding a system: a :class:`bench.harness.Runner` subclass (in a module of its own, as
:mod:`bench.peer_redis`) and one line in ``RUNNERS``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from bench import report
from bench.harness import Runner, Workload, run_workload
from bench.log_boomscooter import BoomscooterRunner
from bench.peer_nats import NatsRunner
from bench.peer_redis import RedisRunner
from bench.processes import SERVER_NICE, exit_on_sigterm
from bench.report import cell, percentile
from bench.traffic import TrafficCounter

RUNNERS: dict[str, type[Runner]] = {r.name: r for r in (RedisRunner, NatsRunner, BoomscooterRunner)}
"""Every system the bench knows, in table order."""

GOAL_E2E_VS_PEER = 2.0
GOAL_BYTES = 0.35
GOAL_PRODUCER = 200_000.0
GOAL_P50_MS = 1.0


@dataclass(slots=True, kw_only=True)
class Metrics:
    """One system's figures: of one repeat, or the medians over the repeats."""

    e2e_rps: float | None = None
    producer_rps: float | None = None
    bytes_per_byte: float | None = None
    """TCP/UDP payload bytes the server sent per delivered payload byte."""
    bytes_per_byte_ip: float | None = None
    """The same with IP + TCP/UDP headers (as nft counts packets)."""
    p50_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    latency_samples: int | None = None
    note: str = ""


HIGHER_BETTER = {"e2e_rps": True, "producer_rps": True}
COLUMNS: list[report.Column] = [
    ("e2e_rps", "e2e rec/s", "{:,.0f}"),
    ("producer_rps", "prod rec/s", "{:,.0f}"),
    ("bytes_per_byte", "B sent/B", "{:.3f}"),
    ("bytes_per_byte_ip", "+IP/TCP hdr", "{:.3f}"),
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
    ("p999_ms", "p99.9 ms", "{:.2f}"),
]


def throughput(runner: Runner, args: argparse.Namespace, workdir: Path, m: Metrics) -> None:
    work = Workload(records=args.records, payload_bytes=args.payload_bytes,
                    subscribers=args.subscribers)  # fmt: skip
    try:
        endpoint = runner.start(workdir)
        with TrafficCounter(runner.count_rules()) as counter:
            out = run_workload(type(runner), endpoint, work, timeout_s=60 + args.records / 2000)
            traffic = counter.read()
    finally:
        runner.stop()
    if out.error is not None or out.producer is None:
        m.note += f"throughput: {out.error}; "
        return
    short = [s.records for s in out.subscribers if s.records != work.records or not s.last_ns]
    if short:
        m.note += f"throughput: subscribers got {short} of {work.records}; "
        return
    p = out.producer
    m.producer_rps = work.records / ((p.end_ns - p.start_ns) / 1e9)
    m.e2e_rps = work.records / ((max(s.last_ns for s in out.subscribers) - p.start_ns) / 1e9)
    delivered = work.records * work.payload_bytes * work.subscribers
    if traffic is None:
        m.note += f"bytes n/a ({counter.error}); "
    else:
        m.bytes_per_byte_ip = traffic.bytes / delivered
        if traffic.payload_bytes is not None:
            m.bytes_per_byte = traffic.payload_bytes / delivered


def latency(runner: Runner, args: argparse.Namespace, workdir: Path, m: Metrics) -> None:
    records = round(args.latency_rate * args.latency_seconds)
    work = Workload(records=records, payload_bytes=args.payload_bytes,
                    subscribers=args.subscribers, rate=args.latency_rate)  # fmt: skip
    try:
        endpoint = runner.start(workdir)
        out = run_workload(type(runner), endpoint, work, timeout_s=60 + args.latency_seconds)
    finally:
        runner.stop()
    if out.error is not None:
        m.note += f"latency: {out.error}; "
        return
    warm = min(round(args.latency_rate), records // 10)
    samples: list[int] = []
    for sub in out.subscribers:
        values = array("q")
        values.frombytes(sub.latencies_ns)
        samples.extend(values[warm:])
    samples.sort()
    m.latency_samples = len(samples)
    m.p50_ms, m.p99_ms, m.p999_ms = (percentile(samples, q) / 1e6 for q in (50, 99, 99.9))


def median_metrics(runs: Sequence[Metrics]) -> Metrics:
    med = Metrics(note=" ".join(r.note for r in runs).strip())
    for f in fields(Metrics):
        if f.name == "note":
            continue
        values = [getattr(r, f.name) for r in runs if getattr(r, f.name) is not None]
        if values:
            setattr(med, f.name, statistics.median(values))
    return med


def best_peer(medians: dict[str, Metrics], name: str) -> float | None:
    values: list[float] = [
        getattr(m, name)
        for system, m in medians.items()
        if RUNNERS[system].peer and getattr(m, name) is not None
    ]
    if not values:
        return None
    return max(values) if HIGHER_BETTER.get(name, False) else min(values)


def ratios(medians: dict[str, Metrics]) -> dict[str, dict[str, float | None]]:
    table: dict[str, dict[str, float | None]] = {}
    for system, m in medians.items():
        row: dict[str, float | None] = {}
        for name, _, _ in COLUMNS:
            best, value = best_peer(medians, name), getattr(m, name)
            row[name] = value / best if best and value is not None else None
        table[system] = row
    return table


def goals(m: Metrics, medians: dict[str, Metrics]) -> list[tuple[str, bool | None]]:
    def check(value: float | None, test: Callable[[float], bool]) -> bool | None:
        return None if value is None else test(value)

    best_e2e, best_p99 = best_peer(medians, "e2e_rps"), best_peer(medians, "p99_ms")
    return [
        (f"end-to-end >= {GOAL_E2E_VS_PEER:g}x best peer",
         check(m.e2e_rps, lambda v: best_e2e is not None and v >= GOAL_E2E_VS_PEER * best_e2e)),
        (f"<= {GOAL_BYTES} bytes sent per delivered payload byte",
         check(m.bytes_per_byte, lambda v: v <= GOAL_BYTES)),
        (f"producer >= {GOAL_PRODUCER:,.0f} records/s",
         check(m.producer_rps, lambda v: v >= GOAL_PRODUCER)),
        (f"p50 <= {GOAL_P50_MS:g} ms", check(m.p50_ms, lambda v: v <= GOAL_P50_MS)),
        ("p99 <= best peer's p99",
         check(m.p99_ms, lambda v: best_p99 is not None and v <= best_p99)),
    ]  # fmt: skip


def print_table(title: str, rows: dict[str, Metrics]) -> None:
    report.print_table(title, rows, COLUMNS, key_width=13, cell_width=13)


def print_ratios(table: dict[str, dict[str, float | None]]) -> None:
    print("\nratio to the best peer per metric (>1: more; for bytes and latency, lower is better)")
    print(f"{'system':<13}" + "".join(f"{h:>13}" for _, h, _ in COLUMNS))
    for system, row in table.items():
        print(f"{system:<13}" + "".join(f"{cell(row[n], '{:.2f}x'):>13}" for n, _, _ in COLUMNS))


def _peer_list(text: str) -> list[str]:
    names = [tok.strip() for tok in text.split(",") if tok.strip()]
    unknown = [n for n in names if n not in RUNNERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown systems {unknown}; choose from {list(RUNNERS)}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.log_bench",
        description="One producer to N subscribers: boomscooter beside Redis Streams and "
        "NATS JetStream on loopback.",
    )
    p.add_argument(
        "--peers",
        type=_peer_list,
        default=list(RUNNERS),
        help=f"systems to run, comma-separated (default: {','.join(RUNNERS)})",
    )
    p.add_argument("--records", type=int, default=None, help="throughput run (1000000)")
    p.add_argument("--subscribers", type=int, default=4)
    p.add_argument("--payload-bytes", type=int, default=100)
    p.add_argument("--repeats", type=int, default=None, help="medians of this many (3)")
    p.add_argument("--latency-rate", type=float, default=5000.0, help="records/s")
    p.add_argument("--latency-seconds", type=float, default=None, help="(10)")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 100k records, 1 repeat, 3 s latency run"
    )
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the servers' data")
    args = p.parse_args(argv)  # fmt: skip
    if args.records is None:
        args.records = 100_000 if args.quick else 1_000_000
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.latency_seconds is None:
        args.latency_seconds = 3.0 if args.quick else 10.0
    if min(args.records, args.subscribers, args.repeats) < 1 or args.payload_bytes < 8:
        p.error("records, subscribers, repeats must be >= 1 and payload-bytes >= 8")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    runners: list[Runner] = []
    skipped: dict[str, str] = {}
    for name in args.peers:
        runner = RUNNERS[name]()
        reason = runner.missing()
        if reason is None:
            runners.append(runner)
        else:
            skipped[name] = reason
    print(
        f"{args.records:,} records of {args.payload_bytes} B, 1 producer -> "
        f"{args.subscribers} subscribers (separate processes), 127.0.0.1; latency at "
        f"{args.latency_rate:,.0f} records/s for {args.latency_seconds:g} s; medians of "
        f"{args.repeats}; servers at nice {SERVER_NICE}; {os.cpu_count()} cores, load "
        f"average {os.getloadavg()[0]:.2f} (other work on the host skews every figure)"
    )
    load_start = os.getloadavg()[0]
    for runner in runners:
        print(f"  {runner.describe()}")
    for name, reason in skipped.items():
        print(f"  {name}: skipped ({reason})")
    workdir = Path(tempfile.mkdtemp(prefix="logbench-", dir=args.workdir))
    runs: dict[str, list[Metrics]] = {r.name: [] for r in runners}
    interrupted = False
    try:
        for rep in range(1, args.repeats + 1):
            for runner in runners:
                m = Metrics()
                throughput(runner, args, workdir, m)
                latency(runner, args, workdir, m)
                runs[runner.name].append(m)
                print_table(f"{runner.name}, repeat {rep} of {args.repeats}", {runner.name: m})
    except (KeyboardInterrupt, SystemExit):
        print("interrupted", file=sys.stderr)
        interrupted = True
    finally:
        for runner in runners:
            runner.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {name: median_metrics(ms) for name, ms in runs.items() if ms}
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.2f}")
    print_table(
        f"medians of {args.repeats}; B sent/B: TCP/UDP payload bytes the server sent per "
        "delivered payload byte (+IP/TCP hdr: with the headers of the packets nft counted)",
        medians,
    )
    table = ratios(medians)
    print_ratios(table)
    checked = {name: goals(m, medians) for name, m in medians.items() if not RUNNERS[name].peer}
    for name, results in checked.items():
        print(f"\ngoals (issue 4) for {name}:")
        report.print_goals(results)
    if args.json is not None:
        payload: dict[str, Any] = {
            "config": report.config_of(args),
            "host": report.host_of(load_start),
            "systems": {r.name: r.describe() for r in runners},
            "bytes_counting": "nft counter, output hook, oifname lo, the server's ports; "
            "bytes_per_byte = TCP/UDP payload / (records * payload_bytes * subscribers); "
            "bytes_per_byte_ip adds the IP + TCP/UDP headers of each packet nft saw (on lo "
            "one per GSO packet of up to 64 KiB)",
            "skipped": skipped,
            "runs": {name: [asdict(m) for m in ms] for name, ms in runs.items()},
            "medians": {name: asdict(m) for name, m in medians.items()},
            "ratio_to_best_peer": table,
            "goals": {name: [{"goal": t, "met": ok} for t, ok in r] for name, r in checked.items()},
        }
        report.write_json(args.json, payload)
    if interrupted:
        return 130
    complete = all(
        len(ms) == args.repeats and all(m.e2e_rps and m.p50_ms for m in ms) for ms in runs.values()
    )
    return 0 if complete and runners else 1


if __name__ == "__main__":
    sys.exit(main())
