"""The node as one sans-I/O state machine: :class:`NodeMachine`.

A node of a log is a leader, a replica, or between the two. Its whole state lives here —
the role (:class:`Role`, changed only through the table :data:`TRANSITIONS`), the epoch,
``node.json`` in memory (:class:`~boomscooter.node.state.NodeState`), whom it follows, the
commit rule (:class:`~boomscooter.node.core.CommitTracker`), the replica set
(:class:`~boomscooter.node.replicas.ReplicaSet`), the producer dedupe table — and every
decision is taken here, by the rules of :mod:`boomscooter.node.rules`.

The machine does no I/O and reads no clock. The runtime (the asyncio shell,
:mod:`boomscooter.node.runtime`) or the simulation (``tests/support/sim_cluster.py``) feeds it
events — a method call each, with ``now`` where time matters — and carries out the
commands it returns, in order: save ``node.json``, start or stop the stream, start or stop
following, ask the peers for their Status, gather a log from a peer, tell waiters that
something changed, log a line. Some commands are awaited: the runtime reports their end
with the matching event (``state_saved``, ``surveyed``, ``gathered``), and the machine goes
on only then — it never leads before its epoch is on disk.

The machine reads the log's position (first, last and durable seqno, the last batch's
epoch) through :class:`LogView`: storage facts, never I/O.

Roles::

    STARTING ──lead──▶ LEADER ──fenced──▶ STEPPING_DOWN ──follow──▶ REPLICA
        └─────follow─────────────────────────────────────────────▶ REPLICA
    REPLICA ──promote──▶ PROMOTING ──lead──▶ LEADER
                             └──promotion_failed──▶ REPLICA
    (any) ──stop──▶ STOPPED

A node stepping down names no leader until it follows (a peer asking meanwhile must not
take it for a leader of its epoch), and a node being promoted reports itself a replica.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from boomscooter.errors import (
    ExpectedSeqnoError,
    LocalProtocolError,
    NotLeaderError,
    RequestError,
    ServerUnavailableError,
)
from boomscooter.node import rules
from boomscooter.node.core import Appended, CommitTracker, DedupeTable, StreamSession
from boomscooter.node.replicas import ReplicaSet, ReplicaState
from boomscooter.node.rules import PeerRole, PeerStatus, SelfView
from boomscooter.node.state import NodeState

LEADER_COPY = ""
FEED_ENTRIES = 100_000  # the leader's recent dedupe entries kept for its replicas' sessions


class Role(enum.Enum):
    STARTING = "starting"
    LEADER = "leader"
    REPLICA = "replica"
    STEPPING_DOWN = "stepping-down"
    PROMOTING = "promoting"
    STOPPED = "stopped"


class Step(enum.Enum):
    LEAD = "lead"
    FOLLOW = "follow"
    FENCED = "fenced"
    PROMOTE = "promote"
    PROMOTION_FAILED = "promotion_failed"
    STOP = "stop"


TRANSITIONS: dict[tuple[Role, Step], Role] = {
    (Role.STARTING, Step.LEAD): Role.LEADER,
    (Role.STARTING, Step.FOLLOW): Role.REPLICA,
    (Role.LEADER, Step.FENCED): Role.STEPPING_DOWN,
    (Role.STEPPING_DOWN, Step.FOLLOW): Role.REPLICA,
    (Role.REPLICA, Step.FOLLOW): Role.REPLICA,
    (Role.REPLICA, Step.PROMOTE): Role.PROMOTING,
    (Role.PROMOTING, Step.LEAD): Role.LEADER,
    (Role.PROMOTING, Step.PROMOTION_FAILED): Role.REPLICA,
    **{(role, Step.STOP): Role.STOPPED for role in Role if role is not Role.STOPPED},
}

# What Status reports for each role (a node being promoted is still a replica there).
PEER_ROLE = {
    Role.LEADER: PeerRole.LEADER,
    Role.REPLICA: PeerRole.REPLICA,
    Role.PROMOTING: PeerRole.REPLICA,
}


class Purpose(enum.Enum):
    """Why the machine asked its peers for their Status."""

    START = "start"  # a leader starting: does someone lead with a newer epoch?
    FENCE = "fence"  # the leader's periodic check
    FIND_LEADER = "find_leader"  # a replica whose session ended
    PROMOTE_CHECK = "promote_check"  # does the leader still answer?
    PROMOTE_FENCE = "promote_fence"  # told the claimed epoch: whose log is the most up to date?


class LogView(Protocol):
    """The log's position, as the machine reads it (properties of the log: no I/O)."""

    @property
    def first_seqno(self) -> int: ...

    @property
    def last_seqno(self) -> int: ...

    @property
    def durable_seqno(self) -> int: ...

    @property
    def last_epoch(self) -> int: ...


