"""File-distribution benchmark: bootcast against HTTP, udpcast and UFTP.

Run as root::

    python -m bench.files_bench [--clients 1,4,8] [--loss 0,5,20] [--size-mib 64]
                                [--peers http,udpcast,uftp,bootcast] [--quick] [--json OUT]

For every client count N a :class:`bench.netns.Topology` is built: one server and N
clients on a bridge, the server's egress limited by ``tbf`` to ``--link-mbit`` (100).
For every loss rate and peer, one run measures the wall time until every client holds a
copy of a random file, and then verifies each copy against the source's SHA-256. The ideal
time is what one copy takes over the bottleneck, ``size * 8 / link``: a perfect multicast
sender delivers all N copies in that time, a unicast server needs N times as long.

Loss is injected with nftables on every client's input hook. For the multicast peers only
UDP to multicast groups is dropped (their unicast control traffic — HTTP joins, NAKs,
ACKs — is left alone). For HTTP, by default (``--http-loss tcp``) the same rate is applied
to *every* packet the clients receive, TCP included, because HTTP has no multicast to drop;
``--http-loss skip`` runs HTTP only at 0 % instead.

What each peer is, its configuration and where its clock starts and stops are
described in :mod:`bench.files_peers` and the modules it names.

A run that exceeds ``--timeout-factor`` × ideal (× N for HTTP, which must push N copies;
at least ``--min-timeout-s``) is killed and recorded as failed. Logs of every process are
kept in the work directory when ``--keep`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.files_harness import FILE_NAME, RunSpec, make_source, prepare_netns, sha256_of
from bench.files_peers import PEERS, TOOLS
from bench.netns import Topology
from bench.peer_bootcast import find_bootcast
from bench.processes import SERVER_NICE
from bench.report import write_json

PREFIX = "bcb"
ALL_PEERS = ("http", "udpcast", "uftp", "bootcast")


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """One measured row of the table."""

    peer: str
    n_clients: int
    loss_pct: int
    size_bytes: int
    ideal_s: float
    wall_s: float | None
    verified: int
    """How many clients hold a copy whose SHA-256 matches the source."""
    dropped_pkts: int
    """Packets the injected-loss rules dropped, summed over the clients."""
    ok: bool
    skipped: bool
    """The peer's tools are not installed; the row carries no measurement."""
    note: str

    @property
    def ratio(self) -> float | None:
        return None if self.wall_s is None else self.wall_s / self.ideal_s


def _one_run(
    *,
    peer: str,
    topo: Topology,
    loss_pct: int,
    src: Path,
    src_sha: str,
    work: Path,
    ideal_s: float,
    args: argparse.Namespace,
) -> Result:
    n = len(topo.clients)

    def result(
        *, wall_s: float | None, verified: int, dropped: int, note: str, skipped: bool = False
    ) -> Result:
        return Result(
            peer=peer,
            n_clients=n,
            loss_pct=loss_pct,
            size_bytes=src.stat().st_size,
            ideal_s=ideal_s,
            wall_s=wall_s,
            verified=verified,
            dropped_pkts=dropped,
            ok=wall_s is not None and verified == n,
            skipped=skipped,
            note=note,
        )

    missing = [tool for tool in TOOLS[peer] if shutil.which(tool) is None]
    if peer == "bootcast" and find_bootcast() is None:
        return result(
            wall_s=None, verified=0, dropped=0, note="bootcast: not installed", skipped=True
        )
    if missing:
        note = f"{peer}: not installed ({', '.join(missing)})"
        return result(wall_s=None, verified=0, dropped=0, note=note, skipped=True)
    run_dir = work / f"{peer}-n{n}-l{loss_pct}"
    shutil.rmtree(run_dir, ignore_errors=True)
    outputs = []
    for i in range(n):
        d = run_dir / f"c{i}"
        d.mkdir(parents=True)
        outputs.append(d / src.name)
    topo.set_all_loss(loss_pct, only_multicast=peer != "http")
    spec = RunSpec(
        topo=topo,
        src=src,
        outputs=outputs,
        logdir=run_dir,
        # Unicast needs N copies through the bottleneck; give it the same slack per copy.
        timeout_s=max(
            args.min_timeout_s, args.timeout_factor * ideal_s * (n if peer == "http" else 1)
        ),
        send_rate_mbit=args.send_rate_mbit,
        link_mbit=args.link_mbit,
        udpcast_fec=args.udpcast_fec,
    )
    try:
        outcome = PEERS[peer](spec)
    finally:
        dropped = sum(topo.loss_counters(c) for c in topo.clients)
        topo.set_all_loss(0)
    verified = sum(1 for out in outputs if sha256_of(out) == src_sha)
    if outcome.wall_s is not None and verified != n:
        note = f"{outcome.note} only {verified}/{n} verified".strip()
    else:
        note = outcome.note
    if not args.keep:
        for out in outputs:
            with contextlib.suppress(OSError):
                out.unlink()
    return result(wall_s=outcome.wall_s, verified=verified, dropped=dropped, note=note)


