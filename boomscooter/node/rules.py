"""The rules of a node, as pure functions: who leads, whom to follow, what counts.

Every decision the node makes about roles, epochs and commits that is not bookkeeping (the
commit rule itself is :class:`~boomscooter.node.core.CommitTracker`, the in-sync set
:class:`~boomscooter.node.replicas.ReplicaSet`) is a function here, called by
:class:`~boomscooter.node.machine.NodeMachine` through this module — so a test or the
mutation check (``scripts/mutate.py``) can replace one rule and see what breaks. No I/O,
no clock: the facts come in as arguments.

Epochs. Every leader incarnation writes under an epoch no earlier writer used: a starting
leader takes its own epoch + 1, a promoted replica one above every epoch it has seen or
heard of. A node never follows a leader of an older epoch than it knows, nor a second
leader under the epoch it knows (an epoch taken twice); a leader that hears of a leader
with a newer epoch steps down and follows it (fencing).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


class PeerRole(enum.Enum):
    """What a peer's Status says it is (``NONE``: starting, stepping down or stopped)."""

    LEADER = "leader"
    REPLICA = "replica"
    NONE = "none"


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerStatus:
    """A peer's answer to Status, as the rules need it (no protobuf here)."""

    role: PeerRole
    epoch: int  # the newest epoch the peer knows
    leader_address: str  # whom it follows ("" unknown); a leader names itself
    first_seqno: int = 1
    last_seqno: int = 0
    last_epoch: int = 0  # the epoch of the last batch it stores


@dataclass(frozen=True, slots=True, kw_only=True)
class SelfView:
    """What the asking node knows of itself."""

    address: str
    epoch: int  # max(the epoch it leads or follows, the epoch in its node.json)
    replica: bool  # following a leader (not leading, not starting)
    starting: bool  # a leader still starting (it has not taken its epoch yet)


RETRY_S = (0.1, 0.2, 0.5, 1.0, 2.0)  # a replica's pause between failed sessions


def newer_leader(
    me: SelfView,
    answers: Mapping[str, PeerStatus],
    *,
    or_same: bool = False,
    skip: frozenset[str] = frozenset(),
) -> tuple[str, int] | None:
    """``(leader address, epoch)`` of the leader with the highest epoch the peers report,
    if it is above ``me.epoch`` — or equal to it when ``or_same`` (a replica looking for
    its leader); None when there is none.

    A replica that follows *another* leader at ``me``'s own epoch counts for a node that
    is not a replica (two leaders under one epoch: the one the replicas follow is the one
    that can commit), and so does a leader of that epoch for a node still starting (it
    follows rather than take the next epoch from a log that may lack what that one
    committed). Leaders in ``skip`` (refused as stale) and nodes naming themselves without
    leading (in transition) are passed over — except, for a node still starting, one that
    claimed a newer epoch (a node being promoted)."""
    best: tuple[str, int] | None = None
    for address in sorted(answers):
        status = answers[address]
        leader = address if status.role is PeerRole.LEADER else status.leader_address
        if not leader or leader == me.address or leader in skip:
            continue
        # A node naming itself without leading is in transition, not a leader — but one
        # that claimed a newer epoch is being promoted: a starting node follows it rather
        # than take an epoch of its own (maybe the claimed one).
        claimant = me.starting and status.epoch > me.epoch
        if status.role is not PeerRole.LEADER and leader == address and not claimant:
            continue
        replica_elsewhere = status.role is PeerRole.REPLICA and not me.replica
        leader_while_starting = status.role is PeerRole.LEADER and me.starting
        same_counts = or_same or replica_elsewhere or leader_while_starting
        if status.epoch < me.epoch or (status.epoch == me.epoch and not same_counts):
            continue
        if best is None or status.epoch > best[1]:
            best = (leader, status.epoch)
    return best


def stale_leader(known_epoch: int, known_leader: str, address: str, epoch: int) -> bool:
    """A leader a node must not follow: its epoch is older than the one the node knows
    (``node.json``), or it is a second leader under that epoch."""
    return epoch < known_epoch or (
        epoch == known_epoch and bool(known_leader) and known_leader != address
    )


def replica_refused(replica_last_epoch: int, epoch: int) -> bool:
    """A leader refuses a replica whose log holds a newer epoch than it leads: the leader
    is the stale one."""
    return replica_last_epoch > epoch


def start_epoch(own_epoch: int) -> int:
    """The epoch a starting leader takes (it found no newer leader)."""
    return own_epoch + 1


def promotion_epoch(epochs: Iterable[int]) -> int:
    """The epoch a promoted replica takes: above every epoch it has seen or heard of."""
    return max(epochs) + 1


def accepts_fence(epoch: int, claimant: str, known_epoch: int, known_leader: str) -> bool:
    """A node told that ``claimant`` (being promoted) claimed ``epoch`` takes part in no
    older epoch from then on — unless it knows a newer epoch, or this one claimed by
    another node (then its Status tells the claimant, whose promotion fails)."""
    return epoch > known_epoch or (epoch == known_epoch and known_leader == claimant)


