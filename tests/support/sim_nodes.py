"""The pieces of the replication simulation (``sim_cluster.py``): its configuration, a log
that loses what a crash loses, a simulated node around the production
:class:`~boomscooter.node.machine.NodeMachine`, and the planted bugs.

The simulation runs the production rules: every node's decisions are its ``NodeMachine``'s
(and :mod:`boomscooter.node.rules`, ``CommitTracker``, ``ReplicaSet``, ``CommonPoint``); the
simulation only carries out the machine's commands — the runtime's part — on a fake network
and a crashable log. A planted bug replaces a production rule for the run (:func:`planted`),
never a copy of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import random
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from boomscooter.errors import BatchDecodeError
from boomscooter.node import core, machine, replicas, rules
from boomscooter.node.machine import MachineConfig, NodeMachine
from boomscooter.node.rules import PeerRole, PeerStatus, SelfView
from boomscooter.node.state import NodeState
from boomscooter.storage.api import FsyncMode, LogConfig
from boomscooter.storage.batch import Batch
from boomscooter.storage.memory import MemoryLog

# Planted bugs. BUGS: the random search must catch each. REGRESSIONS: the fixed production
# bugs put back, each caught by its scenario in test_simulation.py.
BUGS = ("single-ack", "no-reconcile", "no-gather")
REGRESSIONS = (
    *("uncapped-commit", "stale-close", "extends-gather", "strict-newer", "no-stale-check"),
    *("follow-above", "running-only", "no-skip", "self-named", "unordered-saves"),
    *("fence-ignored", "lone-promotion"),
)
TICK_S = 0.1  # heartbeats, replica keepalives, the machine's ticks
WATCH_S = 0.3  # the leader's fencing check (MachineConfig.watch_interval_s)
INSYNC_S = 0.4  # a replica silent this long leaves the in-sync set
FSYNC_S = 0.05  # fsync=interval: the syncer runs this long after an unsynced append
RETRY_S = (0.02, 0.05, 0.1, 0.2)  # a replica's pauses between failed sessions
HELLO_S = 0.1  # a Replicate session not answered by then has failed
SURVEY_S = (0.002, 0.02)  # asking the peers for their Status (answers lost with messages)
STREAM_DEAD_S = (0.3, 1.0)  # how late a leader notices a stream that died during a cut
SAVE_S = (0.002, 0.02)  # a node.json save
ACKS_LEADER = 0.25  # the share of produce calls with acks=leader (no quorum check)
LOG_CONFIG = LogConfig(segment_bytes=2048, segment_ms=None)


class Violation(AssertionError): ...  # an invariant failed: the message names seed and step


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    replicas: int = 2
    min_insync: int = 2
    steps: int = 600  # events processed
    bug: str | None = None  # one of BUGS or REGRESSIONS
    expose_epoch_reuse: bool = False  # lift the operator's care for unique epochs
    chaos: bool = True  # random faults and operator actions (off: a test scripts them)


def same(a: Batch | None, b: Batch | None) -> bool:
    return a is not None and b is not None and bytes(a.data) == bytes(b.data)


class CrashLog:  # a MemoryLog with a durable prefix, as the segmented log keeps one
    """The node's log: the machine reads its position (``LogView``), the simulation
    appends, truncates and crashes it."""

    first_seqno = 1

    def __init__(self, mode: FsyncMode) -> None:
        self.mode, self.log = mode, MemoryLog(LOG_CONFIG, clock_ms=lambda: 0)
        self.durable = self.last = self.last_epoch = 0  # last, last_epoch: the log's, cached

    @property
    def last_seqno(self) -> int:
        return self.last

    @property
    def durable_seqno(self) -> int:
        return self.durable

    def _ended(self) -> None:
        self.last = self.log.last_seqno
        self.last_epoch = self.log.last_epoch

    def held(self) -> int:  # the node's vote (leader) or ack (replica)
        return rules.held_seqno(
            fsync_never=self.mode is FsyncMode.NEVER, last_seqno=self.last,
            durable_seqno=self.durable,
        )  # fmt: skip

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


def name_of(index: int) -> str:
    return f"n{index}"


def index_of(address: str) -> int:
    return int(address[1:]) if address.startswith("n") else NOBODY


NOBODY = -1  # no leader known ("" in the machine)


class Node:
    """A simulated node: its machine (a new one at each start), its log, what its disk
    holds of ``node.json``, and the runtime's bits the simulation keeps (sessions)."""

    def __init__(self, ident: int, mode: FsyncMode, config: SimConfig) -> None:
        self.id, self.name, self.mode, self.store = ident, name_of(ident), mode, CrashLog(mode)
        self.config = config
        self.up, self.inc, self.was = True, 0, "replica"
        self.saved = NodeState()  # node.json on disk: what a restart loads
        self.saved_version = 0
        self.leader_flag: int | None = None  # the command line's --leader (None: a leader)
        self.versions = itertools.count(1).__next__  # numbers its node.json snapshots
        self.machine = self.new_machine()
        self.streams: dict[tuple[str, int], int] = {}  # a leader's open Replicate streams
        self.session: Session | None = None
        self.sync_due = False
        self.checked = 0  # log[1..checked] was verified against the committed history
        self.promotion: machine.PromotionDone | None = None

    def new_machine(self) -> NodeMachine:
        """The machine a start gets: node.json as the disk holds it, the command line."""
        state = NodeState(self.saved.epoch, list(self.saved.peers), self.saved.leader)
        follow = None if self.leader_flag is None else name_of(self.leader_flag)
        config = MachineConfig(
            min_insync=self.config.min_insync,
            insync_timeout_s=INSYNC_S,
            fsync_never=self.mode is FsyncMode.NEVER,
            follow=follow,
            watch_interval_s=WATCH_S,
            retry_s=RETRY_S,
        )
        return NodeMachine(config, self.store, state, address=self.name, versions=self.versions)

    # What the scenarios read (the machine's state, by node index).
    @property
    def role(self) -> str:
        return self.machine.role.value if self.up else "down"

    @property
    def epoch(self) -> int:
        return self.machine.epoch

    @property
    def follow(self) -> int:
        return index_of(self.machine.leader_address)

    @property
    def state_epoch(self) -> int:
        return self.machine.state.epoch

    @property
    def state_leader(self) -> int:
        return index_of(self.machine.state.leader)

    @property
    def saved_pair(self) -> tuple[int, int]:
        return self.saved.epoch, index_of(self.saved.leader)

    @property
    def tracker(self) -> core.CommitTracker:
        return self.machine.tracker

    @property
    def replicas(self) -> replicas.ReplicaSet:
        return self.machine.replicas

    def status_epoch(self) -> int:
        return self.machine.known_epoch()

    def commit(self) -> int:
        return self.machine.commit_seqno