# -- commands ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SaveState:
    """Write ``node.json``. ``wait``: report ``state_saved(version)`` when it is on disk."""

    state: NodeState
    version: int
    wait: bool


@dataclass(frozen=True, slots=True)
class StartStream:
    """Start multicasting this node's log under ``epoch``; report ``stream_started``."""

    epoch: int


@dataclass(frozen=True, slots=True)
class StopStream:
    pass


@dataclass(frozen=True, slots=True)
class StartFollowing:
    """Follow ``leader`` (its Replicate session, its stream, catch-up)."""

    leader: str


@dataclass(frozen=True, slots=True)
class StopFollowing:
    pass


@dataclass(frozen=True, slots=True)
class RetrySession:
    """A replica's next session, with ``leader``, after ``delay_s``."""

    leader: str
    delay_s: float


@dataclass(frozen=True, slots=True)
class Survey:
    """Ask ``addresses`` for their Status; report ``surveyed(token, answers)``. With
    ``fence_epoch`` (a promotion), tell them first that this node claimed that epoch
    (the Fence call: each records it, stops taking part in older epochs, follows this node)
    and take each one's Status after its claim is on its disk."""

    token: int
    purpose: Purpose
    addresses: tuple[str, ...]
    fence_epoch: int = 0


@dataclass(frozen=True, slots=True)
class Gather:
    """Promotion: make the log of ``source`` (first seqno ``first_seqno``) this log's —
    truncate after the last batch both hold, copy its batches up to ``last_seqno``, sync
    (unless fsync=never) — and report ``gathered(records)`` (or ``promotion_failed``).
    The sync: what the node gathered may be committed records only the peers hold; lost
    in a power cut, a restart would lead without them (its replicas follow it, and
    truncate what it lacks)."""

    source: str
    first_seqno: int
    last_seqno: int


@dataclass(frozen=True, slots=True)
class ForgetAfter:
    """Producer dedupe entries after ``seqno`` are gone: rewrite the journal."""

    seqno: int


@dataclass(frozen=True, slots=True)
class CommitMoved:
    """The commit seqno advanced (the stream's heartbeat, Notifications' committed end)."""

    commit_seqno: int


@dataclass(frozen=True, slots=True)
class Changed:
    """Something waiters watch changed (appends, commits, roles, replicas)."""


@dataclass(frozen=True, slots=True)
class PromotionDone:
    """The promotion asked for ended: with ``result`` (the new epoch and where the log
    stands), or ``error``."""

    result: dict[str, int] | None = None
    error: RequestError | None = None


@dataclass(frozen=True, slots=True)
class Note:
    """A log line: ``event`` at ``level`` with ``fields``."""

    event: str
    level: str = "info"
    fields: dict[str, Any] = field(default_factory=dict)


Command = (
    SaveState
    | StartStream
    | StopStream
    | StartFollowing
    | StopFollowing
    | RetrySession
    | Survey
    | Gather
    | ForgetAfter
    | CommitMoved
    | Changed
    | PromotionDone
    | Note
)


class StaleLeader(LocalProtocolError):
    """The node at ``address`` leads an epoch this replica must not follow."""

    def __init__(self, message: str, address: str, epoch: int) -> None:
        super().__init__(message)
        self.address = address
        self.epoch = epoch


@dataclass(frozen=True, slots=True, kw_only=True)
class MachineConfig:
    min_insync: int = 1
    insync_timeout_s: float = 5.0
    fsync_never: bool = False
    follow: str | None = None  # start as a replica of this leader
    watch_interval_s: float = 2.0  # the leader's fencing check
    retry_s: tuple[float, ...] = rules.RETRY_S  # a replica's pauses between failed sessions


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionOffer:
    """A leader's first answer on a Replicate session, as the replica's rules need it."""

    session: StreamSession
    commit_seqno: int
    last_seqno: int
    first_seqno: int
    min_insync: int
    keepalive_ms: int
    replica_addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Claim:
    """A promotion's epoch claim waiting for its state save (then the fence)."""

    epoch: int


@dataclass(slots=True)
class _Lead:
    """A lead waiting for its state save: what it will lead with."""

    epoch: int
    min_insync: int
    commit_seqno: int
    promotion: dict[str, int] | None = None


