"""The replication cores (sans-I/O): the in-sync set and the common-point search."""

from __future__ import annotations

import bisect
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from boomscooter.node.core import CommitTracker
from boomscooter.node.replicas import CommonPoint, ReplicaSet
from boomscooter.node.state import NodeState, load_state, next_version, save_state

# -- ReplicaSet --------------------------------------------------------------------------------


def test_acks_count_in_the_commit_only_from_connected_replicas() -> None:
    tracker = CommitTracker(2)
    replicas = ReplicaSet(tracker, insync_timeout_s=5)
    tracker.held("", 100)
    assert tracker.commit_seqno == 0
    replicas.connected("r1", "h:1", now=0.0)
    assert replicas.in_sync_copies() == 1  # the opening message is not an ack
    assert replicas.ack("r1", durable_seqno=60, last_seqno=80, last_epoch=1, now=0.1)
    assert tracker.commit_seqno == 60 and replicas.in_sync_copies() == 2
    replicas.disconnected("r1")
    assert replicas.in_sync_copies() == 1
    # An ack from a replica that is gone (a late message) changes nothing.
    assert not replicas.ack("r1", durable_seqno=100, last_seqno=100, last_epoch=1, now=0.2)
    assert tracker.commit_seqno == 60


def test_a_silent_replica_leaves_the_in_sync_set_and_returns_with_its_next_ack() -> None:
    tracker = CommitTracker(3)
    replicas = ReplicaSet(tracker, insync_timeout_s=1.0)
    tracker.held("", 50)
    for name in ("r1", "r2"):
        replicas.connected(name, f"{name}:1", now=0.0)
        replicas.ack(name, durable_seqno=10, last_seqno=10, last_epoch=1, now=0.0)
    assert tracker.commit_seqno == 10 and replicas.in_sync_copies() == 3
    replicas.ack("r1", durable_seqno=20, last_seqno=20, last_epoch=1, now=0.9)
    assert replicas.expire(1.5) == ["r2"]
    assert replicas.in_sync_copies() == 2 and tracker.copies() == 2
    assert replicas.expire(1.6) == []  # reported once
    # r2's own ack (r1 holds 20 too) brings it back and advances the commit at once.
    assert replicas.ack("r2", durable_seqno=30, last_seqno=30, last_epoch=1, now=1.7)
    assert tracker.commit_seqno == 20 and replicas.in_sync_copies() == 3


def test_addresses_exclude_the_asker_and_repeat_nothing() -> None:
    replicas = ReplicaSet(CommitTracker(1))
    replicas.connected("a", "h:1", now=0)
    replicas.connected("b", "h:2", now=0)
    replicas.connected("c", "h:2", now=0)  # a restarted replica under a new name
    assert replicas.addresses() == ["h:1", "h:2"]
    assert replicas.addresses(excluding="h:1") == ["h:2"]


# -- CommonPoint -------------------------------------------------------------------------------

Log = list[tuple[int, int, str]]  # (base seqno, last seqno, content)


def _log(sizes: list[int], contents: list[str], start: int = 1) -> Log:
    out, base = [], start
    for size, content in zip(sizes, contents, strict=True):
        out.append((base, base + size - 1, content))
        base += size
    return out


def _holding(log: Log, seqno: int) -> tuple[int, int, str] | None:
    i = bisect.bisect_right([b for b, _, _ in log], seqno) - 1
    return log[i] if i >= 0 and log[i][1] >= seqno else None


def _search(ours: Log, theirs: Log, floor: int = 0) -> tuple[int, int]:
    search = CommonPoint(ours[-1][1] if ours else 0, floor=floor)
    while (seqno := search.probe()) is not None:
        mine = _holding(ours, seqno)
        assert mine is not None, f"probed {seqno}, which our log does not hold"
        if _holding(theirs, seqno) == mine:
            search.matched(mine[1])
        else:
            search.differs(mine[0])
    return search.result, search.probes


def _brute(ours: Log, theirs: Log) -> int:
    common = 0
    for batch in ours:
        if _holding(theirs, batch[0]) != batch:
            break
        common = batch[1]
    return common


