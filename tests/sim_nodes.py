"""The pieces of the replication simulation (``sim_cluster.py``): its configuration, a log
that loses what a crash loses, the nodes, and the rules of the shells that need no event
queue — re-enacted as the production code has them, the sans-I/O cores used directly.

* :func:`newer_leader` is ``failover.newer_leader`` over the reachable peers' Status (the
  epoch a node reports is the newest it knows: ``max(node.epoch, node.state.epoch)``).
* :func:`stale_leader` is ``Follower._check_not_stale``: a replica never follows a leader of
  an epoch below the one in its ``node.json``, nor a second leader under that epoch.
* :func:`common_point` is the CommonPoint search a replica (``Follower._reconcile``) and a
  promoted node (``failover.reconcile``) run against another log.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from boomscooter.errors import BatchDecodeError
from boomscooter.node.core import CommitTracker
from boomscooter.node.replication import CommonPoint, ReplicaSet
from boomscooter.storage.api import FsyncMode, LogConfig
from boomscooter.storage.batch import Batch
from boomscooter.storage.memory import MemoryLog

# Planted bugs. BUGS: the random search must catch each. REGRESSIONS: the fixed production
# bugs put back, each caught by its scenario in test_simulation.py.
BUGS = ("single-ack", "no-reconcile", "no-gather")
REGRESSIONS = (
    *("uncapped-commit", "stale-close", "extends-gather", "strict-newer", "no-stale-check"),
    *("follow-above", "running-only", "no-skip", "self-named", "unordered-saves"),
)
TICK_S = 0.1  # heartbeats, replica keepalives, in-sync expiry; fencing checks every 3rd
INSYNC_S = 0.4  # a replica silent this long leaves the in-sync set
FSYNC_S = 0.05  # fsync=interval: the syncer runs this long after an unsynced append
RETRY_S = (0.02, 0.05, 0.1, 0.2)  # the follower's backoff between sessions
HELLO_S = 0.1  # a Replicate session not answered by then has failed
STREAM_DEAD_S = (0.3, 1.0)  # how late a leader notices a stream that died during a cut
SAVE_S = (0.002, 0.02)  # a replica's node.json save, not awaited (Follower._adopt)
ACKS_LEADER = 0.25  # the share of produce calls with acks=leader (no quorum check)
LOG_CONFIG = LogConfig(segment_bytes=2048, segment_ms=None)
NOBODY = -1  # node.json's "leader": "" (not known)


class Violation(AssertionError): ...  # an invariant failed: the message names seed and step


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    replicas: int = 2
    min_insync: int = 2
    steps: int = 600  # events processed
    bug: str | None = None  # one of BUGS or REGRESSIONS
    expose_epoch_reuse: bool = False  # lift the operator's care for unique epochs
    chaos: bool = True  # random faults and operator actions (off: a test scripts them)


class UncappedTracker(CommitTracker):
    """The commit rule before the fix: the ``min_insync``-th highest copy, even above the
    leader's own durable seqno (planted bug ``uncapped-commit``)."""

    def _recompute(self) -> bool:
        if len(self._held) < self.min_insync:
            return False
        candidate = sorted(self._held.values(), reverse=True)[self.min_insync - 1]
        if candidate > self.commit_seqno:
            self.commit_seqno = candidate
            return True
        return False


def same(a: Batch | None, b: Batch | None) -> bool:
    return a is not None and b is not None and bytes(a.data) == bytes(b.data)


class CrashLog:  # a MemoryLog with a durable prefix, as the segmented log keeps one
    def __init__(self, mode: FsyncMode) -> None:
        self.mode, self.log = mode, MemoryLog(LOG_CONFIG, clock_ms=lambda: 0)
        self.durable = self.last = self.last_epoch = 0  # last, last_epoch: the log's, cached

    def _ended(self) -> None:
        self.last = self.log.last_seqno
        self.last_epoch = batch.epoch if (batch := self.batch_at(self.last)) else 0

    def held(self) -> int:  # Node.held_seqno: the node's vote (leader) or ack (replica)
        return self.last if self.mode is FsyncMode.NEVER else self.durable

    def position(self) -> tuple[int, int]:  # how up to date the log is (failover._gather)
        return self.last_epoch, self.last

    def append(self, batch: Batch) -> None:
        self.log.append_batch(batch)
        self.last, self.last_epoch = batch.last_seqno, batch.epoch
        if self.mode is FsyncMode.ALWAYS:
            self.durable = self.last

    def truncate_after(self, seqno: int) -> None:
        self.log.truncate_after(seqno)
        self._ended()  # SegmentedLog syncs a truncation unless fsync=never
        synced = self.mode is not FsyncMode.NEVER
        self.durable = self.last if synced else min(self.durable, self.last)

    def batch_at(self, seqno: int) -> Batch | None:
        ok = 1 <= seqno <= self.last
        return self.log.read_batches(seqno, to_seqno=seqno, max_bytes=1)[0] if ok else None

    def batches(self, first: int, last: int, max_bytes: int = 1 << 30) -> list[Batch]:
        return self.log.read_batches(first, to_seqno=last, max_bytes=max_bytes)

    def crash(self, rng: random.Random, power_loss: bool) -> tuple[int, bool]:
        """Lose what the crash loses; returns (records lost, whether a torn batch was cut)."""
        before, torn = self.last, False
        if power_loss and self.durable < self.last:
            batches = self.batches(1, self.last)  # keep the durable ones, and some more:
            kept = rng.randint(sum(b.last_seqno <= self.durable for b in batches), len(batches))
            if kept < len(batches) and rng.random() < 0.5:  # and a torn one, which recovery cuts
                data = bytes(batches[kept].data)
                try:
                    Batch.from_bytes(data[: rng.randrange(1, len(data))])
                    raise AssertionError("a torn batch passed validation")
                except BatchDecodeError:
                    torn = True
            self.log.truncate_after(batches[kept - 1].last_seqno if kept else 0)
            self._ended()
        self.durable = self.last  # recovery fsyncs what it kept
        return before - self.last, torn


