"""The mutation check: remove the production rules one at a time and show that a test fails
for each.

Every mutation below replaces one rule of the node (in ``boomscooter/``) with its absence
or its old, wrong form — a textual edit of a copy of the repository, the real code never
touched. For each, the tests that guard the node's rules (the simulation, which runs the
production :class:`~boomscooter.node.machine.NodeMachine`, and the unit tests of the
machine, the stream receiver and the bookkeeping cores) run against the mutated copy and
must fail. A mutation they do not notice fails the check: a rule nothing tests. A
mutation whose text is no longer in the code fails it too (the list follows the code).

    python scripts/mutate.py            # every mutation (make mutate; CI runs it)
    python scripts/mutate.py fencing    # one, by name
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = [
    "tests/test_node_machine.py",
    "tests/test_simulation.py",
    "tests/test_stream.py",
    "tests/test_node_core.py",
    "tests/test_replication_core.py",
]


@dataclass(frozen=True)
class Mutation:
    name: str
    rule: str
    path: str
    original: str
    mutated: str


MUTATIONS = [
    Mutation(
        "fencing",
        "a leader that hears of a newer leader steps down (its periodic check)",
        "boomscooter/node/machine.py",
        "if purpose is Purpose.FENCE and self.is_leader:\n"
        "            found = rules.newer_leader(self.view(), answers)",
        "if purpose is Purpose.FENCE and self.is_leader:\n            found = None",
    ),
    Mutation(
        "same-epoch-leaders",
        "a second leader of an epoch yields to the one the replicas follow",
        "boomscooter/node/rules.py",
        "same_counts = or_same or replica_elsewhere or leader_while_starting",
        "same_counts = or_same",
    ),
    Mutation(
        "step-down-save",
        "a fenced leader records the new epoch and its leader before following (own epoch too)",
        "boomscooter/node/rules.py",
        "return bool(epoch) and epoch >= known_epoch",
        "return bool(epoch) and epoch > known_epoch",
    ),
    Mutation(
        "commit-cap",
        "the commit never passes the leader's own durable copy",
        "boomscooter/node/core.py",
        "candidate = min(candidate, self._held.get(LEADER_COPY, 0))",
        "candidate = candidate",
    ),
    Mutation(
        "reconcile-before-commit",
        "a replica counts its leader's commit only once its log was reconciled",
        "boomscooter/node/machine.py",
        "if not self.session_live or commit <= self.leader_commit:",
        "if commit <= self.leader_commit:",
    ),
    Mutation(
        "gather",
        "a promoted replica gathers the most up-to-date log before it leads",
        "boomscooter/node/machine.py",
        "source = rules.gather_source(ours, answers)",
        "source = None",
    ),
    Mutation(
        "fence-before-gather",
        "a promotion's fence stops the old epoch: a fenced leader or replica leaves it",
        "boomscooter/node/rules.py",
        "return epoch > known_epoch or (epoch == known_epoch and known_leader == claimant)",
        "return False",
    ),
    Mutation(
        "promotion-quorum",
        "a promotion hears from enough replicas to meet every quorum the old leader used",
        "boomscooter/node/rules.py",
        "return max(1, replicas - min_insync + 2)",
        "return 1",
    ),
    Mutation(
        "ordered-saves",
        "an older node.json snapshot never lands after a newer one",
        "boomscooter/node/rules.py",
        "return version > written",
        "return True",
    ),
    Mutation(
        "older-epoch-pages",
        "pages of an older epoch are dropped",
        "boomscooter/stream/receiver.py",
        "if epoch < self.epoch:",
        "if False:",
    ),
    Mutation(
        "not-leader-first",
        "a node that does not lead answers NOT_LEADER before any quorum check",
        "boomscooter/node/machine.py",
        "        if not self.is_leader:\n"
        "            raise self.not_leader()\n"
        "        if quorum:\n"
        "            copies = self.replicas.in_sync_copies()\n"
        "            if copies < self.tracker.min_insync:\n"
        "                raise ServerUnavailableError(\n"
        '                    f"acks=quorum needs {self.tracker.min_insync} in-sync copies, "\n'
        '                    f"{copies} available"\n'
        "                )\n",
        "        if quorum:\n"
        "            copies = self.replicas.in_sync_copies()\n"
        "            if copies < self.tracker.min_insync:\n"
        "                raise ServerUnavailableError(\n"
        '                    f"acks=quorum needs {self.tracker.min_insync} in-sync copies, "\n'
        '                    f"{copies} available"\n'
        "                )\n"
        "        if not self.is_leader:\n"
        "            raise self.not_leader()\n",
    ),
    Mutation(
        "stale-leader",
        "a replica never follows an older epoch, nor a second leader of its epoch",
        "boomscooter/node/rules.py",
        "return epoch < known_epoch or (",
        "return False and (",
    ),
    Mutation(
        "stale-close",
        "the close of an older session leaves the replica's live one counted",
        "boomscooter/node/replicas.py",
        "if state is None or (session is not None and session != state.sessions):",
        "if state is None:",
    ),
    Mutation(
        "skip-refused",
        "a replica looking for its leader passes over leaders it refused as stale",
        "boomscooter/node/machine.py",
        "skip = frozenset(a for a, e in self.refused.items() if e <= known)",
        "skip: frozenset[str] = frozenset()",
    ),
    Mutation(
        "ack-cap",
        "a replica's ack never counts past the leader's own log",
        "boomscooter/node/rules.py",
        "return min(durable_seqno, leader_last_seqno)",
        "return durable_seqno",
    ),
    Mutation(
        "stale-replica",
        "a leader refuses a replica whose log holds a newer epoch",
        "boomscooter/node/rules.py",
        "return replica_last_epoch > epoch",
        "return False",
    ),
]


def tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return [line for line in out.splitlines() if (REPO / line).is_file()]


def copy_repo(into: Path, files: list[str]) -> None:
    for name in files:
        if not (REPO / name).is_file():  # deleted meanwhile (an edit under way)
            continue
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)


def run_tests(root: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly",
            "-p", "no:cacheprovider", *TESTS]  # fmt: skip
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, check=False)


def check(mutation: Mutation, files: list[str]) -> str:
    """'caught' (a test failed), else what went wrong."""
    source = (REPO / mutation.path).read_text()
    if source.count(mutation.original) != 1:
        return (
            f"not applied: its text is {source.count(mutation.original)} times in {mutation.path}"
        )
    with tempfile.TemporaryDirectory(prefix="mutate-") as scratch:
        root = Path(scratch)
        copy_repo(root, files)
        (root / mutation.path).write_text(source.replace(mutation.original, mutation.mutated))
        done = run_tests(root)
    if done.returncode == 1:
        return "caught"
    if done.returncode == 0:
        return "NOT CAUGHT: every test passed without the rule"
    return f"broken (pytest exited {done.returncode}): {done.stdout[-500:]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    if not chosen:
        parser.error(f"no such mutation; known: {', '.join(m.name for m in MUTATIONS)}")
    files = tracked_files()
    with tempfile.TemporaryDirectory(prefix="mutate-") as scratch:
        copy_repo(Path(scratch), files)
        baseline = run_tests(Path(scratch))
    if baseline.returncode != 0:
        print(f"mutate: the tests fail without a mutation:\n{baseline.stdout[-2000:]}")
        return 1
    failures = 0
    for mutation in chosen:
        began = time.monotonic()
        outcome = check(mutation, files)
        failures += outcome != "caught"
        print(f"mutate: {mutation.name:<24} {outcome} ({time.monotonic() - began:.0f} s) "
              f"— {mutation.rule}", flush=True)  # fmt: skip
    print(f"mutate: {len(chosen) - failures} of {len(chosen)} removed rules caught")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
