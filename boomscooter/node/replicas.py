"""Replication bookkeeping (sans-I/O): the leader's view of its replicas, and the search for
the last point where a replica's log agrees with its leader's.

:class:`ReplicaSet` feeds the commit rule. Every ack of a durable seqno counts in the
:class:`~boomscooter.node.core.CommitTracker` (a copy that holds a record durably holds it,
in sync or not); a replica that disconnects leaves the count, since what it holds after it
returns is only known from its next ack. *In sync* is about availability, not safety: a
replica is in sync while it is connected and acknowledges within ``insync_timeout_s`` (a
connected replica acknowledges at least every second even when idle). With fewer in-sync
copies than ``min_insync`` the leader fails ``acks=quorum`` at once (UNAVAILABLE) instead
of holding batches that cannot commit.

:class:`CommonPoint` finds where a replica's tail diverged. Each leader incarnation writes
under an epoch no earlier writer used (a promoted replica and a restarted leader both take a
new one), and a replica appends only contiguous batches of its leader after this search, so
two logs that hold the *same batch* (same seqnos, epoch and CRC32C) at a seqno agree on
everything before it (Raft's log matching property). Agreement is therefore a prefix
property and the search gallops back from the replica's last seqno and then bisects: one
comparison when nothing diverged (the common case), O(log n) otherwise. The shell compares
by fetching the leader's batch that holds the probed seqno.
"""

from __future__ import annotations

from dataclasses import dataclass

from boomscooter.node.core import CommitTracker

DEFAULT_INSYNC_TIMEOUT_S = 5.0


@dataclass(slots=True)
class ReplicaState:
    replica_id: str
    address: str
    durable_seqno: int = 0
    last_seqno: int = 0
    last_epoch: int = 0
    connected: bool = False
    in_sync: bool = False
    last_ack_at: float = 0.0
    sessions: int = 0


class ReplicaSet:
    """The leader's replicas: acks into the commit rule, the in-sync set, status."""

    def __init__(
        self, tracker: CommitTracker, *, insync_timeout_s: float = DEFAULT_INSYNC_TIMEOUT_S
    ) -> None:
        self.tracker = tracker
        self.insync_timeout_s = insync_timeout_s
        self.replicas: dict[str, ReplicaState] = {}

    def connected(self, replica_id: str, address: str, now: float) -> ReplicaState:
        state = self.replicas.get(replica_id)
        if state is None:
            state = self.replicas[replica_id] = ReplicaState(replica_id, address)
        state.address = address or state.address
        state.connected = True
        state.sessions += 1
        state.last_ack_at = now
        return state

    def ack(
        self, replica_id: str, *, durable_seqno: int, last_seqno: int, last_epoch: int, now: float
    ) -> bool:
        """A replica's state arrived; True when the commit seqno advanced."""
        state = self.replicas[replica_id]
        state.durable_seqno = durable_seqno
        state.last_seqno = last_seqno
        state.last_epoch = last_epoch
        state.last_ack_at = now
        state.in_sync = state.connected
        if not state.connected:
            return False
        return self.tracker.held(replica_id, durable_seqno)

    def disconnected(self, replica_id: str, session: int | None = None) -> None:
        """The replica's session ``session`` (its number from :meth:`connected`; None: any)
        ended. The close of an older session, noticed after the replica opened a new one,
        changes nothing."""
        state = self.replicas.get(replica_id)
        if state is None or (session is not None and session != state.sessions):
            return
        state.connected = False
        state.in_sync = False
        self.tracker.remove(replica_id)

    def expire(self, now: float) -> list[str]:
        """Replicas silent for longer than the in-sync timeout leave the in-sync set and the
        commit count; returns their ids (newly out of sync)."""
        out = []
        for state in self.replicas.values():
            if state.in_sync and now - state.last_ack_at > self.insync_timeout_s:
                state.in_sync = False
                self.tracker.remove(state.replica_id)
                out.append(state.replica_id)
        return out

    def in_sync_copies(self) -> int:
        """Copies that can take part in a commit now: the leader and its in-sync replicas."""
        return 1 + sum(1 for s in self.replicas.values() if s.in_sync)

    def addresses(self, *, excluding: str = "") -> list[str]:
        return sorted(
            {s.address for s in self.replicas.values() if s.address and s.address != excluding}
        )


class CommonPoint:
    """The highest seqno up to which two logs agree, found by comparing batches.

    ``last_seqno`` is the replica's; ``floor`` a seqno known to agree (0, or the leader's
    first stored seqno - 1: deleted records were committed long ago). Loop: ``probe()``
    names a seqno; compare the two batches that hold it; call :meth:`matched` with the
    batch's last seqno or :meth:`differs` with its base seqno (both as the replica stores
    it; a seqno the leader lacks differs). ``probe()`` returns None when :attr:`result` is
    known: truncate the replica after it.
    """

    def __init__(self, last_seqno: int, *, floor: int = 0) -> None:
        self.low = min(floor, last_seqno)  # agrees up to here
        self.high: int | None = None  # first seqno known to differ
        self._last = last_seqno
        self._step = 1
        self.probes = 0

    def probe(self) -> int | None:
        if self.high is None:
            return None if self.low >= self._last else self._last
        if self.low + 1 >= self.high:
            return None
        if self._step:  # galloping back from the tail
            candidate = self.high - self._step
            if candidate > self.low:
                return candidate
            self._step = 0
        return (self.low + self.high) // 2

    def matched(self, batch_last_seqno: int) -> None:
        self.probes += 1
        self.low = max(self.low, batch_last_seqno)
        self._step = 0  # bisect from here on
        if self.high is not None and self.low >= self.high:
            raise ValueError("logs agree past a seqno where they differ: not a prefix")

    def differs(self, batch_base_seqno: int) -> None:
        self.probes += 1
        if batch_base_seqno <= self.low:
            raise ValueError("logs differ below a seqno where they agree: not a prefix")
        self.high = batch_base_seqno if self.high is None else min(self.high, batch_base_seqno)
        if self._step:
            self._step *= 2

    @property
    def result(self) -> int:
        return self.low

    @property
    def done(self) -> bool:
        return self.probe() is None