def common_point(ours: CrashLog, theirs: CrashLog) -> int:
    """The last seqno up to which ``ours`` agrees with ``theirs``: the production search
    (CommonPoint, floor 0) comparing the batches both hold, as peers.reconcile does."""
    search = replicas.CommonPoint(ours.last, floor=0)
    while (seqno := search.probe()) is not None:
        batch = ours.batch_at(seqno)
        assert batch is not None
        if same(batch, theirs.batch_at(seqno)):
            search.matched(batch.last_seqno)
        else:
            search.differs(batch.base_seqno)
    return search.result


def gather_point(ours: CrashLog, theirs: CrashLog) -> int:
    """Where a promoted node's gather cuts its log before copying (peers.gather reconciles
    first: the common point)."""
    return common_point(ours, theirs)


# -- planted bugs: production rules replaced for a run -----------------------------------------


class _SingleAck(core.CommitTracker):
    """The leader commits on its own copy, whatever ``min_insync`` says (``single-ack``)."""

    def __init__(self, min_insync: int, *, commit_seqno: int = 0) -> None:
        super().__init__(1, commit_seqno=commit_seqno)


class _AgreeingPoint(replicas.CommonPoint):
    """A reconciliation that finds the logs agreeing everywhere (``no-reconcile``)."""

    def probe(self) -> int | None:
        self.low = self._last
        return None


def _uncapped(self: core.CommitTracker) -> bool:
    """The commit rule before the fix: the ``min_insync``-th highest copy, even above the
    leader's own durable seqno (``uncapped-commit``)."""
    held = self._held
    if len(held) < self.min_insync:
        return False
    candidate = sorted(held.values(), reverse=True)[self.min_insync - 1]
    if candidate > self.commit_seqno:
        self.commit_seqno = candidate
        return True
    return False


def _disconnect_any_session(
    self: replicas.ReplicaSet, replica_id: str, session: int | None = None
) -> None:
    """The close of any session disconnects the replica (``stale-close``)."""
    _ORIGINAL_DISCONNECTED(self, replica_id, None)


_ORIGINAL_DISCONNECTED = replicas.ReplicaSet.disconnected
_ORIGINAL_NEWER_LEADER = rules.newer_leader
_ORIGINAL_STATUS = NodeMachine.status


def _longest_log(ours: tuple[int, int], answers: Mapping[str, PeerStatus]) -> Any:
    """The gather before the fix (``extends-gather``): from the longest log, by length
    alone, copying only what extends ours (no reconciliation first: a stale tail stays and
    nothing of the newer epoch continues it)."""
    best = max(answers.items(), key=lambda item: (item[1].last_seqno, item[0]), default=None)
    if best is None or best[1].last_seqno <= ours[1]:
        return None
    return best


