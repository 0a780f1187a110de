"""Replication benchmark: boomscooter leader + 2 replicas at acks=quorum (``--min-insync
2``) beside NATS JetStream R3 (three clustered ``nats-server``, a stream with 3 replicas),
100-byte records on loopback, with ``--fsync interval`` and ``--fsync always``, in one run.

Run: ``python -m bench.replication_bench [--quick] [--records 300000] [--repeats 2]
[--latency-rate 1000] [--latency-seconds 5] [--fsync interval,always] [--json OUT]``.

Per system, durability setting and repeat, one freshly started cluster (temp data dirs,
free 127.0.0.1 ports; see :class:`bench.log_boomscooter.BoomscooterCluster` and
:class:`bench.peer_nats.NatsCluster`) and two runs on it, the producer in its own spawned
process (the harness of :mod:`bench.harness`, no subscribers):

* latency: ``--latency-rate`` records/s for ``--latency-seconds``; each record's ack
  latency is send → acknowledgement processed by the producer; p50/p99/p99.9 after a
  warm-up (the first second or tenth of the records, whichever is less);
* throughput: ``--records`` records as fast as the producer goes with several batches in
  flight; records/s = records / (first send → last ack).

Afterwards the cluster's health goes in the note: a replica out of sync or behind, the
commit behind the log, warnings in the nodes' logs, a node that exited.

NATS "fsync always" is ``sync_interval: always`` (nats-server >= 2.10). An older server
has no such option: its JetStream fsyncs on its own schedule (every 2 minutes), so one NATS
configuration serves as the peer of both settings, and the table says so. Each figure is
the median of ``--repeats``. Goals (the issue): boomscooter >= 100k records/s at quorum
with fsync=interval, and >= 1.5x NATS R3's records/s under both settings.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from bench import report
from bench.harness import AckedResult, Runner, Workload, run_workload
from bench.log_boomscooter import LATENCY_LINGER_MS, BoomscooterCluster
from bench.peer_nats import WINDOWS, NatsCluster, nats_sync_always_supported, nats_version
from bench.processes import SERVER_NICE, exit_on_sigterm
from bench.report import cell, percentile

GOAL_RPS = 100_000.0
GOAL_VS_NATS = 1.5


@dataclass(slots=True, kw_only=True)
class Metrics:
    """One cluster's figures: of one repeat, or the medians over the repeats."""

    producer_rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    latency_samples: int | None = None
    elapsed_s: float | None = None
    """Wall time of the whole measurement (start, both runs, stop)."""
    note: str = ""


COLUMNS: list[report.Column] = [
    ("producer_rps", "records/s", "{:,.0f}"),
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
    ("p999_ms", "p99.9 ms", "{:.2f}"),
]


@dataclass(frozen=True, slots=True)
class Row:
    """A table row: a system under one durability setting."""

    key: str
    setting: str
    """The boomscooter ``--fsync`` value this row is measured under or compared with."""
    factory: str
    """``boomscooter`` or ``nats``."""
    nats_always: bool = False


def plan(settings: Sequence[str], systems: Sequence[str], sync_always: bool) -> list[Row]:
    """Rows in the order they are measured; NATS rows are shared by the settings that map
    to the same server configuration."""
    rows: list[Row] = []
    for setting in settings:
        if "boomscooter" in systems:
            rows.append(Row(f"boomscooter {setting}", setting, "boomscooter"))
        if "nats" in systems:
            always = sync_always and setting == "always"
            key = "nats R3 sync always" if always else "nats R3 default sync"
            if all(r.key != key for r in rows):
                rows.append(Row(key, setting, "nats", always))
    return rows


def nats_row_for(setting: str, rows: Sequence[Row]) -> Row | None:
    """The NATS row a boomscooter setting is compared with."""
    nats = [r for r in rows if r.factory == "nats"]
    exact = [r for r in nats if r.nats_always == (setting == "always")]
    found = exact or nats
    return found[0] if found else None


def make_runner(row: Row, args: argparse.Namespace) -> BoomscooterCluster | NatsCluster:
    if row.factory == "boomscooter":
        return BoomscooterCluster(row.setting, args.page_size, args.latency_linger_ms)
    return NatsCluster(sync_always=row.nats_always, windows=args.nats_windows)


def _latencies(result: Any) -> list[int]:
    values = array("q")
    if isinstance(result, AckedResult):
        values.frombytes(result.latencies_ns)
    return list(values)


