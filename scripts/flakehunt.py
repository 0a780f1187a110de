"""Hunt for tests that fail by chance: run the whole suite again and again, shuffled, under CPU
load, and report every failure by test.

Each run shuffles the order of the suite (pytest-randomly, a new seed per run, printed so a
failing order can be replayed with ``-p randomly --randomly-seed=SEED``) while busy loops keep
the cores occupied, as CI's two cores are when the nodes, producers and subscribers a test
starts compete with each other:

- ``--load normal``: one busy loop per core at normal priority (the test suite gets about half
  of the machine);
- ``--load low``: the same loops at nice 19 (they take what the suite leaves idle);
- ``--load mixed``: runs alternate between ``normal`` and ``low``;
- ``--load none``: no loops.

Every run goes on to the end (no ``-x``), so one run counts every failure it meets. The
summary lists each run (seed, load, duration, load average, passed, failed) and each failing
test with the runs it failed in; it is printed and written to ``--report``. The exit code is 1
when any test failed in any run.

    python scripts/flakehunt.py --runs 10 --load normal
    python scripts/flakehunt.py --runs 10 --load none -- tests/test_leader_reads.py
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BUSY_LOOP = "while True: pass"


@dataclass
class Run:
    index: int
    seed: int
    load: str
    duration_s: float = 0.0
    load_before: str = ""
    load_after: str = ""
    exit_code: int = 0
    passed: int = 0
    failures: list[str] = field(default_factory=list)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10, help="suite runs (default: %(default)s)")
    parser.add_argument(
        "--load",
        choices=["normal", "low", "mixed", "none"],
        default="normal",
        help="busy loops beside the suite (default: %(default)s)",
    )
    parser.add_argument(
        "--run-timeout",
        type=float,
        default=30 * 60,
        help="seconds a run may take before it counts as hung and is killed (default %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="first run's shuffle seed (default: random)"
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=Path(".flakehunt/report.md"),
        help="where the summary is written (default: %(default)s)",
    )
    pytest_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, pytest_args = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args, pytest_args


def load_of(args: argparse.Namespace, index: int) -> str:
    if args.load == "mixed":
        return "normal" if index % 2 == 0 else "low"
    return str(args.load)


@contextlib.contextmanager
def busy_loops(load: str) -> Iterator[None]:
    """One busy Python loop per core, at the priority ``load`` names, for the block."""
    procs: list[subprocess.Popen[bytes]] = []
    if load != "none":
        niceness = 19 if load == "low" else 0
        for _ in range(os.cpu_count() or 2):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", BUSY_LOOP],
                    preexec_fn=(lambda: os.nice(niceness)) if niceness else None,
                )
            )
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def stop_group(suite: subprocess.Popen[bytes]) -> None:
    """SIGINT first (pytest tears down what the tests started, unless SIGINT is ignored, as
    in a background job), then SIGKILL to the whole group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(suite.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        suite.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(suite.pid, signal.SIGKILL)
    suite.wait()


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def run_suite(run: Run, pytest_args: list[str], junit: Path, timeout_s: float) -> None:
    argv = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
        "-p", "randomly", f"--randomly-seed={run.seed}", f"--junitxml={junit}",
        *pytest_args,
    ]  # fmt: skip
    run.load_before = load_average()
    began = time.monotonic()
    with busy_loops(run.load):
        # A process group of its own: an interrupted hunt stops the suite and whatever the
        # tests started (nodes, fetches) with it.
        suite = subprocess.Popen(argv, process_group=0)
        try:
            run.exit_code = suite.wait(timeout_s)
        except subprocess.TimeoutExpired:
            run.failures.append(f"(hung: no end within {timeout_s:.0f} s)")
            run.exit_code = -1
        finally:
            if suite.poll() is None:
                stop_group(suite)
    run.duration_s = time.monotonic() - began
    run.load_after = load_average()
    read_junit(run, junit)


def read_junit(run: Run, junit: Path) -> None:
    if not junit.exists():
        run.failures.append(f"(no report: pytest exited {run.exit_code})")
        return
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            run.failures.append(name)
        elif case.find("skipped") is None:
            run.passed += 1
    if run.exit_code not in (0, 1) and not run.failures:
        run.failures.append(f"(pytest exited {run.exit_code})")


def summary(runs: list[Run], pytest_args: list[str]) -> str:
    lines = [
        f"flakehunt: {len(runs)} runs of `pytest {' '.join(pytest_args)}`".rstrip(),
        "",
        "| run | seed | load | minutes | load avg before | after | passed | failed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        lines.append(
            f"| {run.index} | {run.seed} | {run.load} | {run.duration_s / 60:.1f} "
            f"| {run.load_before} | {run.load_after} | {run.passed} | {len(run.failures)} |"
        )
    by_test: dict[str, list[int]] = {}
    for run in runs:
        for name in run.failures:
            by_test.setdefault(name, []).append(run.index)
    lines.append("")
    if not by_test:
        lines.append("no test failed in any run")
    for name, where in sorted(by_test.items()):
        lines.append(f"FAILED {name} in runs {where}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args, pytest_args = parse_args(sys.argv[1:] if argv is None else argv)
    # A SIGTERM unwinds like Ctrl-C: the busy loops and the suite are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    first_seed = args.seed if args.seed is not None else random.randrange(2**31)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="flakehunt-") as scratch:
        for index in range(1, args.runs + 1):
            run = Run(index=index, seed=first_seed + index - 1, load=load_of(args, index))
            print(f"flakehunt: run {index}/{args.runs}, seed {run.seed}, load {run.load}",
                  flush=True)  # fmt: skip
            run_suite(run, pytest_args, Path(scratch) / f"run-{index}.xml", args.run_timeout)
            runs.append(run)
            print(f"flakehunt: run {index} failed {len(run.failures)}: {run.failures}", flush=True)
    text = summary(runs, pytest_args)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(text)
    print(text, end="")
    return 1 if any(run.failures for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