def fence_rival(claimed: int, me: str, answers: Mapping[str, PeerStatus]) -> str | None:
    """A fenced peer reporting an epoch above the one this promotion claimed, or that epoch
    led by another node: a concurrent promotion won (the first such peer), else None."""
    for address in sorted(answers):
        status = answers[address]
        if status.epoch > claimed or (
            status.epoch == claimed and status.leader_address not in ("", me)
        ):
            return address
    return None


def old_epoch_stopped(
    fenced: set[str], old_leader: str, replicas: set[str], min_insync: int
) -> bool:
    """After a promotion's fence, can the old epoch commit nothing more? Yes when its leader
    was fenced (it stopped leading before it reported what it holds), or when too few of
    its replicas are left unfenced to make up ``min_insync`` with its own copy (the node
    being promoted left it already). Otherwise an old leader that is only cut off from the
    promoted node may still commit with the replicas it reaches."""
    if old_leader and old_leader in fenced:
        return True
    return len(replicas - fenced) < min_insync - 1


def promotion_quorum(replicas: int, min_insync: int) -> int:
    """How many of the old leader's ``replicas`` (the node being promoted included) must
    answer a promotion whose old leader does not: enough to meet every ``min_insync - 1``
    of them, where each record the old leader committed is besides its own copy. 1 under
    ``min_insync`` 1: the leader's copy alone committed, and no promotion can promise that."""
    if min_insync <= 1:
        return 1
    return max(1, replicas - min_insync + 2)


def saves_fencing_epoch(epoch: int, known_epoch: int) -> bool:
    """A node told to follow the leader of ``epoch`` records that epoch (and that leader)
    in ``node.json`` before it follows — its own epoch too: a deposed leader of the same
    epoch must know whom that epoch belongs to."""
    return bool(epoch) and epoch >= known_epoch


def start_commit(min_insync: int, last_seqno: int) -> int:
    """The commit seqno a starting leader assumes: its whole (durable) log when its own
    copy suffices; otherwise nothing, rather than commit records no quorum ever held."""
    return last_seqno if min_insync == 1 else 0


def held_seqno(*, fsync_never: bool, last_seqno: int, durable_seqno: int) -> int:
    """A node's vote in the commit rule (leader) or its ack (replica): its durable seqno,
    or every appended record under ``fsync=never``, which promises nothing more."""
    return last_seqno if fsync_never else durable_seqno


def counted_ack(durable_seqno: int, leader_last_seqno: int) -> int:
    """A replica's ack as the commit rule counts it: never past the leader's own log (a
    replica claiming more holds nothing the leader sequenced)."""
    return min(durable_seqno, leader_last_seqno)


def replica_commit(leader_commit: int, last_seqno: int) -> int:
    """A replica's commit seqno: its leader's, capped at what it stores."""
    return min(leader_commit, last_seqno)


def alive_leaders(me_epoch: int, answers: Mapping[str, PeerStatus]) -> list[str]:
    """Peers leading at ``me_epoch`` or later: a promotion would compete with them."""
    return sorted(
        a for a, s in answers.items() if s.role is PeerRole.LEADER and s.epoch >= me_epoch
    )


def gather_source(
    ours: tuple[int, int], answers: Mapping[str, PeerStatus]
) -> tuple[str, PeerStatus] | None:
    """The peer whose log a node being promoted must make its own (Raft's up-to-date rule:
    the highest epoch of a last batch, then the longest), or None when ours is at least as
    up to date. A log written later in a later epoch holds everything committed before."""
    best: tuple[tuple[int, int], str] | None = None
    for address, status in answers.items():
        position = (status.last_epoch, status.last_seqno)
        if best is None or (position, address) > best:
            best = (position, address)
    if best is None or best[0] <= ours:
        return None
    return best[1], answers[best[1]]


def being_promoted(status: PeerStatus | None, address: str, known_epoch: int) -> bool:
    """The node at ``address`` claimed the newest epoch this node knows and names itself
    without leading yet: a promotion under way (its fenced replicas retry without backoff,
    so it has replicas, and acks, as soon as it leads)."""
    return (
        status is not None
        and status.role is not PeerRole.LEADER
        and status.leader_address == address
        and status.epoch >= known_epoch
    )


def replica_retry_s(failures: int, schedule: tuple[float, ...] = RETRY_S) -> float:
    """A replica's pause before its next session after ``failures`` failed ones."""
    return schedule[max(0, min(failures, len(schedule)) - 1)]


def names_leader(*, replica: bool, live: bool, stepping_down: bool) -> bool:
    """Whether a node's NOT_LEADER answer sends producers to the leader it knows: a
    replica only while its session with that leader is live, a node stepping down (it was
    told the new leader by the leader's promotion or its own check)."""
    return (replica and live) or stepping_down


def keepalive_ms(insync_timeout_s: float) -> int:
    """The replicas' keepalive: four fit in the in-sync timeout, so one late or lost
    keepalive on a busy host does not count a replica out of sync."""
    return max(1, int(insync_timeout_s * 1000 / 4))


def newer_snapshot(version: int, written: int) -> bool:
    """A ``node.json`` snapshot is written only if it is newer than the last one written
    (two writer threads may run saves in another order than they were made: an older epoch
    must never land last)."""
    return version > written