def format_row(r: Result) -> str:
    wall = "-" if r.wall_s is None else f"{r.wall_s:8.2f}"
    ratio = "-" if r.ratio is None else f"{r.ratio:6.2f}"
    return (
        f"{r.peer:<9} {r.n_clients:>3} {r.loss_pct:>5} {wall:>8} {ratio:>6} "
        f"{'-' if r.skipped else 'yes' if r.ok else 'no':>8} {r.dropped_pkts:>8}  {r.note}"
    )


HEADER = (
    f"{'peer':<9} {'N':>3} {'loss%':>5} {'wall s':>8} {'ratio':>6} {'verified':>8} "
    f"{'dropped':>8}  note"
)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(tok) for tok in text.split(",") if tok.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return values


def _peer_list(text: str) -> list[str]:
    peers = [tok.strip() for tok in text.split(",") if tok.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown or not peers:
        raise argparse.ArgumentTypeError(f"unknown peers {unknown}; choose from {ALL_PEERS}")
    return peers


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.files_bench",
        description="Time distributing one file to N clients over a shaped namespace LAN.",
    )
    p.add_argument("--clients", type=_int_list, default=None, help="client counts (1,4,8)")
    p.add_argument("--loss", type=_int_list, default=None, help="loss percentages (0,5,20)")
    p.add_argument("--size-mib", type=int, default=None, help="file size in MiB (64)")
    p.add_argument("--peers", type=_peer_list, default=list(ALL_PEERS), help="peers to run")
    p.add_argument("--quick", action="store_true", help="8 MiB file, N=1,4")
    p.add_argument("--link-mbit", type=float, default=100.0, help="server link rate (tbf)")
    p.add_argument(
        "--send-rate-mbit", type=float, default=95.0, help="rate given to the multicast senders"
    )
    p.add_argument(
        "--http-loss",
        choices=("tcp", "skip"),
        default="tcp",
        help="tcp: drop the same share of all packets clients receive; "
        "skip: run HTTP at 0%% loss only",
    )
    p.add_argument(
        "--udpcast-fec",
        default="8x4",
        help="udp-sender --fec INTERLEAVExREDUNDANCY[/STRIPESIZE]; '' for none",
    )
    p.add_argument("--timeout-factor", type=float, default=40.0)
    p.add_argument("--min-timeout-s", type=float, default=30.0)
    p.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the work directory")
    p.add_argument("--keep", action="store_true", help="keep received files and logs")
    args = p.parse_args(argv)
    if args.clients is None:
        args.clients = [1, 4] if args.quick else [1, 4, 8]
    if args.loss is None:
        args.loss = [0, 5, 20]
    if args.size_mib is None:
        args.size_mib = 8 if args.quick else 64
    if any(n < 1 for n in args.clients) or any(not 0 <= x < 100 for x in args.loss):
        p.error("client counts must be >= 1 and loss in 0..99")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not prepare_netns("files_bench", PREFIX):
        return 2

    size_bytes = args.size_mib * 1024 * 1024
    ideal_s = size_bytes * 8 / (args.link_mbit * 1e6)
    work = Path(tempfile.mkdtemp(prefix="bcb-bench-", dir=args.workdir))
    results: list[Result] = []
    try:
        src_dir = work / "src"
        src_dir.mkdir()
        src = src_dir / FILE_NAME
        src_sha = make_source(src, size_bytes)
        print(
            f"file {args.size_mib} MiB, link {args.link_mbit:g} Mbit/s (tbf on the server), "
            f"senders at {args.send_rate_mbit:g} Mbit/s, ideal {ideal_s:.2f} s; "
            f"loss: multicast UDP only, HTTP: "
            f"{'all packets incl. TCP' if args.http_loss == 'tcp' else 'not applied'}; "
            f"servers at nice {SERVER_NICE} (all hosts share {os.cpu_count()} cores)"
        )
        print(f"work dir {work}")
        print(HEADER, flush=True)
        for n in args.clients:
            with Topology(n_clients=n, server_rate_mbit=args.link_mbit, prefix=PREFIX) as topo:
                for loss in args.loss:
                    for peer in args.peers:
                        if peer == "http" and loss and args.http_loss == "skip":
                            continue
                        result = _one_run(
                            peer=peer, topo=topo, loss_pct=loss, src=src, src_sha=src_sha,
                            work=work, ideal_s=ideal_s, args=args,
                        )  # fmt: skip
                        results.append(result)
                        print(format_row(result), flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if args.json is not None:
            payload: dict[str, Any] = {
                "size_bytes": size_bytes,
                "link_mbit": args.link_mbit,
                "send_rate_mbit": args.send_rate_mbit,
                "ideal_s": ideal_s,
                "http_loss": args.http_loss,
                "results": [asdict(r) | {"ratio": r.ratio} for r in results],
            }
            write_json(args.json, payload)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    # Missing tools are reported in the table but do not fail the benchmark.
    return 0 if all(r.ok or r.skipped for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