def measure(
    runner: BoomscooterCluster | NatsCluster, args: argparse.Namespace, workdir: Path
) -> Metrics:
    m = Metrics()
    began = time.monotonic()
    lat_records = max(1, round(args.latency_rate * args.latency_seconds))
    paced = Workload(records=lat_records, payload_bytes=args.payload_bytes, subscribers=0,
                     rate=args.latency_rate)  # fmt: skip
    flood = Workload(records=args.records, payload_bytes=args.payload_bytes, subscribers=0)
    try:
        endpoint = runner.start(workdir)
        out = run_workload(type(runner), endpoint, paced, timeout_s=60 + args.latency_seconds)
        if out.error is not None or out.producer is None:
            m.note += f"latency: {out.error}; "
        else:
            warm = min(round(args.latency_rate), lat_records // 10)
            samples = sorted(_latencies(out.producer)[warm:])
            m.latency_samples = len(samples)
            m.p50_ms, m.p99_ms, m.p999_ms = (percentile(samples, q) / 1e6 for q in (50, 99, 99.9))
        out = run_workload(type(runner), endpoint, flood, timeout_s=60 + args.records / 2000)
        if out.error is not None or out.producer is None:
            m.note += f"throughput: {out.error}; "
        else:
            p = out.producer
            m.producer_rps = flood.records / ((p.end_ns - p.start_ns) / 1e9)
        health = runner.health()
        if health:
            m.note += health
    except (RuntimeError, TimeoutError, OSError) as exc:
        m.note += f"failed: {exc}"
    finally:
        runner.stop()
    m.elapsed_s = time.monotonic() - began
    return m


def median_metrics(runs: Sequence[Metrics]) -> Metrics:
    med = Metrics(note=" ".join(r.note for r in runs if r.note).strip())
    for f in fields(Metrics):
        if f.name == "note":
            continue
        values = [getattr(r, f.name) for r in runs if getattr(r, f.name) is not None]
        if values:
            setattr(med, f.name, statistics.median(values))
    return med


def print_table(title: str, rows: dict[str, Metrics]) -> None:
    report.print_table(title, rows, COLUMNS, key_width=28, cell_width=12)


def comparisons(
    settings: Sequence[str], rows: Sequence[Row], medians: dict[str, Metrics]
) -> dict[str, dict[str, Any]]:
    """Per setting: boomscooter's figure / NATS's, per column."""
    table: dict[str, dict[str, Any]] = {}
    for setting in settings:
        peer = nats_row_for(setting, rows)
        ours = medians.get(f"boomscooter {setting}")
        theirs = medians.get(peer.key) if peer is not None else None
        if ours is None or theirs is None or peer is None:
            continue
        ratio: dict[str, Any] = {"peer": peer.key}
        for name, _, _ in COLUMNS:
            a, b = getattr(ours, name), getattr(theirs, name)
            ratio[name] = a / b if a is not None and b else None
        table[setting] = ratio
    return table


def print_ratios(table: dict[str, dict[str, Any]]) -> None:
    print("\nboomscooter / NATS R3 (records/s: >1 is faster; latency: <1 is lower)")
    print(f"{'fsync':<12}{'vs':<24}" + "".join(f"{h:>12}" for _, h, _ in COLUMNS))
    for setting, ratio in table.items():
        cells = "".join(f"{cell(ratio[n], '{:.2f}x'):>12}" for n, _, _ in COLUMNS)
        print(f"{setting:<12}{ratio['peer']:<24}{cells}")


def goals(
    settings: Sequence[str], medians: dict[str, Metrics], table: dict[str, dict[str, Any]]
) -> list[tuple[str, bool | None]]:
    results: list[tuple[str, bool | None]] = []
    for setting in settings:
        ours = medians.get(f"boomscooter {setting}")
        rps = ours.producer_rps if ours is not None else None
        if setting.startswith("interval"):
            met = None if rps is None else rps >= GOAL_RPS
            results.append((f"fsync={setting}: >= {GOAL_RPS:,.0f} records/s at quorum", met))
        ratio = table.get(setting, {}).get("producer_rps")
        met = None if ratio is None else ratio >= GOAL_VS_NATS
        results.append((f"fsync={setting}: >= {GOAL_VS_NATS:g}x NATS R3 records/s", met))
    return results


def _list(text: str) -> list[str]:
    return [tok.strip() for tok in text.split(",") if tok.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.replication_bench",
        description="boomscooter leader + 2 replicas (acks=quorum) beside NATS JetStream R3 "
        "on loopback: producer records/s and ack latency under two fsync settings.",
    )
    p.add_argument(
        "--fsync",
        type=_list,
        default=["interval", "always"],
        help="boomscooter --fsync values, comma-separated (default interval,always)",
    )
    p.add_argument(
        "--systems",
        type=_list,
        default=["boomscooter", "nats"],
        help="boomscooter and/or nats (default both)",
    )
    p.add_argument("--records", type=int, default=None, help="throughput run (300000)")
    p.add_argument("--payload-bytes", type=int, default=100)
    p.add_argument("--repeats", type=int, default=None, help="medians of this many (2; --quick 1)")
    p.add_argument("--latency-rate", type=float, default=1000.0, help="records/s (1000)")
    p.add_argument("--latency-seconds", type=float, default=None, help="(5)")
    p.add_argument(
        "--latency-linger-ms",
        type=float,
        default=LATENCY_LINGER_MS,
        help=f"boomscooter Producer linger in the latency run ({LATENCY_LINGER_MS})",
    )
    p.add_argument(
        "--page-size",
        type=int,
        default=None,
        help="boomscooter --page-size (default: the node's default)",
    )
    p.add_argument(
        "--nats-windows",
        type=int,
        default=WINDOWS,
        help=f"NATS publish windows of 1000 records in flight ({WINDOWS})",
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 30k records, 2 s latency run, 1 repeat"
    )
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the clusters' data")
    args = p.parse_args(argv)  # fmt: skip
    if args.records is None:
        args.records = 30_000 if args.quick else 300_000
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if args.latency_seconds is None:
        args.latency_seconds = 2.0 if args.quick else 5.0
    unknown = [s for s in args.systems if s not in ("boomscooter", "nats")]
    if unknown or not args.systems or not args.fsync:
        p.error(f"--systems takes boomscooter,nats (not {unknown}); --fsync at least one")
    if min(args.records, args.repeats) < 1 or args.payload_bytes < 8 or args.latency_rate <= 0:
        p.error("records and repeats must be >= 1, payload-bytes >= 8, latency-rate > 0")
    return args


def _missing(row: Row, args: argparse.Namespace) -> str | None:
    runner: Runner = make_runner(row, args)
    return runner.missing()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    has_nats = "nats" in args.systems and shutil.which("nats-server") is not None
    sync_always = has_nats and nats_sync_always_supported()
    rows = plan(args.fsync, args.systems, sync_always)
    skipped = {r.key: reason for r in rows if (reason := _missing(r, args)) is not None}
    rows = [r for r in rows if r.key not in skipped]
    print(
        f"leader + 2 replicas vs NATS JetStream R3, {args.payload_bytes}-byte records, "
        f"127.0.0.1; throughput {args.records:,} records, latency at "
        f"{args.latency_rate:,.0f} records/s for {args.latency_seconds:g} s; medians of "
        f"{args.repeats}; servers at nice {SERVER_NICE}; {os.cpu_count()} cores, load "
        f"average {os.getloadavg()[0]:.2f} (other work on the host skews every figure)"
    )
    load_start = os.getloadavg()[0]
    for row in rows:
        print(f"  {row.key}: {make_runner(row, args).describe()}")
    if has_nats and not sync_always:
        print(
            f"  nats-server {nats_version()} has no jetstream sync_interval option (>= 2.10): "
            "its default sync (fsync every 2 minutes) is NATS's row for every setting"
        )
    for key, reason in skipped.items():
        print(f"  {key}: skipped ({reason})")
    workdir = Path(tempfile.mkdtemp(prefix="replbench-", dir=args.workdir))
    runs: dict[str, list[Metrics]] = {r.key: [] for r in rows}
    interrupted = False
    try:
        for rep in range(1, args.repeats + 1):
            for row in rows:
                m = measure(make_runner(row, args), args, workdir)
                runs[row.key].append(m)
                print_table(
                    f"{row.key}, repeat {rep} of {args.repeats} ({m.elapsed_s:.0f} s)",
                    {row.key: m},
                )
    except (KeyboardInterrupt, SystemExit):
        print("interrupted", file=sys.stderr)
        interrupted = True
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {key: median_metrics(ms) for key, ms in runs.items() if ms}
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.2f}")
    print_table(
        f"medians of {args.repeats}: producer records/s at acks=quorum / R3, ack latency at "
        f"{args.latency_rate:,.0f} records/s",
        medians,
    )
    table = comparisons(args.fsync, rows, medians)
    print_ratios(table)
    checked = goals(args.fsync, medians, table)
    print("\ngoals (the issue) for boomscooter:")
    report.print_goals(checked)
    if args.json is not None:
        payload: dict[str, Any] = {
            "config": report.config_of(args),
            "host": report.host_of(load_start),
            "systems": {r.key: make_runner(r, args).describe() for r in rows},
            "nats_sync_always": sync_always,
            "skipped": skipped,
            "runs": {key: [asdict(m) for m in ms] for key, ms in runs.items()},
            "medians": {key: asdict(m) for key, m in medians.items()},
            "boomscooter_over_nats": table,
            "goals": [{"goal": t, "met": ok} for t, ok in checked],
        }
        report.write_json(args.json, payload)
    if interrupted:
        return 130
    complete = all(
        len(ms) == args.repeats and all(m.producer_rps and m.p50_ms for m in ms)
        for ms in runs.values()
    )
    return 0 if complete and rows else 1


if __name__ == "__main__":
    sys.exit(main())
