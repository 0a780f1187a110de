"""A seeded deterministic simulation of replication (TigerBeetle's VOPR, scaled down), running
the production node: each node is a :class:`~boomscooter.node.machine.NodeMachine`, with the
production rules, commit rule, replica set and common-point search.

One thread, one fake clock, one event queue. The simulation is the machines' runtime: it
feeds them events (a tick, a peer's Status, a replica's ack, a leader's offer, a save done)
and carries out their commands with delays — ``node.json`` saves that take time (and are
lost in a crash when not awaited), surveys of the reachable peers, streams, sessions, the
promotion's gather. The network drops, duplicates, delays (reorders) and cuts; a leader
notices a stream that died in a cut late, then closes that session.
:class:`~sim_nodes.CrashLog` keeps the durable prefix under fsync always/interval/never: a
process crash keeps what was written, a power loss the durable prefix, some whole undurable
batches and maybe a torn one recovery cuts. Nodes crash and restart (a leader without
``--leader``, a replica with the leader it followed); producers ask for acks=quorum or
acks=leader; the operator promotes a replica while the leader is down.

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

from boomscooter.errors import BoomscooterError, RequestError
from boomscooter.node import machine as m
from boomscooter.node import rules
from boomscooter.node.core import StreamSession
from boomscooter.storage.api import FsyncMode
from boomscooter.storage.batch import Batch, Entry, encode_batch

from support import sim_nodes
from support.sim_nodes import (
    ACKS_LEADER,
    FSYNC_S,
    HELLO_S,
    SAVE_S,
    STREAM_DEAD_S,
    SURVEY_S,
    TICK_S,
    CrashLog,
    Node,
    Session,
    SimConfig,
    Violation,
    common_point,
    index_of,
    planted,
    same,
)

__all__ = ["Cluster", "CrashLog", "SimConfig", "Violation", "simulate"]


class Cluster:
    def __init__(
        self, seed: int, config: SimConfig | None = None, *, modes: list[FsyncMode] | None = None
    ) -> None:
        self.seed, self.config = seed, config or SimConfig()
        self.rng = rng = random.Random(seed)
        self.now, self.step, self._count = 0.0, 0, 0
        self._queue: list[tuple[float, int, Callable[[], object]]] = []
        drawn = [rng.choice(list(FsyncMode)) for _ in range(self.config.replicas + 1)]
        self.nodes = [Node(i, mode, self.config) for i, mode in enumerate(modes or drawn)]
        self.loss, self.dup = rng.choice([0.0, 0.02, 0.1]), rng.choice([0.0, 0.05])
        self.cuts: set[frozenset[int]] = set()
        self.history: list[tuple[int, bytes]] = []  # committed (epoch, payload) by seqno - 1
        self.acked = self.produced = self.sid = 0  # acked: the highest commit a leader reached
        self.max_epoch, self.newest = 0, 0  # the highest epoch taken, and its taker
        self.save_delay: Callable[[Node, m.SaveState], float] = lambda node, save: self.rng.uniform(
            *SAVE_S
        )
        self.trace: list[str] = []
        self.stats: Counter[str] = Counter()
        self.producing = True  # a scenario may stop the producers
        with planted(self.config.bug):
            for node in self.nodes:
                node.leader_flag = None if node.id == 0 else 0  # replicas: `--leader n0`
                node.machine = node.new_machine()
            for node in self.nodes:
                self.at(rng.uniform(0, TICK_S), partial(self._tick, node, 0))
                self.execute(node, node.machine.start())
        self.at(0.01, self._produce)
        self.at(0.2, self._chaos if self.config.chaos else lambda: None)
        for _ in range(2):  # subscribers: [the node read from, the next seqno]
            self.at(0.05, partial(self._poll, [rng.randrange(len(self.nodes)), 1]))

    # -- the event queue ----------------------------------------------------------------------

    def at(self, delay: float, action: Callable[[], object]) -> None:
        self._count += 1
        heapq.heappush(self._queue, (self.now + delay, self._count, action))

    def run(self, until_s: float = float("inf")) -> Cluster:
        with planted(self.config.bug):
            while self.step < self.config.steps and self._queue[0][0] <= until_s:
                self.now, _, action = heapq.heappop(self._queue)
                self.step += 1
                action()
                self.check()
        return self

    def run_until(self, done: Callable[[], bool], limit_s: float = 2.0) -> bool:
        """Run event by event until ``done()`` (False when ``limit_s`` passed first)."""
        until = self.now + limit_s
        while not done() and self._queue[0][0] <= until:
            self.run(until_s=self._queue[0][0])
        return done()

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

    # -- the runtime: carrying out a machine's commands ---------------------------------------

    def execute(self, node: Node, commands: list[m.Command]) -> None:
        """Carry out ``commands`` in order; an awaited one resumes the rest when it ends."""
        inc = node.inc
        for i, command in enumerate(commands):
            rest = commands[i + 1 :]
            if isinstance(command, m.SaveState):
                self._save(node, command, rest)
                if command.wait:
                    return
            elif isinstance(command, m.Survey):
                delay = self.rng.uniform(*SURVEY_S)
                asked = self._fence if command.fence_epoch else self._surveyed
                self.at(delay, partial(asked, node, inc, command, rest))
                return
            elif isinstance(command, m.Gather):
                self.at(0.005, partial(self._gather, node, inc, command, rest))
                return
            else:
                self._carry_out(node, command)

    def _resume(self, node: Node, inc: int, more: list[m.Command], rest: list[m.Command]) -> None:
        if node.up and node.inc == inc:
            self.execute(node, [*more, *rest])

    def _carry_out(self, node: Node, command: m.Command) -> None:
        if isinstance(command, m.Note):
            self.note(f"{node.name} {command.event} {command.fields}")
        elif isinstance(command, m.StartStream):
            self._started_leading(node, command.epoch)
        elif isinstance(command, m.CommitMoved) and node.machine.is_leader:
            self._beat(node)
        elif isinstance(command, m.StartFollowing):
            self._end_session(node, "following another", quiet=True)
            self.at(0.0, partial(self._open, node, node.inc))
        elif isinstance(command, m.StopFollowing):
            self._end_session(node, "stopped following", quiet=True)
        elif isinstance(command, m.RetrySession):
            self.at(command.delay_s, partial(self._open, node, node.inc))
        elif isinstance(command, m.StopStream):
            node.streams = {}
        elif isinstance(command, m.PromotionDone):
            node.promotion = command
            self.stats["promotions" if command.error is None else "promotions_refused"] += 1

    def _save(self, node: Node, save: m.SaveState, rest: list[m.Command]) -> None:
        """A node.json save, written after a delay (state.save_state: a snapshot older than
        the one written is skipped); an awaited one resumes the node, one that is not is
        lost if the node crashes first."""
        inc = node.inc

        def written() -> None:
            if node.inc != inc:  # the crash came first
                return
            if rules.newer_snapshot(save.version, node.saved_version):
                node.saved, node.saved_version = save.state, max(save.version, node.saved_version)
            if save.wait and node.up:
                self._resume(node, inc, node.machine.state_saved(save.version), rest)

        self.at(self.save_delay(node, save), written)

    def _surveyed(self, node: Node, inc: int, survey: m.Survey, rest: list[m.Command]) -> None:
        """The Status of the peers reachable now (a unary call over TCP: a peer in reach
        answers; the operator's care for unique epochs counts on that)."""
        if not node.up or node.inc != inc:
            return
        answers = {}
        for address in survey.addresses:
            peer = self.nodes[index_of(address)]
            if self.link(node.id, peer.id):
                answers[address] = peer.machine.status()
        self._resume(node, inc, node.machine.surveyed(survey.token, answers, self.now), rest)

    def _fence(self, node: Node, inc: int, survey: m.Survey, rest: list[m.Command]) -> None:
        """peers.fence: each peer in reach carries out the claim; its Status comes back once
        its save is on disk (a peer that crashed meanwhile, or was cut off, does not
        answer; one that refused the claim answers at once)."""
        if not node.up or node.inc != inc:
            return
        told: list[tuple[Node, int, bool]] = []
        for address in survey.addresses:
            peer = self.nodes[index_of(address)]
            if peer.up and self.link(node.id, peer.id):
                commands = peer.machine.fence_asked(survey.fence_epoch, node.name)
                told.append((peer, peer.inc, bool(commands)))
                self.execute(peer, commands)

        def answered() -> None:
            if not node.up or node.inc != inc:
                return
            answers = {
                peer.name: peer.machine.status()
                for peer, peer_inc, accepted in told
                if peer.up and peer.inc == peer_inc and self.link(node.id, peer.id)
                and (not accepted or peer.saved.epoch >= survey.fence_epoch)
            }  # fmt: skip
            self._resume(node, inc, node.machine.surveyed(survey.token, answers, self.now), rest)

        self.at(SAVE_S[1] + 0.005, answered)

    def _gather(self, node: Node, inc: int, gather: m.Gather, rest: list[m.Command]) -> None:
        """peers.gather: reconcile with the source, copy what it holds beyond."""
        if not node.up or node.inc != inc:
            return
        source = self.nodes[index_of(gather.source)]
        if not self.link(node.id, source.id):
            error = RequestError("promotion failed, still a replica: a peer failed",
                                 code="UNAVAILABLE")  # fmt: skip
            self._resume(node, inc, node.machine.promotion_failed(error), rest)
            return
        point = sim_nodes.gather_point(node.store, source.store)
        if point < node.store.last:
            self.note(f"{node.name} promote: truncates after {point} (had {node.store.last})")
            self.stats["promote_truncations"] += 1
            self._truncate(node, point)
        records = 0
        for batch in source.store.batches(node.store.last + 1, gather.last_seqno):
            if batch.base_seqno == node.store.last + 1:  # as copy_from: what continues ours
                self._append(node, batch)
                records += batch.record_count
        if node.mode is not FsyncMode.NEVER:  # the runtime syncs what it gathered
            node.store.durable = node.store.last
        self._resume(node, inc, node.machine.gathered(records), rest)

    def _truncate(self, node: Node, point: int) -> None:
        node.store.truncate_after(point)
        node.machine.truncated(point)
        node.checked = min(node.checked, point)

    def _started_leading(self, node: Node, epoch: int) -> None:
        """The machine leads ``epoch`` (its state saved): no epoch leads twice."""
        if epoch < self.max_epoch or (epoch == self.max_epoch and node.id != self.newest):
            self.stats["epoch_reused"] += 1
            if not self.config.expose_epoch_reuse:
                self.fail(f"{node.name} leads under epoch {epoch}, already taken")
        if epoch >= self.max_epoch:
            self.max_epoch, self.newest = epoch, node.id
        node.streams, node.session = {}, None
        session = StreamSession(group="sim", port=0, cast_id=epoch, page_size_bytes=0,
                                epoch=epoch, interface_hint="", heartbeat_ms=0,
                                source_port=node.id)  # fmt: skip
        self.execute(node, node.machine.stream_started(session))
        if node.machine.is_leader:
            self._beat(node)

    # -- ticks, producers, the stream ---------------------------------------------------------

    def _tick(self, node: Node, inc: int) -> None:
        if not node.up or node.inc != inc:
            return
        self.at(TICK_S, partial(self._tick, node, inc))
        session = node.session
        if node.role == "replica" and session is not None and session.live:
            leader = self.nodes[session.leader]  # the follower's keepalive
            state = (leader.up, leader.inc, leader.role, leader.epoch)
            if state != (True, session.leader_inc, "leader", session.epoch):
                self._end_session(node, "the leader went away")
            elif not self.link(node.id, leader.id) and self.rng.random() < 0.5:
                self._end_session(node, "cut off")  # or else the stream outlives the cut
            else:
                self._ack(node)
                self._fetch(node, session)
        elif node.machine.is_leader:
            self._beat(node)
            self._update_replicas(node)
        self.execute(node, node.machine.tick(self.now))

    def _update_replicas(self, node: Node) -> None:
        """The leader's Replicate responses (at least every UPDATE_S): its commit and its
        replicas' addresses, on every open session."""
        commit, addresses = node.tracker.commit_seqno, tuple(node.replicas.addresses())
        for name, sid in list(node.streams):
            replica = self.nodes[index_of(name)]
            args = (replica, node.id, sid, commit, addresses)
            self.send(node.id, replica.id, partial(self._on_update, *args))

    def _on_update(
        self, node: Node, src: int, sid: int, commit: int, addresses: tuple[str, ...]
    ) -> None:
        session = node.session
        if session is None or session.sid != sid or not session.live or session.leader != src:
            return
        self.execute(node, node.machine.session_update(commit, addresses))

    def _produce(self) -> None:
        rng = self.rng
        self.at(rng.uniform(0.01, 0.08), self._produce)
        leaders = [n for n in self.nodes if n.up and n.machine.is_leader]
        if not self.producing or not leaders:
            return
        node, quorum = rng.choice(leaders), rng.random() >= ACKS_LEADER
        try:
            node.machine.check_produce(quorum=quorum)
        except BoomscooterError:
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
        self.execute(node, node.machine.durable_moved(node.store.held()))
        if not node.machine.is_leader:
            self._ack(node)

    def _beat(self, node: Node) -> None:  # a heartbeat, also sent when the commit advances
        self._multicast(node, node.store.last, node.tracker.commit_seqno)

    def _multicast(self, node: Node, last: int, commit: int, batch: Batch | None = None) -> None:
        for peer in self.nodes:
            if peer is not node:
                args = (peer, node.id, node.epoch, last, commit, batch)
                self.send(node.id, peer.id, partial(self._on_stream, *args))

    # -- Replicate sessions -------------------------------------------------------------------

    def _open(self, node: Node, inc: int) -> None:
        if not node.up or node.inc != inc or node.role != "replica" or node.session is not None:
            return
        leader_index = node.follow
        if leader_index < 0:
            self.execute(node, node.machine.session_ended("no leader known"))
            return
        self.sid += 1
        session = node.session = Session(self.sid, leader_index)
        leader, epoch = self.nodes[leader_index], node.store.last_epoch
        self.send(node.id, leader.id, lambda: self._on_hello(leader, node, session.sid, epoch))
        self.at(HELLO_S, lambda: self._refused(node, session.sid, live=False))

    def _on_hello(self, node: Node, replica: Node, sid: int, last_epoch: int) -> None:
        """The leader's side of a new session (replicate.replicate)."""
        try:
            state, commands = node.machine.replica_opened(
                replica.name, replica.name, last_epoch, self.now
            )
        except BoomscooterError:
            self.send(node.id, replica.id, lambda: self._refused(replica, sid))
            return
        node.streams[replica.name, sid] = state.sessions
        self.execute(node, commands)
        machine = node.machine
        assert machine.session is not None
        offer = m.SessionOffer(
            session=machine.session,
            commit_seqno=machine.commit_seqno,
            last_seqno=node.store.last,
            first_seqno=1,
            min_insync=machine.tracker.min_insync,
            keepalive_ms=rules.keepalive_ms(machine.config.insync_timeout_s),
            replica_addresses=tuple(machine.replicas.addresses()),
        )
        answer = (node, node.inc, node.epoch, offer)
        self.send(node.id, replica.id, lambda: self._on_welcome(replica, sid, answer))

    def _refused(self, node: Node, sid: int, *, live: bool = True) -> None:
        if (session := node.session) and session.sid == sid and (live or not session.live):
            self._end_session(node, "refused" if live else "no answer")

    def _on_welcome(
        self, node: Node, sid: int, answer: tuple[Node, int, int, m.SessionOffer]
    ) -> None:
        """The follower's side: the machine checks the leader, the log is reconciled (at
        once, against the leader that answered, if it still is), then the session counts."""
        (leader, inc, epoch, offer), session = answer, node.session
        if session is None or session.sid != sid or session.live:
            return
        if (leader.inc, leader.role, leader.epoch) != (inc, "leader", epoch):
            self._end_session(node, "the leader changed")
            return
        try:
            commands = node.machine.session_offered(leader.name, offer)
        except m.StaleLeader:
            self.stats["stale_leader_refused"] += 1
            self._end_session(node, f"{leader.name} is stale (epoch {epoch})")
            return
        self.execute(node, commands)
        point, store = common_point(node.store, leader.store), node.store
        if point < store.last:
            self.note(f"{node.name} truncates after {point} (had {store.last})")
            self.stats["truncations"] += 1
            self._truncate(node, point)
        ours_all, theirs = store.batches(1, store.last), leader.store.batches(1, store.last)
        if [bytes(b.data) for b in ours_all] != [bytes(b.data) for b in theirs]:
            self.fail(f"{node.name} reconciled with {leader.name}: its log is not a prefix")
        session.live, session.epoch, session.leader_inc = True, epoch, inc
        session.leader_last = offer.last_seqno
        self.note(f"{node.name} session {sid} with {leader.name} epoch {epoch} "
                  f"commit {offer.commit_seqno}")  # fmt: skip
        self.execute(node, node.machine.session_reconciled(offer.commit_seqno))
        self._ack(node)
        self._fetch(node, session)

    def _end_session(self, node: Node, reason: str, *, quiet: bool = False) -> None:
        """The follower's session ends (quiet: the machine ended it itself)."""
        if (session := node.session) is None:
            return
        node.session = None
        self.note(f"{node.name} session {session.sid} ended: {reason}")
        self._close_stream(node, session, quick=self.link(node.id, session.leader))
        if node.up and not quiet:
            self.execute(node, node.machine.session_ended(reason))

    def _close_stream(self, node: Node, session: Session, *, quick: bool) -> None:
        """The leader's side ends (replica_closed, with the ReplicaSet session it opened)."""
        leader = self.nodes[session.leader]
        args = (leader, leader.inc, node.name, session.sid)
        self.at(self.rng.uniform(*((0.001, 0.01) if quick else STREAM_DEAD_S)),
                partial(self._closed, *args))  # fmt: skip

    def _closed(self, leader: Node, inc: int, name: str, sid: int) -> None:
        number = leader.streams.pop((name, sid), None) if leader.inc == inc else None
        if number is not None and leader.machine.is_leader:
            self.execute(leader, leader.machine.replica_closed(name, number))

    def _ack(self, node: Node) -> None:
        if (session := node.session) is None or not session.live:
            return
        leader, store, name, sid = self.nodes[session.leader], node.store, node.name, session.sid
        args = (store.held(), store.last, store.last_epoch)
        self.send(node.id, leader.id, lambda: self._on_ack(leader, name, sid, *args))

    def _on_ack(self, node: Node, name: str, sid: int, held: int, last: int, epoch: int) -> None:
        if not node.machine.is_leader or (name, sid) not in node.streams:
            return
        replica = node.replicas.replicas.get(name)
        if replica is not None and not replica.connected:
            self.stats["acks_lost_to_stale_close"] += 1  # see test_simulation
        self.execute(node, node.machine.replica_acked(name, held, last, epoch, self.now))

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
            self.execute(node, node.machine.leader_commit_seen(commit))
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
        self.execute(node, node.machine.log_grew())

    # -- faults and the operator --------------------------------------------------------------

    def _chaos(self) -> None:
        rng, nodes = self.rng, self.nodes
        self.at(rng.uniform(0.05, 0.3), self._chaos)
        up = [n for n in nodes if n.up]
        down = [n for n in nodes if not n.up and self._may_restart(n)]
        candidate, switch = self._candidate(), self._switchover_pick()
        weights = [len(up) > 1, 2.0 * bool(down), 0.6, bool(self.cuts), 3.0 * bool(candidate),
                   0.4 * bool(switch), 1]  # fmt: skip
        actions = ["crash", "restart", "cut", "heal", "promote", "switchover", "-"]
        choice = rng.choices(actions, weights)[0]
        if choice == "crash":
            leaders = [n for n in up if n.role == "leader"]
            self.crash(rng.choice(leaders if leaders and rng.random() < 0.5 else up))
        elif choice == "restart":
            self._restart(rng.choice(down))
        elif choice == "cut":
            self.cuts.add(cut := frozenset(rng.sample(range(len(nodes)), 2)))
            self.note(f"cut {sorted(cut)}")
        elif choice == "heal":
            self.cuts.discard(cut := rng.choice(sorted(self.cuts, key=sorted)))
            self.note(f"heal {sorted(cut)}")
        elif choice == "promote" and candidate is not None:
            self._promote(candidate)
        elif choice == "switchover" and switch is not None:
            self.stats["switchovers"] += 1
            self._promote(switch, force=True)

    def crash(self, node: Node, *, power: bool | None = None) -> None:
        with planted(self.config.bug):
            if power is None:  # under fsync=never: process crashes only
                power = node.mode is not FsyncMode.NEVER and self.rng.random() < 0.6
            if node.session is not None:  # a process crash resets the connection at once
                self._close_stream(node, node.session, quick=not power)
            node.was = "leader" if node.machine.is_leader else node.role
            # A restart takes the command line it was started with: a replica its leader.
            if node.role in ("replica", "promoting") and node.follow >= 0:
                node.leader_flag = node.follow
            elif node.was in ("leader", "stepping-down"):
                node.leader_flag = None
            node.up, node.inc = False, node.inc + 1
            node.session, node.streams, node.sync_due = None, {}, False
            lost, torn = node.store.crash(self.rng, power)
            node.checked = min(node.checked, node.store.last)
            self.stats["power_losses" if power else "crashes"] += 1
            self.stats["records_lost_in_crashes"] += lost
            if power and node.was == "leader" and node.mode is FsyncMode.INTERVAL:
                self.stats["leader_interval_power_losses"] += 1
            self.note(f"{node.name} crash ({'power' if power else 'process'}) lost {lost} "
                      f"torn {torn}")  # fmt: skip

    def _may_restart(self, node: Node) -> bool:  # a deposed leader waits until it can be fenced
        if node.leader_flag is not None or node.id == self.newest:
            return True
        if self.config.expose_epoch_reuse:
            return True
        newest = self.nodes[self.newest]
        cut = frozenset((node.id, newest.id)) in self.cuts
        known = newest.name in node.saved.peers  # else its start asks no one who knows
        return newest.up and newest.role == "leader" and not cut and known

    def _restart(self, node: Node) -> None:
        node.up, node.promotion = True, None
        node.saved_version = 0  # a new process: state.save_state's order starts again
        node.machine = node.new_machine()
        self.stats["restarts"] += 1
        self.note(f"{node.name} restarts as {node.was} epoch {node.epoch} last {node.store.last}"
                  f" saved {node.saved_pair}")  # fmt: skip
        self.at(self.rng.uniform(0, TICK_S), partial(self._tick, node, node.inc))
        self.execute(node, node.machine.start())

    def restart(self, node: Node) -> None:
        """Restart ``node`` (a scenario's step) and run until it has started (it leads or
        follows: a start awaits a survey and a state save)."""
        with planted(self.config.bug):
            self._restart(node)
            self.run_until(lambda: node.role != "starting")

    def _candidate(self) -> Node | None:
        """The operator's pick: any replica, once the newest leader is down, that knows every
        other survivor (from its leader) and reaches them (and, unless ``expose_epoch_reuse``,
        one of them knows the newest epoch)."""
        newest = self.nodes[self.newest]
        up = [n for n in self.nodes if n.up and n.role == "replica"]
        if newest.up or not up:
            return None
        pick = self.rng.choice(up)
        others = [n for n in self.nodes if n is not newest and n is not pick]
        if not all(self.link(pick.id, n.id) for n in others):
            return None  # a surviving replica is out of reach: the guarantee needs it
        known = {*pick.machine.state.peers, *pick.machine.peers}
        if not all(n.name in known for n in others):
            return None  # it would not ask them: a replica that never joined the cluster
        seen = max(n.status_epoch() for n in [pick, *others])  # the survey's
        if seen < self.max_epoch and not self.config.expose_epoch_reuse:
            return None  # a dead leader took an epoch no one reachable reports
        return pick

    def _switchover_pick(self) -> Node | None:
        """The operator's pick for a forced switchover (``promote --force``) while the
        newest leader leads: a replica live with it that knows and reaches every node."""
        newest = self.nodes[self.newest]
        if not (newest.up and newest.role == "leader"):
            return None
        live = [n for n in self.nodes if n.up and n.role == "replica" and n.session is not None
                and n.session.live]  # fmt: skip
        if not live:
            return None
        pick = self.rng.choice(live)
        others = [n for n in self.nodes if n is not pick]
        known = {*pick.machine.state.peers, *pick.machine.peers}
        if all(n.up and self.link(pick.id, n.id) and n.name in known for n in others):
            return pick
        return None

    def _promote(self, node: Node, *, force: bool = False) -> None:
        try:
            commands = node.machine.promote(0, force=force)
        except RequestError:
            self.stats["promotions_refused"] += 1
            return
        node.promotion = None
        self.note(f"{node.name} promote asked")
        self.execute(node, commands)

    def promote(self, node: Node, *, force: bool = False) -> bool:
        """The operator's ``boomscooter promote`` (a scenario's step): run until it is
        done; True when the node leads."""
        with planted(self.config.bug):
            self._promote(node, force=force)
            self.run_until(lambda: node.promotion is not None)
            return node.promotion is not None and node.promotion.error is None

    # -- subscribers and invariants -----------------------------------------------------------

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
        if node.machine.is_leader:
            if commit > node.store.last:
                self.fail(f"{node.name} commit {commit} beyond its log {node.store.last}")
            self.acked = max(self.acked, commit)
        self._covers(node, commit, "committed prefixes disagree")

    def check(self) -> None:
        for node in [n for n in self.nodes if n.up]:
            self._check_node(node)
        leaders = [n for n in self.nodes if n.up and n.machine.is_leader]
        top = [n for n in leaders if n.epoch == max(m.epoch for m in leaders)]
        if len(top) == 1:  # a stale leader gets fenced; of two with one epoch, neither leads
            self._covers(top[0], self.acked, "acknowledged record lost")


def simulate(seed: int, config: SimConfig | None = None) -> Cluster:
    return Cluster(seed, config).run()
