"""A seeded deterministic simulation of replication (TigerBeetle's VOPR, scaled down).

One thread, one fake clock, one event queue; nodes are plain objects driven by the real cores
(CommitTracker, ReplicaSet, CommonPoint, MemoryLog, the batch codec) and the shells' rules
re-enacted (``sim_nodes.py`` holds the pieces). The network drops, duplicates, delays
(reorders) and cuts; a leader notices a stream that died in a cut late, then closes that
session. :class:`~sim_nodes.CrashLog` keeps the durable prefix under fsync
always/interval/never: a process crash keeps what was written, a power loss the durable
prefix, some whole undurable batches and maybe a torn one recovery cuts. Nodes crash and
restart (a replica's unawaited ``node.json`` save can be lost); producers ask for
acks=quorum or acks=leader; the operator promotes a replica while the leader is down.

Invariants after every event: (1) every record acknowledged at quorum is in the newest
leader's log, same bytes, same seqno; (2) every node's log up to its commit agrees with one
committed history, a reconciled replica's log is a prefix of its leader's and it appends only
its leader's batches, no epoch leads twice; (3) subscribers get contiguous seqnos in order,
with the committed bytes. The operator promotes any replica, but only while every surviving
replica is up and reachable (once the leader is dead only they hold an acknowledged record),
and keeps the rules ``expose_epoch_reuse`` lifts (test_simulation.py: without them records
are lost).
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Callable
from functools import partial

from sim_nodes import (
    ACKS_LEADER,
    FSYNC_S,
    HELLO_S,
    INSYNC_S,
    RETRY_S,
    SAVE_S,
    STREAM_DEAD_S,
    TICK_S,
    CrashLog,
    Node,
    Session,
    SimConfig,
    UncappedTracker,
    Violation,
    common_point,
    newer_leader,
    same,
    stale_leader,
)

from boomscooter.node.core import CommitTracker
from boomscooter.node.replication import ReplicaSet
from boomscooter.storage.api import FsyncMode
from boomscooter.storage.batch import Batch, Entry, encode_batch

__all__ = ["Cluster", "CrashLog", "SimConfig", "Violation", "simulate"]


class Cluster:
    def __init__(self, seed: int, config: SimConfig | None = None) -> None:
        self.seed, self.config = seed, config or SimConfig()
        self.rng = rng = random.Random(seed)
        self.now, self.step, self._count = 0.0, 0, 0
        self._queue: list[tuple[float, int, Callable[[], object]]] = []
        self.nodes = [Node(i, rng.choice(list(FsyncMode))) for i in range(self.config.replicas + 1)]
        self.loss, self.dup = rng.choice([0.0, 0.02, 0.1]), rng.choice([0.0, 0.05])
        self.cuts: set[frozenset[int]] = set()
        self.history: list[tuple[int, bytes]] = []  # committed (epoch, payload) by seqno - 1
        self.acked = self.produced = self.sid = 0  # acked: the highest commit a leader reached
        self.max_epoch, self.newest = 0, 0  # the highest epoch taken, and its taker
        self.trace: list[str] = []
        self.stats: Counter[str] = Counter()
        for node in self.nodes:
            self.at(rng.uniform(0, TICK_S), partial(self._tick, node, 0))
        self._lead(self.nodes[0], 1, 0)
        for node in self.nodes[1:]:
            self._follow(node, 0, 0)
        self.at(0.01, self._produce)
        self.at(0.2, self._chaos if self.config.chaos else lambda: None)
        for _ in range(2):  # subscribers: [the node read from, the next seqno]
            self.at(0.05, partial(self._poll, [rng.randrange(len(self.nodes)), 1]))

    def at(self, delay: float, action: Callable[[], object]) -> None:
        self._count += 1
        heapq.heappush(self._queue, (self.now + delay, self._count, action))

    def run(self, until_s: float = float("inf")) -> Cluster:
        while self.step < self.config.steps and self._queue[0][0] <= until_s:
            self.now, _, action = heapq.heappop(self._queue)
            self.step += 1
            action()
            self.check()
        return self

    def note(self, text: str) -> None:
        self.trace.append(f"{self.step}@{self.now:.3f} {text}")

    def fail(self, what: str) -> None:
        where = f"seed {self.seed} step {self.step} (t={self.now:.3f}s)"
        replay = f"simulate({self.seed}, {self.config!r})"
        if self.config == SimConfig():
            replay = f"pytest tests/test_simulation.py --sim-seed {self.seed} -s, or {replay}"
        raise Violation(f"{where}: {what}\nreplay: {replay}\n  " + "\n  ".join(self.trace[-30:]))

    def link(self, a: int, b: int) -> bool:
        return self.nodes[a].up and self.nodes[b].up and frozenset((a, b)) not in self.cuts

    def send(self, src: int, dst: int, deliver: Callable[[], object]) -> None:
        rng = self.rng
        for _ in range(0 if rng.random() < self.loss else 2 if rng.random() < self.dup else 1):
            delay = rng.uniform(0.001, 0.01) if rng.random() < 0.9 else rng.uniform(0.01, 0.08)
            self.at(delay, lambda: self.link(src, dst) and deliver())

    def _tick(self, node: Node, inc: int, beat: int = 0) -> None:
        if not node.up or node.inc != inc:
            return
        if node.role == "replica" and (session := node.session) is not None and session.live:
            leader = self.nodes[session.leader]  # the follower's keepalive
            state = (leader.up, leader.inc, leader.role, leader.epoch)
            if state != (True, session.leader_inc, "leader", session.epoch):
                self._end_session(node, "the leader went away")
            elif not self.link(node.id, leader.id) and self.rng.random() < 0.5:
                self._end_session(node, "cut off")  # or else the stream outlives the cut
            else:
                self._ack(node)
                self._fetch(node, session)
        elif node.role == "leader":
            self._beat(node)
            for name in node.replicas.expire(self.now):
                self.note(f"{node.name}: {name} out of sync")
            if beat % 3 == 2 and (found := self._newer_leader(node)) is not None:
                self.note(f"{node.name} fenced by n{found[0]} epoch {found[1]}")
                self._step_down(node, *found)
        self.at(TICK_S, partial(self._tick, node, inc, beat + 1))

    def _lead(self, node: Node, epoch: int, commit: int) -> None:
        if epoch < self.max_epoch or (epoch == self.max_epoch and node.id != self.newest):
            self.stats["epoch_reused"] += 1
            if not self.config.expose_epoch_reuse:
                self.fail(f"{node.name} leads under epoch {epoch}, already taken")
        if epoch >= self.max_epoch:
            self.max_epoch, self.newest = epoch, node.id
        node.role, node.epoch, node.follow = "leader", epoch, node.id
        node.state_epoch, node.state_leader = max(node.state_epoch, epoch), node.id
        node.saved = (node.state_epoch, node.state_leader)  # awaited before it leads
        node.save_seq += 1
        node.saved_seq = node.save_seq
        insync = 1 if self.config.bug == "single-ack" else self.config.min_insync
        uncapped = self.config.bug == "uncapped-commit"
        node.tracker = (UncappedTracker if uncapped else CommitTracker)(insync, commit_seqno=commit)
        node.replicas = ReplicaSet(node.tracker, insync_timeout_s=INSYNC_S)
        node.streams, node.session = {}, None
        self.note(f"{node.name} leads epoch {epoch} last {node.store.last} commit {commit}")
        self._held(node)

    def _follow(self, node: Node, leader: int, epoch: int) -> None:
        """Node.follow (a leader steps down: fenced); node.epoch is left as it was."""
        node.role, node.follow, node.leader_commit = "replica", leader, 0
        above = epoch > node.state_epoch if self.config.bug == "follow-above" else True
        if epoch and epoch >= node.state_epoch and above:  # saved, awaited (own epoch too)
            node.state_epoch, node.state_leader = epoch, leader
            node.saved = (epoch, leader)
            node.save_seq += 1
            node.saved_seq = node.save_seq
        node.streams, node.session, node.failures, node.refused = {}, None, 0, {}
        self._open(node, node.inc)

    def _step_down(self, node: Node, leader: int, epoch: int) -> None:
        """Node.follow from the leader role: it stops leading, names the new leader
        and takes its epoch in memory, awaits its node.json save (peers may ask meanwhile:
        it reports no role), then follows."""
        node.role, node.streams, node.session = "stepping-down", {}, None
        node.follow = leader  # named before the save (an await); ROLE_UNSPECIFIED meanwhile
        if epoch >= node.state_epoch:
            node.state_epoch, node.state_leader = epoch, leader
        inc = node.inc
        self.at(self.rng.uniform(*SAVE_S), partial(self._stepped_down, node, inc, leader, epoch))

    def _stepped_down(self, node: Node, inc: int, leader: int, epoch: int) -> None:
        if node.up and node.inc == inc and node.role == "stepping-down":
            self._follow(node, leader, epoch)

    def _newer_leader(
        self, node: Node, *, or_same: bool = False, skip: frozenset[int] = frozenset()
    ) -> tuple[int, int] | None:
        """failover.newer_leader over the reachable peers' Status."""
        peers = [p for p in self.nodes if p is not node and self.link(node.id, p.id)]
        strict, running = self.config.bug == "strict-newer", self.config.bug == "running-only"
        skip = frozenset() if self.config.bug == "no-skip" else skip
        self_named = self.config.bug == "self-named"
        return newer_leader(node, peers, or_same=or_same, skip=skip, strict=strict,
                            running=running, self_named=self_named)  # fmt: skip

    def _save_soon(self, node: Node) -> None:
        """Follower._adopt's node.json save: not awaited, so a crash can come first."""
        state, inc = (node.state_epoch, node.state_leader), node.inc
        node.save_seq += 1
        self.at(self.rng.uniform(*SAVE_S), partial(self._saved, node, inc, state, node.save_seq))

    def _saved(self, node: Node, inc: int, state: tuple[int, int], seq: int) -> None:
        """state.save_state: a snapshot older than the one written is skipped."""
        if node.inc != inc:  # the crash came first
            return
        if seq > node.saved_seq or self.config.bug == "unordered-saves":
            node.saved, node.saved_seq = state, max(seq, node.saved_seq)

    def _produce(self) -> None:
        rng = self.rng
        self.at(rng.uniform(0.01, 0.08), self._produce)
        if not (leaders := [n for n in self.nodes if n.up and n.role == "leader"]):
            return
        node, quorum = rng.choice(leaders), rng.random() >= ACKS_LEADER
        if quorum and node.replicas.in_sync_copies() < node.tracker.min_insync:
            self.stats["unavailable"] += 1  # acks=quorum fails at once (acks=leader: stored)
            return
        self.produced += 1
        entries = [Entry(int(self.now * 1000) + 1, b"%d/%d/%d" % (self.seed, self.produced, i))
                   for i in range(rng.randint(1, 3))]  # fmt: skip
        batch = encode_batch(entries, base_seqno=node.store.last + 1, epoch=node.epoch)
        self._append(node, batch)
        self._multicast(node, 0, 0, batch)

    def _append(self, node: Node, batch: Batch) -> None:
        node.store.append(batch)
        if node.mode is FsyncMode.INTERVAL and not node.sync_due:
            node.sync_due, inc = True, node.inc
            self.at(FSYNC_S, lambda: self._sync(node, inc))
        self._held(node)

    def _sync(self, node: Node, inc: int) -> None:
        if node.up and node.inc == inc:
            node.sync_due, node.store.durable = False, node.store.last
            self._held(node)

    def _held(self, node: Node) -> None:
        if node.role != "leader":
            self._ack(node)
        elif node.tracker.held("", node.store.held()):
            self._beat(node)

    def _beat(self, node: Node) -> None:  # a heartbeat, also sent when the commit advances
        self._multicast(node, node.store.last, node.tracker.commit_seqno)

    def _multicast(self, node: Node, last: int, commit: int, batch: Batch | None = None) -> None:
        for peer in self.nodes:
            if peer is not node:
                args = (peer, node.id, node.epoch, last, commit, batch)
                self.send(node.id, peer.id, partial(self._on_stream, *args))

    def _on_hello(self, node: Node, replica: Node, sid: int, last_epoch: int) -> None:
        if node.role != "leader" or last_epoch > node.epoch:
            self.send(node.id, replica.id, lambda: self._refused(replica, sid))
            return
        state = node.replicas.connected(replica.name, replica.name, self.now)
        node.streams[replica.name, sid] = state.sessions
        answer = (node, node.inc, node.epoch, node.tracker.commit_seqno, node.store.last)
        self.send(node.id, replica.id, lambda: self._on_welcome(replica, sid, answer))

    def _on_ack(self, node: Node, name: str, sid: int, held: int, last: int, epoch: int) -> None:
        if node.role != "leader" or (name, sid) not in node.streams:
            return
        if not node.replicas.replicas[name].connected:
            self.stats["acks_lost_to_stale_close"] += 1  # see test_simulation
        held = min(held, node.store.last)
        if node.replicas.ack(name, durable_seqno=held, last_seqno=last, last_epoch=epoch,
                             now=self.now):  # fmt: skip
            self._beat(node)

    def _open(self, node: Node, inc: int) -> None:
        if not node.up or node.inc != inc or node.role != "replica" or node.session is not None:
            return
        self.sid += 1
        session = node.session = Session(self.sid, node.follow)
        leader, epoch = self.nodes[node.follow], node.store.last_epoch
        self.send(node.id, leader.id, lambda: self._on_hello(leader, node, session.sid, epoch))
        self.at(HELLO_S, lambda: self._refused(node, session.sid, live=False))

    def _refused(self, node: Node, sid: int, *, live: bool = True) -> None:
        if (session := node.session) and session.sid == sid and (live or not session.live):
            self._end_session(node, "refused" if live else "no answer")

    def _on_welcome(self, node: Node, sid: int, answer: tuple[Node, int, int, int, int]) -> None:
        (leader, inc, epoch, commit, last), session = answer, node.session
        if session is None or session.sid != sid or session.live:
            return
        # Reconciling (Fetches) is done at once, against the leader that answered, if it still is.
        if (leader.inc, leader.role, leader.epoch) != (inc, "leader", epoch):
            self._end_session(node, "the leader changed")
            return
        if stale_leader(node, leader.id, epoch) and self.config.bug != "no-stale-check":
            self.stats["stale_leader_refused"] += 1
            node.refused[leader.id] = epoch  # StaleLeader(address, epoch)
            self._end_session(node, f"{leader.name} is stale (epoch {epoch})")
            return
        node.epoch = epoch  # Follower._adopt
        if epoch > node.state_epoch or node.state_leader != leader.id:
            node.state_epoch, node.state_leader = max(node.state_epoch, epoch), leader.id
            self._save_soon(node)
        point, store = common_point(node.store, leader.store), node.store
        if point < store.last and self.config.bug != "no-reconcile":
            self.note(f"{node.name} truncates after {point} (had {store.last})")
            self.stats["truncations"] += 1
            store.truncate_after(point)
            node.checked = min(node.checked, point)
        ours_all, theirs = store.batches(1, store.last), leader.store.batches(1, store.last)
        if [bytes(b.data) for b in ours_all] != [bytes(b.data) for b in theirs]:
            self.fail(f"{node.name} reconciled with {leader.name}: its log is not a prefix")
        session.live, session.epoch, session.leader_inc = True, epoch, inc
        session.leader_last = last
        node.leader_commit, node.failures = max(node.leader_commit, commit), 0
        self.note(f"{node.name} session {sid} with {leader.name} epoch {epoch} commit {commit}")
        self._ack(node)
        self._fetch(node, session)

    def _end_session(self, node: Node, reason: str) -> None:
        if (session := node.session) is None:
            return
        node.session = None
        self.note(f"{node.name} session {session.sid} ended: {reason}")
        self._close_stream(node, session, quick=self.link(node.id, session.leader))
        if not node.up or node.role != "replica":
            return
        node.failures += 1
        skip = frozenset(a for a, e in node.refused.items() if e <= node.state_epoch)
        found = self._newer_leader(node, or_same=True, skip=skip)
        if found is not None and found[0] != node.follow:
            self.note(f"{node.name} follows n{found[0]} (epoch {found[1]})")
            node.follow, node.failures = found[0], 0
        delay = RETRY_S[max(0, min(node.failures, len(RETRY_S)) - 1)]
        self.at(delay, partial(self._open, node, node.inc))

    def _close_stream(self, node: Node, session: Session, *, quick: bool) -> None:
        """The leader's side ends (replica_closed, with the ReplicaSet session it opened)."""
        leader = self.nodes[session.leader]
        args = (leader, leader.inc, node.name, session.sid)
        self.at(self.rng.uniform(*((0.001, 0.01) if quick else STREAM_DEAD_S)),
                partial(self._closed, *args))  # fmt: skip

    def _closed(self, leader: Node, inc: int, name: str, sid: int) -> None:
        number = leader.streams.pop((name, sid), None) if leader.inc == inc else None
        if number is not None and leader.role == "leader":
            stale = self.config.bug == "stale-close"  # planted: by id, whatever the session
            leader.replicas.disconnected(name, None if stale else number)

    def _ack(self, node: Node) -> None:
        if (session := node.session) is None or not session.live:
            return
        leader, store, name, sid = self.nodes[session.leader], node.store, node.name, session.sid
        args = (store.held(), store.last, store.last_epoch)
        self.send(node.id, leader.id, lambda: self._on_ack(leader, name, sid, *args))

    def _fetch(self, node: Node, session: Session) -> None:
        first, last = node.store.last + 1, session.leader_last
        if last < first or self.now < session.fetch_until:
            return
        session.fetch_until = self.now + 0.1
        leader, sid = self.nodes[session.leader], session.sid
        self.send(node.id, leader.id, lambda: self._serve(leader, node, sid, first, last))

    def _serve(self, leader: Node, node: Node, sid: int, first: int, last: int) -> None:
        # Fetch, include_uncommitted: served by whichever incarnation has the address.
        batches = leader.store.batches(first, min(last, leader.store.last), max_bytes=600)
        self.send(leader.id, node.id, lambda: self._on_fetched(node, sid, batches))

    def _on_fetched(self, node: Node, sid: int, batches: list[Batch]) -> None:
        if (session := node.session) is None or session.sid != sid or not session.live:
            return
        session.fetch_until = -1.0
        for batch in batches:
            if batch.epoch > session.epoch:  # StreamReceiver.repaired: EpochChanged
                self._end_session(node, "a newer epoch in a Fetch")
                return
            self._receive(node, session, batch)
        self._fetch(node, session)

    def _on_stream(self, node: Node, src: int, epoch: int, last: int, commit: int,
                   batch: Batch | None = None) -> None:  # fmt: skip
        # Pages of the stream: a batch, or a heartbeat. Other senders' (node, epoch) are foreign.
        session = node.session
        if session is None or not session.live or (src, epoch) != (session.leader, session.epoch):
            return
        if batch is not None:
            self._receive(node, session, batch)
        else:
            session.leader_last = max(session.leader_last, last)
            node.leader_commit = max(node.leader_commit, commit)
            self._fetch(node, session)

    def _receive(self, node: Node, session: Session, batch: Batch | None) -> None:
        """StreamReceiver + appender: deliver in seqno order, once; a gap is fetched."""
        assert batch is not None
        if batch.base_seqno <= node.store.last:
            return
        if batch.base_seqno > node.store.last + 1:
            session.pending[batch.base_seqno] = batch
            session.leader_last = max(session.leader_last, batch.last_seqno)
            self._fetch(node, session)
            return
        leader = self.nodes[session.leader]
        same_leader = (session.leader_inc, "leader", session.epoch)  # still leading, same epoch
        while batch is not None:
            leading = (leader.inc, leader.role, leader.epoch) == same_leader
            if leading and not same(batch, leader.store.batch_at(batch.base_seqno)):
                self.fail(f"{node.name} appends batch {batch.base_seqno} its leader lacks")
            self._append(node, batch)
            batch = session.pending.pop(node.store.last + 1, None)
        session.pending = {b: v for b, v in session.pending.items() if b > node.store.last}

    def _chaos(self) -> None:
        rng, nodes = self.rng, self.nodes
        self.at(rng.uniform(0.05, 0.3), self._chaos)
        up = [n for n in nodes if n.up]
        down = [n for n in nodes if not n.up and self._may_restart(n)]
        candidate = self._candidate()
        weights = [len(up) > 1, 2.0 * bool(down), 0.6, bool(self.cuts), 3.0 * bool(candidate), 1]
        choice = rng.choices(["crash", "restart", "cut", "heal", "promote", "-"], weights)[0]
        if choice == "crash":
            leaders = [n for n in up if n.role == "leader"]
            self.crash(rng.choice(leaders if leaders and rng.random() < 0.5 else up))
        elif choice == "restart":
            self.restart(rng.choice(down))
        elif choice == "cut":
            self.cuts.add(cut := frozenset(rng.sample(range(len(nodes)), 2)))
            self.note(f"cut {sorted(cut)}")
        elif choice == "heal":
            self.cuts.discard(cut := rng.choice(sorted(self.cuts, key=sorted)))
            self.note(f"heal {sorted(cut)}")
        elif choice == "promote" and candidate is not None:
            self.promote(candidate)

    def crash(self, node: Node, *, power: bool | None = None) -> None:
        if power is None:  # under fsync=never: process crashes only
            power = node.mode is not FsyncMode.NEVER and self.rng.random() < 0.6
        if node.session is not None:  # a process crash resets the connection at once
            self._close_stream(node, node.session, quick=not power)
        node.up, node.inc, node.was, node.role = False, node.inc + 1, node.role, "down"
        node.session, node.streams, node.sync_due = None, {}, False
        lost, torn = node.store.crash(self.rng, power)
        node.checked = min(node.checked, node.store.last)
        self.stats["power_losses" if power else "crashes"] += 1
        self.stats["records_lost_in_crashes"] += lost
        if power and node.was == "leader" and node.mode is FsyncMode.INTERVAL:
            self.stats["leader_interval_power_losses"] += 1
        self.note(f"{node.name} crash ({'power' if power else 'process'}) lost {lost} torn {torn}")

    def _may_restart(self, node: Node) -> bool:  # a deposed leader waits until it is fenced
        if node.was != "leader" or node.id == self.newest or self.config.expose_epoch_reuse:
            return True
        newest = self.nodes[self.newest]
        cut = frozenset((node.id, newest.id)) in self.cuts
        return newest.up and newest.role == "leader" and not cut

    def restart(self, node: Node) -> None:
        node.up, node.leader_commit = True, 0
        node.state_epoch, node.state_leader = node.saved  # load_state
        node.epoch = max(node.state_epoch, node.store.last_epoch)
        self.stats["restarts"] += 1
        self.note(f"{node.name} restarts as {node.was} epoch {node.epoch} last {node.store.last}"
                  f" saved {node.saved}")  # fmt: skip
        self.at(self.rng.uniform(0, TICK_S), partial(self._tick, node, node.inc))
        if node.was != "leader":
            self._follow(node, node.follow, 0)
            return
        node.role = "starting"
        if (found := self._newer_leader(node)) is not None:
            self.note(f"{node.name} fenced at start by n{found[0]} epoch {found[1]}")
            self._follow(node, *found)
        else:
            commit = node.store.last if self.config.min_insync == 1 else 0
            self._lead(node, node.epoch + 1, commit)

    def _candidate(self) -> Node | None:
        """The operator's pick: any replica, once the newest leader is down, if every other
        survivor answers it (and, unless ``expose_epoch_reuse``, one knows the newest epoch)."""
        newest = self.nodes[self.newest]
        up = [n for n in self.nodes if n.up and n.role == "replica"]
        if newest.up or not up:
            return None
        pick = self.rng.choice(up)
        others = [n for n in self.nodes if n is not newest and n is not pick]
        if not all(self.link(pick.id, n.id) for n in others):
            return None  # a surviving replica is out of reach: the guarantee needs it
        seen = max(n.status_epoch() for n in [pick, *others])  # the survey's
        if seen < self.max_epoch and not self.config.expose_epoch_reuse:
            return None  # a dead leader took an epoch no one reachable reports
        return pick

    def promote(self, node: Node) -> bool:
        """failover.promote: survey (refused while a leader of our epoch or newer answers),
        stop following, make our log the most up-to-date one among the peers' (the highest
        last epoch, then the longest: reconcile with it, copy its rest), take an epoch above
        all, lead. False when refused."""
        peers = [p for p in self.nodes if p is not node and self.link(node.id, p.id)]
        if alive := [p for p in peers if p.role == "leader" and p.status_epoch() >= node.epoch]:
            self.stats["promotions_refused"] += 1
            self.note(f"{node.name} promote refused: {alive[0].name} leads")
            return False
        node.role = "promoting"
        self._end_session(node, "promoted")
        if self.config.bug == "extends-gather":
            gathered = self._gather_extending(node, peers)
        elif self.config.bug == "no-gather":
            gathered = 0
        else:
            gathered = self._gather(node, peers)
        epoch = max([node.epoch, node.state_epoch, *(p.status_epoch() for p in peers)]) + 1
        self.stats["promotions"] += 1
        self.note(f"{node.name} promoted: gathered {gathered}")
        node.role = "replica"  # its commit_seqno as a replica: what it knew committed
        self._lead(node, epoch, node.commit())
        return True

    def _gather(self, node: Node, peers: list[Node]) -> int:
        """failover._gather: Raft's up-to-date rule, then failover.reconcile and copy_from."""
        if not peers:
            return 0
        position, _, best = max((p.store.position(), p.name, p) for p in peers)
        if position <= node.store.position():
            return 0
        point = common_point(node.store, best.store)
        if point < node.store.last:
            self.note(f"{node.name} promote: truncates after {point} (had {node.store.last})")
            self.stats["promote_truncations"] += 1
            node.store.truncate_after(point)
            node.checked = min(node.checked, point)
        return self._copy(node, best)

    def _gather_extending(self, node: Node, peers: list[Node]) -> int:
        """The rule before the fix (planted bug ``extends-gather``): copy from the longest
        peer whose log extends ours (its batch at our last seqno is ours)."""
        for peer in sorted(peers, key=lambda p: -p.store.last):
            last = node.store.last
            if peer.store.last <= last:
                break
            if last and not same(node.store.batch_at(last), peer.store.batch_at(last)):
                continue
            return self._copy(node, peer)
        return 0

    def _copy(self, node: Node, peer: Node) -> int:
        batches = peer.store.batches(node.store.last + 1, peer.store.last)
        for batch in batches:
            self._append(node, batch)
        return sum(b.record_count for b in batches)

    def _poll(self, sub: list[int]) -> None:
        self.at(0.05, partial(self._poll, sub))
        node = self.nodes[sub[0]]
        if not node.up:
            sub[0] = self.rng.choice([n.id for n in self.nodes if n.up] or [sub[0]])
        elif (commit := node.commit()) >= sub[1]:
            self._check_node(node)
            for batch in node.store.batches(sub[1], commit, max_bytes=400):
                for record in batch.records(sub[1], commit):
                    i, key = record.seqno - 1, (batch.epoch, record.payload)
                    if record.seqno != sub[1]:
                        self.fail(f"subscriber on {node.name} got {record.seqno}, not {sub[1]}")
                    if i >= len(self.history) or self.history[i] != key:
                        self.fail(f"subscriber on {node.name} got a wrong {record.seqno}")
                    sub[1] += 1
                    self.stats["delivered"] += 1

    def _covers(self, node: Node, upto: int, what: str) -> None:
        """log[1..upto] equals the committed history (extending it); else a violation."""
        if node.checked >= upto:
            return
        if node.store.last < upto:
            self.fail(f"{what}: {node.name} holds up to {node.store.last}, needs {upto}")
        history, first = self.history, node.checked + 1
        for batch in node.store.batches(first, upto):
            for record in batch.records(first, upto):
                key, i = (batch.epoch, record.payload), record.seqno - 1
                if i == len(history):
                    history.append(key)
                elif history[i] != key:
                    self.fail(f"{what}: {node.name} seqno {i + 1} is {key}, was {history[i]}")
        node.checked = upto

    def _check_node(self, node: Node) -> None:
        commit = node.commit()
        if node.role == "leader":
            if commit > node.store.last:
                self.fail(f"{node.name} commit {commit} beyond its log {node.store.last}")
            self.acked = max(self.acked, commit)
        self._covers(node, commit, "committed prefixes disagree")

    def check(self) -> None:
        for node in [n for n in self.nodes if n.up]:
            self._check_node(node)
        leaders = [n for n in self.nodes if n.up and n.role == "leader"]
        top = [n for n in leaders if n.epoch == max(m.epoch for m in leaders)]
        if len(top) == 1:  # a stale leader gets fenced; of two with one epoch, neither leads
            self._covers(top[0], self.acked, "acknowledged record lost")


def simulate(seed: int, config: SimConfig | None = None) -> Cluster:
    return Cluster(seed, config).run()