@pytest.mark.parametrize(
    ("ours", "theirs", "expected", "max_probes"),
    [
        ([], _log([5], ["a"]), 0, 0),  # an empty replica agrees trivially
        (_log([5, 5], ["a", "b"]), _log([5, 5, 5], ["a", "b", "c"]), 10, 1),  # behind: 1 probe
        (_log([5, 5], ["a", "b"]), _log([5, 5], ["a", "b"]), 10, 1),
        (_log([5, 5, 5], ["a", "b", "x"]), _log([5, 5], ["a", "b"]), 10, 2),  # ahead
        (_log([5, 5, 3], ["a", "b", "x"]), _log([5, 5, 7], ["a", "b", "y"]), 10, 2),
        (_log([5, 5], ["x", "y"]), _log([5, 5], ["a", "b"]), 0, 3),  # nothing in common
        (_log([4, 4], ["a", "x"]), _log([4, 6], ["a", "b"]), 4, 2),  # boundaries differ
    ],
)
def test_common_point_cases(ours: Log, theirs: Log, expected: int, max_probes: int) -> None:
    result, probes = _search(ours, theirs)
    assert result == expected == _brute(ours, theirs)
    assert probes <= max_probes


@given(
    shared=st.lists(st.integers(1, 5), max_size=30),
    ours_tail=st.lists(st.integers(1, 5), max_size=30),
    theirs_tail=st.lists(st.integers(1, 5), max_size=30),
)
def test_common_point_finds_the_shared_prefix(
    shared: list[int], ours_tail: list[int], theirs_tail: list[int]
) -> None:
    prefix = _log(shared, [f"s{i}" for i in range(len(shared))])
    start = prefix[-1][1] + 1 if prefix else 1
    ours = prefix + _log(ours_tail, [f"o{i}" for i in range(len(ours_tail))], start)
    theirs = prefix + _log(theirs_tail, [f"t{i}" for i in range(len(theirs_tail))], start)
    result, probes = _search(ours, theirs)
    assert result == _brute(ours, theirs)
    assert probes <= 2 * max(1, len(ours)).bit_length() + 2  # logarithmic


def test_common_point_respects_the_floor() -> None:
    """Below the floor (records the leader deleted by retention) nothing is compared."""
    ours = _log([5, 5, 5], ["a", "b", "x"])
    theirs = _log([5, 5, 5], ["gone", "b", "c"])  # batch 1 differs but is below the floor
    assert _search(ours, theirs, floor=5)[0] == 10


def test_common_point_refuses_logs_that_are_not_prefix_consistent() -> None:
    search = CommonPoint(20)
    assert search.probe() == 20
    search.differs(16)
    probe = search.probe()
    assert probe is not None and probe < 16
    search.matched(12)
    with pytest.raises(ValueError, match="not a prefix"):
        search.matched(18)


def test_common_point_is_deterministic_for_a_seeded_random_history() -> None:
    rng = random.Random(7)
    sizes = [rng.randint(1, 100) for _ in range(2000)]
    ours = _log(sizes, [f"b{i}" for i in range(2000)])
    theirs = ours[:1500] + _log([50], ["new"], ours[1500][0])
    result, probes = _search(ours, theirs)
    assert result == ours[1499][1] and probes <= 30


def test_node_state_saves_never_land_older_over_newer(tmp_path: Path) -> None:
    """Saves run on executor threads and may finish out of order: a snapshot made before a
    fencing (epoch 1) must not overwrite the fenced node's newer one (epoch 2)."""
    old, new = next_version(), next_version()
    save_state(str(tmp_path), NodeState(2, ["b:1"], "b:1"), new)
    save_state(str(tmp_path), NodeState(1, ["b:1"], "a:1"), old)
    assert load_state(str(tmp_path)) == NodeState(2, ["b:1"], "b:1")
    # A node restarted in the same process numbers its saves after every earlier one.
    save_state(str(tmp_path), NodeState(3, [], "a:1"), next_version())
    assert load_state(str(tmp_path)).epoch == 3
    assert not [p for p in tmp_path.iterdir() if p.name != "node.json"]  # no temp file left
