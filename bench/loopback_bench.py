"""CPU efficiency on loopback: no rate limit, 8 KiB pages, N clients (default 4).

Measures wall time from starting the clients until every one holds a verified file, and
reports MB/s delivered per client and in aggregate, plus the server's resend count.
Run: ``python -m bench.loopback_bench [--clients 4] [--size-mib 256] [--runs 3]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bootcast.demo import loopback_serve_argv


def bootcast_cmd() -> list[str]:
    exe = shutil.which("bootcast") or str(Path(sys.executable).parent / "bootcast")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "bootcast"]


def run_once(root: Path, out: Path, clients: int, digest: str) -> tuple[float, int]:
    # "No rate limit": far above what loopback and Python reach (adaptive pacing stays on).
    server = subprocess.Popen(
        loopback_serve_argv(root, rate_mbit=100_000), stderr=subprocess.PIPE, text=True
    )
    try:
        assert server.stderr is not None
        port = None
        for line in server.stderr:
            event = json.loads(line)
            if event["event"] == "serve.listening":
                port = event["port"]
                break
        assert port is not None, "server did not start"
        url = f"http://127.0.0.1:{port}/join/file.bin"
        start = time.monotonic()
        procs = [
            subprocess.Popen(
                [*bootcast_cmd(), "fetch", url, "-O", str(out / f"c{i}"), "-q", "--timeout", "60"]
            )
            for i in range(clients)
        ]
        codes = [p.wait(timeout=600) for p in procs]
        wall = time.monotonic() - start
        if any(codes):
            raise RuntimeError(f"fetch failed: exit codes {codes}")
        for i in range(clients):
            with open(out / f"c{i}", "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != digest:
                    raise RuntimeError(f"client {i}: digest mismatch")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        match = re.search(r"^bootcast_pages_resent_total (\S+)$", metrics, re.M)
        return wall, int(float(match.group(1))) if match else -1
    finally:
        server.terminate()
        server.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bootcast-lo-bench-") as tmp:
        root, out = Path(tmp) / "srv", Path(tmp) / "out"
        root.mkdir()
        out.mkdir()
        data = os.urandom(args.size_mib * 1024 * 1024)
        (root / "file.bin").write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        del data
        results = [run_once(root, out, args.clients, digest) for _ in range(args.runs)]
    size_mb = args.size_mib * 1.048576
    wall = statistics.median(w for w, _ in results)
    print(
        f"\nbootcast loopback, no rate limit, 8 KiB pages, {args.clients} clients, "
        f"{args.size_mib} MiB, median of {args.runs}"
    )
    print(f"{'run':<5}{'wall s':>9}{'MB/s/client':>13}{'MB/s total':>12}{'resent':>9}")
    for i, (w, resent) in enumerate(results, 1):
        print(f"{i:<5}{w:>9.2f}{size_mb / w:>13.1f}{args.clients * size_mb / w:>12.1f}{resent:>9}")
    print(f"{'med':<5}{wall:>9.2f}{size_mb / wall:>13.1f}{args.clients * size_mb / wall:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