def _strictly_newer(me: SelfView, answers: Mapping[str, PeerStatus], **_: Any) -> Any:
    """Only a strictly newer epoch counts (``strict-newer``)."""
    best = None
    for address in sorted(answers):
        status = answers[address]
        leader = address if status.role is PeerRole.LEADER else status.leader_address
        if not leader or leader == me.address or status.epoch <= me.epoch:
            continue
        if status.role is not PeerRole.LEADER and leader == address:
            continue
        if best is None or status.epoch > best[1]:
            best = (leader, status.epoch)
    return best


def _running_only(me: SelfView, answers: Mapping[str, PeerStatus], **kw: Any) -> Any:
    """A replica following another leader of the node's epoch counts only for a running
    leader, not for one still starting (``running-only``)."""
    if not me.starting:
        return _ORIGINAL_NEWER_LEADER(me, answers, **kw)
    demoted = {
        a: s for a, s in answers.items() if not (s.role is PeerRole.REPLICA and s.epoch == me.epoch)
    }
    return _ORIGINAL_NEWER_LEADER(me, demoted, **kw)


def _no_skip(me: SelfView, answers: Mapping[str, PeerStatus], **kw: Any) -> Any:
    """Leaders refused as stale are not passed over (``no-skip``)."""
    kw["skip"] = frozenset()
    return _ORIGINAL_NEWER_LEADER(me, answers, **kw)


def _self_named_status(self: NodeMachine) -> PeerStatus:
    """A node stepping down reports itself a replica of itself (``self-named``)."""
    status = _ORIGINAL_STATUS(self)
    if self.role is machine.Role.STEPPING_DOWN:
        return dataclasses.replace(status, role=PeerRole.REPLICA, leader_address=self.address)
    return status


def _self_named_newer(
    me: SelfView,
    answers: Mapping[str, PeerStatus],
    *,
    or_same: bool = False,
    skip: frozenset[str] = frozenset(),
) -> Any:
    """…and the rule without its skip of a node naming itself (``self-named``): such a
    "replica" following another leader of the asking leader's epoch fences it."""
    best = None
    for address in sorted(answers):
        status = answers[address]
        leader = address if status.role is PeerRole.LEADER else status.leader_address
        if not leader or leader == me.address or leader in skip:
            continue
        elsewhere = status.role is PeerRole.REPLICA and not me.replica
        starting = status.role is PeerRole.LEADER and me.starting
        if status.epoch < me.epoch or (
            status.epoch == me.epoch and not (or_same or elsewhere or starting)
        ):
            continue
        if best is None or status.epoch > best[1]:
            best = (leader, status.epoch)
    return best


PLANTS: dict[str, list[tuple[object, str, object]]] = {
    "single-ack": [(machine, "CommitTracker", _SingleAck)],
    "no-reconcile": [(replicas, "CommonPoint", _AgreeingPoint)],
    "no-gather": [(rules, "gather_source", lambda ours, answers: None)],
    "uncapped-commit": [(core.CommitTracker, "_recompute", _uncapped)],
    "stale-close": [(replicas.ReplicaSet, "disconnected", _disconnect_any_session)],
    "extends-gather": [
        (rules, "gather_source", _longest_log),
        (sys.modules[__name__], "gather_point", lambda ours, theirs: ours.last),
    ],
    "strict-newer": [(rules, "newer_leader", _strictly_newer)],
    "no-stale-check": [(rules, "stale_leader", lambda *args: False)],
    "follow-above": [(rules, "saves_fencing_epoch", lambda epoch, known: epoch > known)],
    "running-only": [(rules, "newer_leader", _running_only)],
    "no-skip": [(rules, "newer_leader", _no_skip)],
    "self-named": [
        (NodeMachine, "status", _self_named_status),
        (rules, "newer_leader", _self_named_newer),
    ],
    "unordered-saves": [(rules, "newer_snapshot", lambda version, written: True)],
    "fence-ignored": [(rules, "accepts_fence", lambda *args: False)],
    "lone-promotion": [(rules, "promotion_quorum", lambda replicas, min_insync: 1)],
}
assert set(PLANTS) == {*BUGS, *REGRESSIONS}

_depth = 0


@contextlib.contextmanager
def planted(bug: str | None) -> Iterator[None]:
    """Replace the production rules ``bug`` names for the block (re-entrant)."""
    global _depth
    patches = PLANTS[bug] if bug is not None and _depth == 0 else []
    saved = [(target, name, getattr(target, name)) for target, name, _ in patches]
    for target, name, value in patches:
        setattr(target, name, value)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        for target, name, value in reversed(saved):
            setattr(target, name, value)
