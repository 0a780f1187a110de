"""How close to the ideal can a Python client of one multicast get here? The floor under
:mod:`bench.files_bench`'s bootcast figures, measured on the same topology.

Run as root::

    python -m bench.files_floor [--clients 8] [--size-mib 64] [--link-mbit 100] [--repeats 3]

The wall time of N clients is bounded below by two things no client can avoid, printed
with the ideal (``size * 8 / link``) they are compared with:

* **wire** (computed): every page is one frame of ``PAGESIZE`` + page header (16) +
  trailer (4) + UDP (8) + IPv4 (20) + Ethernet (14) bytes, and ``tbf`` passes
  ``link`` bits of frames per second (also shown for the largest page a 1500-byte frame
  holds, without the trailer: the least any page format can cost);
* **start** (measured): N Python interpreters (``import socket``, nothing else) launched
  at once as the bench launches clients (``ip netns exec``, one per client namespace),
  until the last has exited; the median of at least 5. Here all hosts share the machine's
  cores, so N starts queue for them.

Their sum is the floor for any Python client that joins after it starts. Two measured
rows follow, each best of ``--repeats``, from launching the N clients until all exited,
against ``bootcast serve`` as :mod:`bench.peer_bootcast` runs it:

* **minimal receivers** (:mod:`bench.floor_client`): join, count distinct pages, exit — no
  CRC, no file, no SHA-256, no leave;
* **bootcast fetch**: the real client, copies verified by the harness (SHA-256).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.files_harness import FILE_NAME, Outcome, RunSpec, make_source, prepare_netns, sha256_of
from bench.netns import Topology
from bench.peer_bootcast import run_bootcast
from bootcast.defaults import DEFAULT_GROUP_V4, DEFAULT_PAGE_SIZE
from bootcast.page import HEADER_BYTES, TRAILER_BYTES
from bootcast.sender import wire_bytes

PREFIX = "bcf"
PAGE_SIZE = DEFAULT_PAGE_SIZE  # bootcast serve's default, as the bench runs it
# Page header, trailer, UDP, IPv4, Ethernet: what the sender's pacing counts per frame.
FRAME_OVERHEAD = wire_bytes(0, DEFAULT_GROUP_V4)
# The largest page a 1500-byte MTU carries unfragmented with the spec's header and no
# trailer: the least any page format of the protocol can put on the wire.
LARGEST_PAGE = 1500 - 20 - 8 - HEADER_BYTES
CLIENT = Path(__file__).resolve().with_name("floor_client.py")


def wire_s(
    size_bytes: int, link_mbit: float, page_size: int = PAGE_SIZE, overhead: int = FRAME_OVERHEAD
) -> float:
    """Seconds the link needs for every page of the file, once, in its own frame."""
    pages = math.ceil(size_bytes / page_size)
    return pages * (page_size + overhead) * 8 / (link_mbit * 1e6)


def interpreter_starts_s(topo: Topology) -> float:
    """Launch ``python -c 'import socket'`` in every client namespace at once; seconds
    until the last exited."""
    argv = [sys.executable, "-c", "import socket"]
    t0 = time.monotonic()
    procs = [topo.run(host, argv) for host in topo.clients]
    for proc in procs:
        proc.wait(timeout=60)
    end = time.monotonic()
    if any(proc.returncode for proc in procs):
        raise RuntimeError("a bare interpreter failed to start")
    return end - t0


def run_minimal(spec: RunSpec) -> Outcome:
    """``bootcast serve`` as in :func:`bench.peer_bootcast.run_bootcast`, with the minimal
    receivers of :mod:`bench.floor_client` as clients."""
    return run_bootcast(spec, lambda url, host, _: [sys.executable, str(CLIENT), url, host.addr])


def best_of(
    repeats: int, run: Callable[[int], Outcome], check: Callable[[], bool] = lambda: True
) -> tuple[float | None, str]:
    walls: list[float] = []
    notes: list[str] = []
    for i in range(repeats):
        outcome = run(i)
        if outcome.wall_s is not None and not outcome.note and check():
            walls.append(outcome.wall_s)
        else:
            notes.append(outcome.note or "copies did not verify")
    return (min(walls) if walls else None), "; ".join(notes)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.files_floor",
        description="The floor under bootcast's files_bench figures: wire time, Python "
        "start-up and minimal receivers, measured on the same topology.",
    )
    parser.add_argument("--clients", type=int, default=8, help="N clients (8)")
    parser.add_argument("--size-mib", type=int, default=64, help="file size in MiB (64)")
    parser.add_argument("--link-mbit", type=float, default=100.0, help="tbf rate (100)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; best shown (3)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.size_mib < 1 or args.repeats < 1 or args.link_mbit <= 0:
        parser.error("--clients, --size-mib, --repeats and --link-mbit must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not prepare_netns("files_floor", PREFIX):
        return 2
    size = args.size_mib * 1024 * 1024
    ideal = size * 8 / (args.link_mbit * 1e6)
    wire = wire_s(size, args.link_mbit)
    work = Path(tempfile.mkdtemp(prefix="bcf-floor-"))
    try:
        src = work / "src" / FILE_NAME
        src.parent.mkdir()
        sha = make_source(src, size)
        with Topology(
            n_clients=args.clients, server_rate_mbit=args.link_mbit, prefix=PREFIX
        ) as topo:
            starts = sorted(interpreter_starts_s(topo) for _ in range(max(5, args.repeats)))
            start = starts[len(starts) // 2]
            outputs = [work / f"copy-{i}" for i in range(args.clients)]

            def spec(i: int, kind: str) -> RunSpec:
                logdir = work / f"{kind}-{i}"
                logdir.mkdir()
                return RunSpec(
                    topo=topo, src=src, outputs=outputs, logdir=logdir,
                    timeout_s=max(60.0, 10 * ideal), send_rate_mbit=args.link_mbit,
                    udpcast_fec="", link_mbit=args.link_mbit,
                )  # fmt: skip

            def fetch(i: int) -> Outcome:
                for out in outputs:
                    out.unlink(missing_ok=True)
                return run_bootcast(spec(i, "fetch"))

            minimal, minimal_note = best_of(args.repeats, lambda i: run_minimal(spec(i, "min")))

            def copies_verify() -> bool:
                return all(sha256_of(out) == sha for out in outputs)

            real, real_note = best_of(args.repeats, fetch, copies_verify)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = args.clients
    print(
        f"N={n}, {args.size_mib} MiB, link {args.link_mbit:g} Mbit/s (tbf), pages of "
        f"{PAGE_SIZE} B in {PAGE_SIZE + FRAME_OVERHEAD}-B frames; ideal {ideal:.3f} s"
    )

    def row(label: str, seconds: float | None, note: str = "") -> None:
        if seconds is None:
            print(f"  {label:<66} failed: {note}")
        else:
            print(f"  {label:<66} {seconds:7.3f} s  {seconds / ideal:6.3f}×")

    row("wire: every page once at the link rate (computed)", wire)
    best_wire = wire_s(size, args.link_mbit, LARGEST_PAGE, FRAME_OVERHEAD - TRAILER_BYTES)
    row(f"  the same with {LARGEST_PAGE}-B pages and no trailer (computed)", best_wire)
    row(f"start: {n} Python interpreters at once, median (measured)", start)
    row("floor for any Python client: wire + start", wire + start)
    row(f"{n} minimal Python receivers, best of {args.repeats} (measured)", minimal, minimal_note)
    row(f"{n} bootcast fetch, verified, best of {args.repeats} (measured)", real, real_note)
    return 0 if minimal is not None and real is not None else 1


if __name__ == "__main__":
    sys.exit(main())