class NodeMachine:
    """One node's state and rules (see the module docstring)."""

    def __init__(
        self,
        config: MachineConfig,
        log: LogView,
        state: NodeState,
        *,
        address: str = "",
        versions: Callable[[], int] | None = None,
    ) -> None:
        self.config = config
        self.log = log
        self.state = state
        self.address = address
        self.role = Role.STARTING
        self.epoch = max(state.epoch, log.last_epoch)
        self.leader_address = ""
        self.leader_commit = 0  # as a replica: its leader's commit seqno, once reconciled
        self.session: StreamSession | None = None  # the stream subscribers join
        self.session_live = False  # as a replica: reconciled with its leader
        self.peers: list[str] = []  # as a replica: the other replicas its leader named
        self.leader_min_insync = 0  # as a replica: its leader's setting
        self.keepalive_s = 1.0  # as a replica: how often to ack while nothing changes
        self.refused: dict[str, int] = {}  # stale leaders a replica refused -> their epoch
        self.failures = 0  # failed replica sessions in a row
        self.dedupe = DedupeTable()
        self.dedupe_feed: deque[tuple[int, str, int, Appended]] = deque(maxlen=FEED_ENTRIES)
        self.feed_index = 0
        self.tracker = CommitTracker(
            config.min_insync, commit_seqno=rules.start_commit(config.min_insync, log.last_seqno)
        )
        self.replicas = ReplicaSet(self.tracker, insync_timeout_s=config.insync_timeout_s)
        self.durable_seen = 0  # the leader's held seqno as last reported (acks=leader waits)
        self._tokens = 0
        self._surveys: dict[int, Purpose] = {}
        # Awaited saves: lead, claim (a promotion's epoch), or whom to follow.
        self._saves: dict[int, _Lead | _Claim | str] = {}
        # Numbers the node.json snapshots (rules.newer_snapshot: an older one never lands
        # last); one sequence across restarts in one process (state.next_version).
        self._next_version = versions or itertools.count(1).__next__
        self._next_watch = 0.0
        self._promotion: tuple[int, bool] | None = None  # (min_insync, force) asked
        self._claimed = 0  # the epoch a promotion claimed (saved, then told the peers)
        self._deposed = ""  # the leader a promotion replaces
        self._leading: _Lead | None = None  # a lead whose stream is being started

    # -- the role table -----------------------------------------------------------------

    def _step(self, step: Step) -> None:
        try:
            self.role = TRANSITIONS[(self.role, step)]
        except KeyError:
            raise LocalProtocolError(f"{step.value} while {self.role.value}") from None

    @property
    def is_leader(self) -> bool:
        return self.role is Role.LEADER

    @property
    def peer_role(self) -> PeerRole:
        return PEER_ROLE.get(self.role, PeerRole.NONE)

    @property
    def commit_seqno(self) -> int:
        if self.is_leader:
            return self.tracker.commit_seqno
        return rules.replica_commit(self.leader_commit, self.log.last_seqno)

    def held_seqno(self) -> int:
        return rules.held_seqno(
            fsync_never=self.config.fsync_never,
            last_seqno=self.log.last_seqno,
            durable_seqno=self.log.durable_seqno,
        )

    def known_epoch(self) -> int:
        """The newest epoch this node knows (what Status reports)."""
        return max(self.epoch, self.state.epoch)

    def status(self) -> PeerStatus:
        """This node as its peers see it through Status."""
        return PeerStatus(
            role=self.peer_role,
            epoch=self.known_epoch(),
            leader_address=self.leader_address,
            first_seqno=self.log.first_seqno,
            last_seqno=self.log.last_seqno,
            last_epoch=self.log.last_epoch,
        )

    def not_leader(self) -> NotLeaderError:
        """NOT_LEADER, naming the leader where this node knows it: a replica whose session
        is live (it heard from its leader within ``--leader-timeout``), or a node fenced
        by a promotion (the claimant) — never a leader it lost."""
        named = rules.names_leader(
            replica=self.role is Role.REPLICA,
            live=self.session_live,
            stepping_down=self.role is Role.STEPPING_DOWN,
        )
        leader = self.leader_address if named else ""
        where = f"; the leader is {leader}" if leader else ""
        return NotLeaderError(
            f"this node is a {self.role.value}, not the leader{where}", leader_address=leader
        )

    def view(self) -> SelfView:
        return SelfView(
            address=self.address,
            epoch=self.known_epoch(),
            replica=self.role in (Role.REPLICA, Role.PROMOTING),
            starting=self.role is Role.STARTING,
        )

    def _survey(
        self, purpose: Purpose, addresses: set[str] | list[str], fence_epoch: int = 0
    ) -> Survey:
        self._tokens += 1
        self._surveys[self._tokens] = purpose
        wanted = tuple(sorted(a for a in set(addresses) if a and a != self.address))
        return Survey(self._tokens, purpose, wanted, fence_epoch)

    def _save(self, *, wait: bool) -> SaveState:
        snapshot = NodeState(self.state.epoch, sorted(set(self.state.peers)), self.state.leader)
        return SaveState(snapshot, self._next_version(), wait)

    # -- starting ---------------------------------------------------------------------------

    def start(self) -> list[Command]:
        """The node is serving: follow the configured leader, or ask the known peers
        whether someone leads with a newer epoch before taking one."""
        if self.config.follow is not None:
            return self.follow(self.config.follow, 0)
        return [self._survey(Purpose.START, self.state.peers)]

    def surveyed(self, token: int, answers: dict[str, PeerStatus], now: float) -> list[Command]:
        """The answers of the peers that answered a :class:`Survey`."""
        purpose = self._surveys.pop(token, None)
        following = any(isinstance(v, str) for v in self._saves.values())
        if purpose is Purpose.START and self.role is Role.STARTING and not following:
            # (A node told meanwhile to follow — a promotion's fence — takes no epoch.)
            found = rules.newer_leader(self.view(), answers)
            if found is not None:  # fenced before it took an epoch
                fields = {"leader": found[0], "epoch": found[1], "own_epoch": self.epoch,
                          "at_start": True}  # fmt: skip
                return [Note("node.fenced", "warning", fields), *self.follow(*found)]
            return self._begin_lead(
                rules.start_epoch(self.known_epoch()),
                self.config.min_insync,
                self.tracker.commit_seqno,
            )
        if purpose is Purpose.FENCE and self.is_leader:
            found = rules.newer_leader(self.view(), answers)
            return [] if found is None else self.follow(*found)
        if purpose is Purpose.FIND_LEADER and self.role is Role.REPLICA:
            return self._found_leader(answers)
        if purpose is Purpose.PROMOTE_CHECK and self._promotion is not None:
            return self._promotion_checked(answers)
        if purpose is Purpose.PROMOTE_FENCE and self.role is Role.PROMOTING:
            return self._fenced(answers)
        return []  # an answer for a role this node has left meanwhile

    # -- leading ----------------------------------------------------------------------------

    def _begin_lead(
        self, epoch: int, min_insync: int, commit: int, promotion: dict[str, int] | None = None
    ) -> list[Command]:
        """Lead ``epoch`` once it is on disk (an epoch is never reused)."""
        self.state.epoch = max(self.state.epoch, epoch)
        self.state.leader = self.address
        save = self._save(wait=True)
        self._saves[save.version] = _Lead(epoch, min_insync, commit, promotion)
        return [save]

    def state_saved(self, version: int) -> list[Command]:
        """An awaited ``node.json`` save is on disk."""
        pending = self._saves.pop(version, None)
        if isinstance(pending, _Lead) and self.role in (Role.STARTING, Role.PROMOTING):
            self._leading = pending
            return [StartStream(pending.epoch)]
        if isinstance(pending, _Claim) and self.role is Role.PROMOTING:
            peers = self._promotion_peers()
            return [self._survey(Purpose.PROMOTE_FENCE, peers, fence_epoch=pending.epoch)]
        if isinstance(pending, str) and self.role in (Role.STEPPING_DOWN, Role.REPLICA):
            return self._followed(pending)
        if isinstance(pending, str) and self.role is Role.STARTING:
            return self._followed(pending)
        return []

    def stream_started(self, session: StreamSession) -> list[Command]:
        """The runtime started the stream :class:`StartStream` asked for: only now does the
        node lead (a peer asking earlier must not find a leader without its stream)."""
        lead, self._leading = self._leading, None
        if lead is None or self.role not in (Role.STARTING, Role.PROMOTING):
            return [StopStream()]  # stopped or stepped aside meanwhile
        self.session = session
        return self._lead(lead)

    def _lead(self, lead: _Lead) -> list[Command]:
        was = self.role
        self._step(Step.LEAD)
        self.epoch = lead.epoch
        self.tracker = CommitTracker(lead.min_insync, commit_seqno=lead.commit_seqno)
        self.replicas = ReplicaSet(self.tracker, insync_timeout_s=self.config.insync_timeout_s)
        self.leader_address = self.address
        self.session_live = False
        self.durable_seen = self.held_seqno()  # as a replica it may have truncated since
        out = self.durable_moved(self.held_seqno())
        out.append(
            Note(
                "node.leading",
                fields={
                    "epoch": lead.epoch,
                    "min_insync": lead.min_insync,
                    "commit_seqno": lead.commit_seqno,
                    "last_seqno": self.log.last_seqno,
                },
            )
        )
        if was is Role.PROMOTING and lead.promotion is not None:
            self._promotion = None
            out.append(Note("node.promoted", "warning", dict(lead.promotion)))
            out.append(PromotionDone(result=lead.promotion))
        return out

    def tick(self, now: float) -> list[Command]:
        """Time passed: replicas silent too long leave the in-sync set; the leader's
        fencing check is due every ``watch_interval_s``."""
        out: list[Command] = []
        if not self.is_leader:
            return out
        for replica_id in self.replicas.expire(now):
            fields = {
                "replica": replica_id,
                "timeout_s": self.config.insync_timeout_s,
                "in_sync_copies": self.replicas.in_sync_copies(),
                "min_insync": self.tracker.min_insync,
            }
            out += [Note("replica.out_of_sync", "warning", fields), Changed()]
        if now >= self._next_watch:
            if self._next_watch:
                peers = set(self.state.peers) | set(self.replicas.addresses())
                out.append(self._survey(Purpose.FENCE, peers))
            self._next_watch = now + self.config.watch_interval_s
        return out

    # -- producing (leader) ---------------------------------------------------------------

    def check_produce(self, *, quorum: bool) -> None:
        """Before anything else: a node that does not lead sends the producer elsewhere
        (NOT_LEADER); then ``acks=quorum`` needs enough in-sync copies to commit."""
        if not self.is_leader:
            raise self.not_leader()
        if quorum:
            copies = self.replicas.in_sync_copies()
            if copies < self.tracker.min_insync:
                raise ServerUnavailableError(
                    f"acks=quorum needs {self.tracker.min_insync} in-sync copies, "
                    f"{copies} available"
                )

    def earlier(self, producer_id: str, batch_sequence: int) -> Appended | None:
        """Where this producer batch was stored already (a retry), if it was."""
        if not producer_id:
            return None
        DedupeTable.check_id(producer_id)
        return self.dedupe.lookup(producer_id, batch_sequence)

    def check_expected(self, expected_first_seqno: int | None, next_seqno: int) -> None:
        if expected_first_seqno is not None and expected_first_seqno != next_seqno:
            raise ExpectedSeqnoError(
                f"expected first seqno {expected_first_seqno}, but the log continues at "
                f"{next_seqno}",
                next_seqno=next_seqno,
            )

    def appended(self, producer_id: str, batch_sequence: int, appended: Appended) -> None:
        """A producer's batch is in the log (its journal entry first)."""
        if producer_id:
            self.dedupe.add(producer_id, batch_sequence, appended)
            self.feed_index += 1
            self.dedupe_feed.append((self.feed_index, producer_id, batch_sequence, appended))

    def truncated(self, seqno: int) -> None:
        """The log lost every record after ``seqno`` (a diverged tail cut, a rebase): what
        this node held and the dedupe entries of those records are gone with them."""
        self.durable_seen = min(self.durable_seen, seqno)
        self.dedupe.forget_after(seqno)

    def durable_moved(self, seqno: int) -> list[Command]:
        """This node now holds everything up to ``seqno`` (durably, as its policy says)."""
        self.durable_seen = max(self.durable_seen, seqno)
        out: list[Command] = []
        if self.is_leader and self.tracker.held(LEADER_COPY, seqno):
            out.append(CommitMoved(self.tracker.commit_seqno))
        out.append(Changed())
        return out

    # -- replicas (leader) ------------------------------------------------------------------

    def replica_opened(
        self, replica_id: str, address: str, last_epoch: int, now: float
    ) -> tuple[ReplicaState, list[Command]]:
        """A replica opened its Replicate session. Its first message is not counted (its
        tail may have diverged): its acks count once it has reconciled with this log."""
        if not self.is_leader:
            raise self.not_leader()
        if rules.replica_refused(last_epoch, self.epoch):
            raise RequestError(
                f"the replica holds epoch {last_epoch}, above this leader's {self.epoch}: "
                "this leader is stale",
                code="FAILED_PRECONDITION",
            )
        state = self.replicas.connected(replica_id, address, now)
        out: list[Command] = [Note("replica.connected", fields={"replica": replica_id,
                                                                  "address": address})]  # fmt: skip
        if address and address not in self.state.peers:
            self.state.peers.append(address)
            out.append(self._save(wait=False))
        return state, out

    def replica_acked(
        self, replica_id: str, durable: int, last: int, last_epoch: int, now: float
    ) -> list[Command]:
        if replica_id not in self.replicas.replicas:
            return []
        counted = rules.counted_ack(durable, self.log.last_seqno)
        out: list[Command] = []
        if self.replicas.ack(
            replica_id, durable_seqno=counted, last_seqno=last, last_epoch=last_epoch, now=now
        ):
            out.append(CommitMoved(self.tracker.commit_seqno))
        out.append(Changed())
        return out

    def replica_closed(self, replica_id: str, session: int) -> list[Command]:
        self.replicas.disconnected(replica_id, session)
        return [Note("replica.disconnected", fields={"replica": replica_id}), Changed()]

    def feed_since(self, after: int) -> tuple[list[tuple[str, int, Appended]], int]:
        """Dedupe entries numbered above ``after`` for a replica's session, and the number
        of the last one; when the feed no longer reaches back (a session's first message,
        or a replica too slow), each producer's recent entries instead."""
        feed = self.dedupe_feed
        newest = feed[-1][0] if feed else 0
        if after >= newest:
            return [], after
        if after < 0 or feed[0][0] > after + 1:
            return list(self.dedupe.recent(RECENT_PER_PRODUCER)), newest
        start = after + 1 - feed[0][0]
        chosen = [feed[i] for i in range(start, min(len(feed), start + FEED_PER_MESSAGE))]
        return [(p, s, a) for _, p, s, a in chosen], chosen[-1][0]

    # -- following ------------------------------------------------------------------------

    def follow(self, leader: str, epoch: int) -> list[Command]:
        """Become (or stay) a replica of ``leader``. A leader steps down first (fenced: it
        learned of ``epoch`` and must never write again under its own); ``epoch`` and its
        leader are saved before the node follows."""
        out: list[Command] = []
        was = self.role
        if was is Role.LEADER:
            self._step(Step.FENCED)
            self.leader_address = ""  # until it follows: never a leader of the new epoch
            out += [StopStream(), Changed()]
            out.append(Note("node.fenced", "warning", {"leader": leader, "epoch": epoch,
                                                          "own_epoch": self.epoch}))  # fmt: skip
        if was is Role.REPLICA:
            out.append(StopFollowing())
        self.session_live = False
        # Named before the save: a peer asking meanwhile sees the new epoch only with the
        # leader of that epoch.
        self.leader_address = leader
        if rules.saves_fencing_epoch(epoch, self.state.epoch):
            self.state.epoch, self.state.leader = epoch, leader
            save = self._save(wait=True)
            self._saves[save.version] = leader
            return [*out, save]
        return out + self._followed(leader)

    def _followed(self, leader: str) -> list[Command]:
        self._step(Step.FOLLOW)
        self.leader_address = leader
        self.leader_min_insync = 0  # known again from its leader's offer
        self.leader_commit = 0  # known again once the session reconciled
        self.session = None
        self.session_live = False
        self.failures = 0
        self.refused = {}
        return [StartFollowing(leader), Note("node.following", fields={"leader": leader})]

    def session_offered(self, address: str, offer: SessionOffer) -> list[Command]:
        """A leader answered a Replicate session: check it is no stale leader (then
        :class:`StaleLeader`), adopt its stream and what it says; the session counts once
        the replica reconciled its log (:meth:`session_reconciled`)."""
        epoch = offer.session.epoch
        if rules.stale_leader(self.state.epoch, self.state.leader, address, epoch):
            self.refused[address] = epoch
            raise StaleLeader(
                f"{address} leads at epoch {epoch}, but this node has seen epoch "
                f"{self.state.epoch} (led by {self.state.leader or 'another node'}): a stale "
                "leader",
                address,
                epoch,
            )
        self.peers = [a for a in offer.replica_addresses if a != self.address]
        self.leader_min_insync = offer.min_insync
        self.keepalive_s = offer.keepalive_ms / 1000 if offer.keepalive_ms else 1.0
        self.leader_address = address
        self.session = offer.session
        self.epoch = epoch
        out: list[Command] = []
        peers = sorted({*self.state.peers, *self.peers, address} - {self.address})
        if (
            epoch > self.state.epoch
            or peers != sorted(self.state.peers)
            or (self.state.leader != address)
        ):
            self.state.epoch = max(self.state.epoch, epoch)
            self.state.peers, self.state.leader = peers, address
            out.append(self._save(wait=False))
        return out

    def session_reconciled(self, leader_commit: int) -> list[Command]:
        """The replica's log agrees with its leader's (diverged tail truncated): from now
        on the leader's commit counts here."""
        self.session_live = True
        self.failures = 0
        return self.leader_commit_seen(leader_commit)

    def session_update(self, commit: int, replica_addresses: tuple[str, ...]) -> list[Command]:
        """A message of the leader on the replica's session: its commit, and its replicas
        (whom a promotion of this node asks)."""
        self.peers = [a for a in replica_addresses if a != self.address]
        return self.leader_commit_seen(commit)

    def leader_commit_seen(self, commit: int) -> list[Command]:
        """The leader's commit seqno, from its stream or its session: counted only once
        this log was reconciled with the leader's (before that its tail may be one the
        leader does not hold)."""
        if not self.session_live or commit <= self.leader_commit:
            return []
        self.leader_commit = commit
        return [CommitMoved(self.commit_seqno), Changed()]

    def log_grew(self) -> list[Command]:
        """The replica appended its leader's batches: its commit (the leader's, capped at
        what it stores) may have moved."""
        return [CommitMoved(self.commit_seqno), Changed()]

    def session_ended(self, reason: str) -> list[Command]:
        """The replica's session failed: look for the leader (the known one, or whoever
        the known peers name with the highest epoch), then try again."""
        self.session_live = False
        if self.role is not Role.REPLICA:
            return []
        self.failures += 1
        note = Note("replica.session_ended", fields={"leader": self.leader_address,
                                                      "reason": reason})  # fmt: skip
        addresses = {*self.peers, *self.state.peers, self.leader_address}
        return [note, self._survey(Purpose.FIND_LEADER, addresses)]

    def _found_leader(self, answers: dict[str, PeerStatus]) -> list[Command]:
        known = self.state.epoch
        skip = frozenset(a for a, e in self.refused.items() if e <= known)
        found = rules.newer_leader(self.view(), answers, or_same=True, skip=skip)
        out: list[Command] = []
        if found is not None and found[0] != self.leader_address:
            out.append(Note("replica.new_leader", fields={"leader": found[0],
                                                          "epoch": found[1]}))  # fmt: skip
            self.leader_address = found[0]
            self.failures = 0
        if rules.being_promoted(answers.get(self.leader_address), self.leader_address, known):
            self.failures = 0  # it leads in a moment: ask again at once, without backing off
        delay = rules.replica_retry_s(self.failures, self.config.retry_s)
        out.append(RetrySession(self.leader_address, delay))
        return out

    # -- promotion --------------------------------------------------------------------------

    def promote(self, min_insync: int, *, force: bool) -> list[Command]:
        """Manual failover: this replica becomes the leader. It asks its peers whether the
        leader still answers (refused then, unless ``force``: a switchover), claims an epoch
        above every one it heard of (saved), fences its peers with it — each records the
        claim, stops taking part in older epochs (a leader stops leading, a replica leaves
        its leader) and follows this node, then reports what it holds — gathers the most
        up-to-date log among them, and leads. Once the old leader or enough of its replicas
        are fenced, the old epoch can commit nothing more, and everything it committed is
        in the log gathered (:func:`~boomscooter.node.rules.old_epoch_stopped`)."""
        if self._promotion is not None or self.role is Role.PROMOTING:
            raise RequestError(f"{self.address} is being promoted already",
                               code="FAILED_PRECONDITION")  # fmt: skip
        if self.is_leader:
            raise RequestError(f"{self.address} is already the leader",
                               code="FAILED_PRECONDITION")  # fmt: skip
        if self.role is not Role.REPLICA:
            raise RequestError(f"{self.address} is {self.role.value}", code="UNAVAILABLE")
        self._promotion = (min_insync, force)
        self._claimed, self._deposed = 0, ""
        return [self._survey(Purpose.PROMOTE_CHECK, self._promotion_peers())]

    def _promotion_peers(self) -> set[str]:
        return {*self.state.peers, *self.peers, self.leader_address, self._deposed}

    def _promotion_checked(self, answers: dict[str, PeerStatus]) -> list[Command]:
        assert self._promotion is not None
        _, force = self._promotion
        alive = rules.alive_leaders(self.epoch, answers)
        if alive and not force:
            self._promotion = None
            error = RequestError(
                f"the leader {alive[0]} still answers: promotion is for a failed leader (stop "
                "it first, or force a switchover: the leader is fenced, stops accepting, and "
                "hands over what it holds)",
                code="FAILED_PRECONDITION",
            )
            return [PromotionDone(error=error)]
        if self.role is not Role.REPLICA:
            self._promotion = None
            error = RequestError(f"{self.address} is {self.role.value}", code="UNAVAILABLE")
            return [PromotionDone(error=error)]
        leader = self.leader_address
        short = self._too_few_answers(answers, leader, holds_all=leader in answers)
        if short is not None:
            self._promotion = None
            return [PromotionDone(error=short)]
        self._step(Step.PROMOTE)
        self.session_live = False
        # The claim: an epoch above every one heard of, on disk before any peer is told.
        # Named its own leader from now on (Status: a node in transition, never a replica
        # of the old leader at the new epoch).
        epochs = [self.epoch, self.state.epoch, *(s.epoch for s in answers.values())]
        self._claimed = rules.promotion_epoch(epochs)
        self._deposed, self.leader_address = self.leader_address, self.address
        self.state.epoch, self.state.leader = self._claimed, self.address
        save = self._save(wait=True)
        self._saves[save.version] = _Claim(self._claimed)
        return [StopFollowing(), save]

    def _fenced(self, answers: dict[str, PeerStatus]) -> list[Command]:
        """The fenced peers' Status (each taken after it recorded the claim)."""
        claimed = self._claimed
        rival = rules.fence_rival(claimed, self.address, answers)
        if rival is not None:
            error = RequestError(
                f"promotion failed: {rival} reports an epoch claimed by another node (a "
                "concurrent promotion?); this node follows whoever leads it",
                code="ABORTED",
            )
            return self.promotion_failed(error)
        fenced = sorted(a for a, s in answers.items() if s.epoch == claimed)
        # The old leader counts only if it took the claim (answering is not enough).
        short = self._too_few_answers(answers, self._deposed, holds_all=self._deposed in fenced)
        if short is not None:
            return self.promotion_failed(short)
        out: list[Command] = []
        insync = self.leader_min_insync or self.config.min_insync
        replicas = self._promotion_peers() - {self.address, self._deposed, ""}
        if not rules.old_epoch_stopped(set(fenced), self._deposed, replicas, insync):
            unfenced = sorted(replicas - set(fenced))
            fields = {"epoch": claimed, "leader": self._deposed, "unfenced": unfenced,
                      "min_insync": insync}  # fmt: skip
            out.append(Note("promote.not_fenced", "warning", fields))
        out.append(Note("promote.fenced", fields={"epoch": claimed, "fenced": fenced}))
        return out + self._gather_from(answers)

    def _too_few_answers(
        self, answers: dict[str, PeerStatus], leader: str, *, holds_all: bool
    ) -> RequestError | None:
        """Unless the old leader answered (``holds_all``: it holds everything it committed),
        enough of its replicas must have (:func:`~boomscooter.node.rules.promotion_quorum`):
        a record it committed may be on those only."""
        if leader and holds_all:
            return None
        replicas = self._promotion_peers() - {self.address, leader, ""}
        insync = self.leader_min_insync or self.config.min_insync
        needed = rules.promotion_quorum(len(replicas) + 1, insync)
        answered = 1 + len(replicas & answers.keys())
        if answered >= needed:
            return None
        missing = ", ".join(sorted(replicas - answers.keys()))
        return RequestError(
            f"promotion needs {needed} of the {len(replicas) + 1} replicas (this one "
            f"included) to answer, {answered} did: with min_insync {insync} a record the "
            f"old leader committed may be only on {missing}; bring them back, then promote",
            code="UNAVAILABLE",
        )

    def _gather_from(self, answers: dict[str, PeerStatus]) -> list[Command]:
        ours = (self.log.last_epoch, self.log.last_seqno)
        source = rules.gather_source(ours, answers)
        if source is None:
            return self.gathered(0)
        address, status = source
        return [Gather(address, status.first_seqno, status.last_seqno)]

    def gathered(self, records: int) -> list[Command]:
        """The promotion's gather is done: lead the claimed epoch."""
        assert self._promotion is not None
        min_insync, _ = self._promotion
        # Dedupe entries learned for batches this log does not hold (lost with the leader)
        # must not answer a retry as "already stored".
        self.dedupe.forget_after(self.log.last_seqno)
        insync = min_insync or self.leader_min_insync or self.config.min_insync
        commit = self.commit_seqno
        result = {
            "epoch": self._claimed,
            "last_seqno": self.log.last_seqno,
            "commit_seqno": commit,
            "gathered_records": records,
        }
        return [
            ForgetAfter(self.log.last_seqno),
            *self._begin_lead(self._claimed, insync, commit, result),
        ]

    def promotion_failed(self, error: RequestError) -> list[Command]:
        """The promotion failed half-way (a peer vanished): follow again rather than stay
        a node that neither follows nor leads. Once an epoch was claimed, the old leader
        is refused (its epoch is older): the node looks for whoever leads the newest epoch
        — none until a promotion is asked again, which the error says."""
        self._promotion = None
        if self.role is not Role.PROMOTING:
            return [PromotionDone(error=error)]
        self._step(Step.PROMOTION_FAILED)
        if self._claimed:
            error = RequestError(
                f"{error}; epoch {self._claimed} was claimed and the peers reached were "
                "fenced: ask for the promotion again (this node or another)",
                code=error.code,
            )
        self.leader_address = self._deposed or self.leader_address
        return [StartFollowing(self.leader_address), PromotionDone(error=error)]

    def fence_asked(self, epoch: int, leader: str) -> list[Command]:
        """A node being promoted (``leader``) claimed ``epoch`` (the Fence call): record it,
        stop taking part in any older epoch — a leader stops leading and acknowledging, a
        replica leaves its leader — and follow the claimant. The caller answers with this
        node's Status once the commands are carried out (the claim on disk). A claim of an
        older epoch, or of this one by another node, changes nothing: the Status tells."""
        if self.role in (Role.PROMOTING, Role.STOPPED):
            return []
        if not rules.accepts_fence(epoch, leader, self.state.epoch, self.state.leader):
            return []
        fields = {"leader": leader, "epoch": epoch, "own_epoch": self.epoch}
        return [Note("node.fence_accepted", "warning", fields), *self.follow(leader, epoch)]

    # -- stopping ---------------------------------------------------------------------------

    def stop(self) -> list[Command]:
        if self.role is Role.STOPPED:
            return []
        was = self.role
        self._step(Step.STOP)
        out: list[Command] = [Changed()]
        if was is Role.LEADER:
            out.insert(0, StopStream())
        if was is Role.REPLICA:
            out.insert(0, StopFollowing())
        return out


FEED_PER_MESSAGE = 10_000
RECENT_PER_PRODUCER = 64  # beyond an SDK producer's in-flight window (16)