@dataclass(slots=True)
class Session:  # a replica's Replicate session, the follower's side
    sid: int
    leader: int
    live: bool = False
    epoch: int = 0
    leader_inc: int = 0
    leader_last: int = 0
    fetch_until: float = -1.0
    pending: dict[int, Batch] = field(default_factory=dict)


class Node:
    def __init__(self, ident: int, mode: FsyncMode) -> None:
        self.id, self.name, self.mode, self.store = ident, f"n{ident}", mode, CrashLog(mode)
        self.up, self.inc, self.role, self.was = True, 0, "replica", "replica"
        self.epoch = 0  # node.epoch
        self.state_epoch, self.state_leader = 0, NOBODY  # node.state: node.json in memory
        self.saved = (0, NOBODY)  # node.json on disk: what a restart loads
        self.save_seq = self.saved_seq = 0  # state.next_version: the newest snapshot, written
        self.follow = self.leader_commit = 0  # a replica's leader (leader_address), its commit
        self.tracker = CommitTracker(1)
        self.replicas = ReplicaSet(self.tracker)
        self.streams: dict[tuple[str, int], int] = {}  # a leader's open Replicate streams
        self.session: Session | None = None
        self.refused: dict[int, int] = {}  # Follower._refused: stale leaders seen -> epoch
        self.failures, self.sync_due = 0, False
        self.checked = 0  # log[1..checked] was verified against the committed history

    def commit(self) -> int:  # as a replica: the leader's commit, capped at what it holds
        leading = self.role == "leader"
        return self.tracker.commit_seqno if leading else min(self.leader_commit, self.store.last)

    def status_epoch(self) -> int:  # what Status reports: the newest epoch the node knows
        return max(self.epoch, self.state_epoch)

    def status_leader(self) -> int:  # Status: the node itself when it leads, else whom it follows
        return self.id if self.role == "leader" else self.follow

    def status_role(self) -> str:
        """Status.role: a leader stepping down reports neither (ROLE_UNSPECIFIED); a node
        being promoted is still a replica there."""
        return "none" if self.role == "stepping-down" else self.role


def newer_leader(
    node: Node,
    peers: list[Node],
    *,
    or_same: bool = False,
    skip: frozenset[int] = frozenset(),
    strict: bool = False,
    running: bool = False,
    self_named: bool = False,
) -> tuple[int, int] | None:
    """failover.newer_leader: (leader, epoch) of the highest epoch the peers report, if
    above this node's, or equal to it when ``or_same`` (a replica looking for its leader), or
    when this node is no replica (leading, or a leader still starting) and the peer is a
    replica following another leader (an epoch taken twice: the followed one wins). Leaders
    in ``skip`` (refused as stale) are passed over, and so is a node naming itself without
    leading. ``strict``, ``running`` (the replica rule for a running leader only),
    ``self_named`` (a leader stepping down reported itself a replica of itself): the rules
    before the fixes (planted bugs)."""
    own = max(node.epoch, node.state_epoch)
    if strict:
        own = node.epoch if node.role == "leader" else own
        or_same = False
    best: tuple[int, int] | None = None
    for peer in sorted(peers, key=lambda p: p.name):  # survey: answers by address
        leader, epoch, role = peer.status_leader(), peer.status_epoch(), peer.status_role()
        if self_named and role == "none":
            leader, role = peer.id, "replica"
        if strict:
            epoch = peer.epoch
        if leader in (NOBODY, node.id) or leader in skip:
            continue
        if role != "leader" and leader == peer.id and not self_named:
            continue  # in transition, not a leader
        leading = node.role == "leader" if running else node.role != "replica"
        elsewhere = role == "replica" and leading and not strict
        # failover.newer_leader: a node still starting follows another leader of its epoch
        while_starting = peer.role == "leader" and node.role == "starting" and not strict
        if epoch < own or (epoch == own and not (or_same or elsewhere or while_starting)):
            continue
        if best is None or epoch > best[1]:
            best = (leader, epoch)
    return best


def stale_leader(node: Node, leader: int, epoch: int) -> bool:
    """Follower._check_not_stale: an epoch below the one saved, or a second leader of it."""
    known = node.state_epoch
    return epoch < known or (epoch == known and node.state_leader not in (NOBODY, leader))


def common_point(ours: CrashLog, theirs: CrashLog) -> int:
    """The last seqno up to which ``ours`` agrees with ``theirs`` (CommonPoint, floor 0)."""
    search = CommonPoint(ours.last, floor=0)
    while (seqno := search.probe()) is not None:
        batch = ours.batch_at(seqno)
        assert batch is not None
        if same(batch, theirs.batch_at(seqno)):
            search.matched(batch.last_seqno)
        else:
            search.differs(batch.base_seqno)
    return search.result
