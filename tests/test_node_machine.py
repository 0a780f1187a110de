"""The node's state machine and rules on their own (no I/O, no clock): the role table, the
order of what a start, a fencing, a promotion and a replica session do, and the rules the
simulation cannot reach because the runtime's order already enforces them (a replica's
commit counts only once reconciled, NOT_LEADER before the quorum check, a replica's ack
never counted past the leader's log). ``scripts/mutate.py`` relies on these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import pytest

from boomscooter.errors import (
    LocalProtocolError,
    NotLeaderError,
    RequestError,
    ServerUnavailableError,
)
from boomscooter.node import machine as m
from boomscooter.node import rules
from boomscooter.node.core import StreamSession
from boomscooter.node.rules import PeerRole, PeerStatus
from boomscooter.node.state import NodeState

T = TypeVar("T")


@dataclass
class FakeLog:
    """The log's position, as the machine reads it."""

    first_seqno: int = 1
    last_seqno: int = 0
    durable_seqno: int = 0
    last_epoch: int = 0


def session(epoch: int, source_port: int = 7) -> StreamSession:
    return StreamSession(group="239.1.1.1", port=1, cast_id=epoch, page_size_bytes=1400,
                         epoch=epoch, interface_hint="", heartbeat_ms=50,
                         source_port=source_port)  # fmt: skip


def offer(
    epoch: int, commit: int = 0, last: int = 0, peers: tuple[str, ...] = ()
) -> m.SessionOffer:
    return m.SessionOffer(session=session(epoch), commit_seqno=commit, last_seqno=last,
                          first_seqno=1, min_insync=2, keepalive_ms=250,
                          replica_addresses=peers)  # fmt: skip


def node(
    *,
    address: str = "a",
    follow: str | None = None,
    min_insync: int = 1,
    log: FakeLog | None = None,
    state: NodeState | None = None,
) -> m.NodeMachine:
    config = m.MachineConfig(min_insync=min_insync, follow=follow, watch_interval_s=2.0)
    return m.NodeMachine(config, log or FakeLog(), state or NodeState(), address=address)


def role(machine: m.NodeMachine) -> m.Role:
    """The machine's role, read afresh (mypy narrows an attribute after a check)."""
    return machine.role


def only(commands: list[m.Command], kind: type[T]) -> list[T]:
    return [c for c in commands if isinstance(c, kind)]


def run(
    machine: m.NodeMachine, commands: list[m.Command], answers: dict[str, PeerStatus] | None = None
) -> list[m.Command]:
    """Carry out awaited commands at once (saves done, surveys answered); the rest back."""
    out: list[m.Command] = []
    queue = list(commands)
    while queue:
        command = queue.pop(0)
        if isinstance(command, m.SaveState) and command.wait:
            queue[:0] = machine.state_saved(command.version)
        elif isinstance(command, m.Survey):
            found = {a: s for a, s in (answers or {}).items() if a in command.addresses}
            queue[:0] = machine.surveyed(command.token, found, 0.0)
        elif isinstance(command, m.StartStream):
            queue[:0] = machine.stream_started(session(command.epoch))
        else:
            out.append(command)
        if isinstance(command, m.SaveState):
            out.append(command)
    return out


def leader(**kwargs: object) -> m.NodeMachine:
    machine = node(**kwargs)  # type: ignore[arg-type]
    run(machine, machine.start())
    assert role(machine) is m.Role.LEADER
    return machine


def test_the_role_table_refuses_what_it_does_not_list() -> None:
    machine = node()
    assert role(machine) is m.Role.STARTING
    with pytest.raises(LocalProtocolError, match="fenced while starting"):
        machine._step(m.Step.FENCED)
    for (before, step), after in m.TRANSITIONS.items():
        machine.role = before
        machine._step(step)
        assert role(machine) is after


def test_a_starting_leader_saves_its_epoch_before_it_leads() -> None:
    machine = node(log=FakeLog(last_seqno=5, durable_seqno=5, last_epoch=3), state=NodeState(3))
    (survey,) = only(machine.start(), m.Survey)
    assert survey.purpose is m.Purpose.START
    (save,) = machine.surveyed(survey.token, {}, 0.0)
    assert isinstance(save, m.SaveState) and save.wait
    assert (save.state.epoch, save.state.leader) == (4, "a")
    assert role(machine) is m.Role.STARTING  # not before the save is on disk
    (start,) = machine.state_saved(save.version)
    assert start == m.StartStream(4)
    assert role(machine) is m.Role.STARTING  # nor before its stream exists
    machine.stream_started(session(4))
    assert role(machine) is m.Role.LEADER and machine.epoch == 4
    assert machine.commit_seqno == 5  # min_insync 1: its own durable log is committed


def test_a_starting_leader_follows_a_newer_one_it_hears_of() -> None:
    machine = node(state=NodeState(2, ["b"], "a"))
    (survey,) = only(machine.start(), m.Survey)
    answers = {"b": PeerStatus(role=PeerRole.LEADER, epoch=3, leader_address="b")}
    commands = run(machine, machine.surveyed(survey.token, answers, 0.0))
    assert role(machine) is m.Role.REPLICA and machine.leader_address == "b"
    assert machine.state.epoch == 3 and machine.state.leader == "b"
    assert only(commands, m.StartFollowing) == [m.StartFollowing("b")]


def test_a_fenced_leader_stops_and_names_no_other_leader_until_it_follows() -> None:
    machine = leader(state=NodeState(1, ["b"], "a"))
    commands = machine.follow("b", 3)
    assert only(commands, m.StopStream) and role(machine) is m.Role.STEPPING_DOWN
    assert machine.status().role is PeerRole.NONE  # no peer takes it for a leader
    assert machine.status().leader_address == "b" and machine.status().epoch == 3
    (save,) = only(commands, m.SaveState)
    assert isinstance(save, m.SaveState) and save.wait and save.state.leader == "b"
    after = machine.state_saved(save.version)
    assert role(machine) is m.Role.REPLICA and only(after, m.StartFollowing)


def test_not_leader_comes_before_the_quorum_check() -> None:
    replica = node(follow="b", min_insync=3)
    run(replica, replica.start())
    with pytest.raises(NotLeaderError) as info:
        replica.check_produce(quorum=True)
    assert info.value.leader_address == ""  # no session with b yet: b is not named
    replica.session_offered("b", offer(1))
    replica.session_reconciled(0)
    with pytest.raises(NotLeaderError) as info:
        replica.check_produce(quorum=True)
    assert info.value.leader_address == "b"  # heard from within --leader-timeout
    replica.session_ended("no word from the leader for 2 s")
    with pytest.raises(NotLeaderError) as info:
        replica.check_produce(quorum=True)
    assert info.value.leader_address == ""  # lost: never a redirect to it
    machine = leader(min_insync=3)
    with pytest.raises(ServerUnavailableError, match="needs 3 in-sync copies, 1 available"):
        machine.check_produce(quorum=True)
    machine.check_produce(quorum=False)


def test_a_replica_counts_its_leaders_commit_only_once_reconciled() -> None:
    replica = node(follow="b", log=FakeLog(last_seqno=10, durable_seqno=10, last_epoch=1))
    run(replica, replica.start())
    replica.session_offered("b", offer(2, commit=4))
    assert replica.leader_commit_seen(8) == []  # its tail may be one the leader lacks
    assert replica.commit_seqno == 0
    moved = replica.session_reconciled(4)
    assert only(moved, m.CommitMoved) == [m.CommitMoved(4)]
    replica.leader_commit_seen(8)
    assert replica.commit_seqno == 8
    replica.leader_commit_seen(20)
    assert replica.commit_seqno == 10  # capped at what it stores


def test_a_replicas_ack_never_counts_past_the_leaders_log() -> None:
    machine = leader(min_insync=2, log=FakeLog(last_seqno=5, durable_seqno=5, last_epoch=1))
    machine.replica_opened("r", "r:1", 1, 0.0)
    machine.replica_acked("r", 2**64 - 1, 2**64 - 1, 1, 0.1)  # a claim beyond the log
    assert machine.replicas.replicas["r"].durable_seqno == 5
    assert machine.commit_seqno == 5


def test_a_leader_refuses_a_replica_of_a_newer_epoch() -> None:
    machine = leader(log=FakeLog(last_epoch=0))
    with pytest.raises(RequestError, match="this leader is stale"):
        machine.replica_opened("r", "r:1", machine.epoch + 1, 0.0)
    assert "r" not in machine.replicas.replicas


def test_a_replica_refuses_a_stale_leader_and_passes_it_over() -> None:
    replica = node(follow="b", state=NodeState(3, ["b", "c"], "c"))
    run(replica, replica.start())
    with pytest.raises(m.StaleLeader):
        replica.session_offered("b", offer(3))  # a second leader of epoch 3
    assert replica.refused == {"b": 3}
    ended = replica.session_ended("stale")
    (survey,) = only(ended, m.Survey)
    answers = {
        "b": PeerStatus(role=PeerRole.LEADER, epoch=3, leader_address="b"),
        "c": PeerStatus(role=PeerRole.LEADER, epoch=3, leader_address="c"),
    }
    (retry,) = replica.surveyed(survey.token, answers, 0.0)[-1:]
    assert retry == m.RetrySession("c", rules.RETRY_S[0])


def test_a_leader_checks_for_a_newer_one_every_watch_interval() -> None:
    machine = leader(state=NodeState(0, ["b"], ""))
    assert only(machine.tick(0.0), m.Survey) == []  # the first tick only sets the clock
    assert only(machine.tick(1.0), m.Survey) == []
    (survey,) = only(machine.tick(2.0), m.Survey)
    answers = {"b": PeerStatus(role=PeerRole.LEADER, epoch=machine.epoch + 1, leader_address="b")}
    machine.surveyed(survey.token, answers, 2.0)
    assert role(machine) is m.Role.STEPPING_DOWN


def test_a_promotion_is_refused_while_the_leader_answers_unless_forced() -> None:
    replica = node(follow="b", log=FakeLog(last_seqno=3, durable_seqno=3, last_epoch=1))
    run(replica, replica.start())
    alive = {"b": PeerStatus(role=PeerRole.LEADER, epoch=1, leader_address="b")}
    done = run(replica, replica.promote(0, force=False), alive)
    (refused,) = only(done, m.PromotionDone)
    assert isinstance(refused, m.PromotionDone) and refused.error is not None
    assert role(replica) is m.Role.REPLICA
    done = run(replica, replica.promote(0, force=True), alive)
    (promoted,) = only(done, m.PromotionDone)
    assert isinstance(promoted, m.PromotionDone) and promoted.result is not None
    assert role(replica) is m.Role.LEADER and replica.epoch == 2


def test_a_promotion_claims_an_epoch_fences_the_peers_then_gathers() -> None:
    replica = node(follow="b", log=FakeLog(last_seqno=9, durable_seqno=9, last_epoch=1))
    run(replica, replica.start())
    replica.session_offered("b", offer(1, peers=("c", "d")))
    (check_survey,) = only(replica.promote(0, force=False), m.Survey)
    with pytest.raises(RequestError, match="being promoted already"):
        replica.promote(0, force=False)
    heard = {
        "c": PeerStatus(role=PeerRole.REPLICA, epoch=1, leader_address="b"),
        "d": PeerStatus(role=PeerRole.REPLICA, epoch=4, leader_address="b"),
    }
    check = replica.surveyed(check_survey.token, heard, 0.0)  # the leader does not answer
    assert only(check, m.StopFollowing) and role(replica) is m.Role.PROMOTING
    (claim,) = only(check, m.SaveState)
    assert claim.wait and (claim.state.epoch, claim.state.leader) == (5, "a")  # above all
    assert replica.status().leader_address == "a"  # never "a replica of b at epoch 5"
    (fence,) = replica.state_saved(claim.version)
    assert isinstance(fence, m.Survey) and fence.fence_epoch == 5
    assert set(fence.addresses) == {"b", "c", "d"}  # the old leader too
    fenced = {
        "c": PeerStatus(role=PeerRole.REPLICA, epoch=5, leader_address="a", last_seqno=7,
                        last_epoch=2),
        "d": PeerStatus(role=PeerRole.REPLICA, epoch=5, leader_address="a", last_seqno=20,
                        last_epoch=1),
    }  # fmt: skip
    gather = only(replica.surveyed(fence.token, fenced, 0.0), m.Gather)
    assert gather == [m.Gather("c", 1, 7)]  # the highest last epoch, not the longest log
    done = run(replica, replica.gathered(3))
    assert role(replica) is m.Role.LEADER and replica.epoch == 5
    assert only(done, m.ForgetAfter)


def test_a_promotion_refuses_while_a_replica_that_may_hold_commits_is_silent() -> None:
    replica = node(follow="b")
    run(replica, replica.start())
    replica.session_offered("b", offer(1, peers=("c",)))  # min_insync 2 of a, b, c
    done = run(replica, replica.promote(0, force=False), {})
    (refused,) = only(done, m.PromotionDone)
    assert refused.error is not None and "only on c" in str(refused.error)
    assert role(replica) is m.Role.REPLICA and not only(done, m.SaveState)  # nothing claimed
    answered = {"c": PeerStatus(role=PeerRole.REPLICA, epoch=1, leader_address="b")}
    (check,) = only(replica.promote(0, force=False), m.Survey)
    claimed = replica.surveyed(check.token, answered, 0.0)
    assert only(claimed, m.SaveState) and role(replica) is m.Role.PROMOTING


def test_a_promotion_fails_when_a_fenced_peer_reports_a_rival_claim() -> None:
    replica = node(follow="b")
    run(replica, replica.start())
    (check,) = only(replica.promote(0, force=False), m.Survey)
    (claim,) = only(replica.surveyed(check.token, {}, 0.0), m.SaveState)
    (fence,) = replica.state_saved(claim.version)
    assert isinstance(fence, m.Survey)
    rival = {"c": PeerStatus(role=PeerRole.REPLICA, epoch=2, leader_address="z")}
    after = replica.surveyed(fence.token, rival, 0.0)
    (failed,) = only(after, m.PromotionDone)
    assert failed.error is not None and "claimed by another node" in str(failed.error)
    assert role(replica) is m.Role.REPLICA


def test_a_failed_promotion_follows_again() -> None:
    replica = node(follow="b")
    run(replica, replica.start())
    (check,) = only(replica.promote(0, force=False), m.Survey)
    commands = replica.surveyed(check.token, {}, 0.0)
    assert role(replica) is m.Role.PROMOTING and only(commands, m.SaveState)
    error = RequestError("a peer failed", code="UNAVAILABLE")
    after = replica.promotion_failed(error)
    assert role(replica) is m.Role.REPLICA
    (start, done) = after
    assert start == m.StartFollowing("b") and isinstance(done, m.PromotionDone)
    assert done.error is not None and "epoch 1 was claimed" in str(done.error)


def test_a_fenced_leader_stops_leading_and_follows_the_claimant() -> None:
    old = leader(address="b")
    assert old.epoch == 1
    commands = old.fence_asked(3, "a")
    assert role(old) is m.Role.STEPPING_DOWN and only(commands, m.StopStream)
    with pytest.raises(NotLeaderError):
        old.check_produce(quorum=False)
    (save,) = only(commands, m.SaveState)
    assert save.wait and (save.state.epoch, save.state.leader) == (3, "a")
    assert old.status().epoch == 3 and old.status().leader_address == "a"
    assert old.state_saved(save.version)[0] == m.StartFollowing("a")
    assert role(old) is m.Role.REPLICA


def test_a_fence_of_an_older_or_rival_claim_changes_nothing() -> None:
    replica = node(follow="b", state=NodeState(4, ["b"], "b"))
    run(replica, replica.start())
    assert replica.fence_asked(3, "a") == []  # older than what it knows
    assert replica.fence_asked(4, "a") == []  # its epoch, claimed by another node
    assert replica.status().epoch == 4 and role(replica) is m.Role.REPLICA
    assert only(replica.fence_asked(5, "a"), m.StopFollowing)


def test_node_state_snapshots_are_numbered_in_the_order_they_are_made() -> None:
    replica = node(follow="b")
    run(replica, replica.start())
    first = only(replica.session_offered("b", offer(1, peers=("c",))), m.SaveState)
    second = only(replica.follow("c", 2), m.SaveState)
    assert [s.version for s in first + second] == sorted(s.version for s in first + second)
    assert rules.newer_snapshot(2, 1) and not rules.newer_snapshot(1, 2)


def test_the_promotion_rules() -> None:
    # A peer accepts a claim above what it knows, or its own epoch's from its own leader.
    assert rules.accepts_fence(3, "a", 2, "b") and rules.accepts_fence(3, "a", 3, "a")
    assert not rules.accepts_fence(3, "a", 3, "b") and not rules.accepts_fence(2, "a", 3, "a")
    # A rival: a higher epoch, or the claimed one led by another node.
    mine = PeerStatus(role=PeerRole.REPLICA, epoch=3, leader_address="a")
    theirs = PeerStatus(role=PeerRole.REPLICA, epoch=3, leader_address="z")
    newer = PeerStatus(role=PeerRole.LEADER, epoch=4, leader_address="e")
    assert rules.fence_rival(3, "a", {"c": mine}) is None
    assert rules.fence_rival(3, "a", {"c": mine, "d": theirs}) == "d"
    assert rules.fence_rival(3, "a", {"e": newer}) == "e"
    # The old epoch stops: its leader fenced, or too few replicas left for its quorum.
    assert rules.old_epoch_stopped({"b"}, "b", {"c", "d"}, 3)
    assert rules.old_epoch_stopped({"c"}, "b", {"c"}, 2)
    assert not rules.old_epoch_stopped(set(), "b", {"c"}, 2)
    assert not rules.old_epoch_stopped({"c"}, "b", {"c"}, 1)  # the leader alone commits
    # Replicas that must answer (the promoted one included): meet every min_insync - 1.
    assert rules.promotion_quorum(2, 2) == 2 and rules.promotion_quorum(3, 2) == 3
    assert rules.promotion_quorum(2, 3) == 1 and rules.promotion_quorum(5, 1) == 1


def test_a_fenced_replica_retries_its_promoting_leader_without_backing_off() -> None:
    replica = node(follow="b")
    run(replica, replica.start())
    run(replica, replica.fence_asked(2, "c"))  # c claimed epoch 2 and is gathering
    promoting = {"c": PeerStatus(role=PeerRole.REPLICA, epoch=2, leader_address="c")}
    for _ in range(4):  # c refuses the session until it leads
        (survey,) = only(replica.session_ended("refused: not the leader"), m.Survey)
        (retry,) = replica.surveyed(survey.token, promoting, 0.0)
        assert retry == m.RetrySession("c", rules.RETRY_S[0])
    delays = []
    for _ in range(3):  # c silent: back off again
        (survey,) = only(replica.session_ended("refused"), m.Survey)
        (retry,) = replica.surveyed(survey.token, {}, 0.0)
        assert isinstance(retry, m.RetrySession)
        delays.append(retry.delay_s)
    assert delays == list(rules.RETRY_S[:3])


def test_a_node_fenced_while_starting_takes_no_epoch_of_its_own() -> None:
    """A restarting leader is fenced by a promotion while its start-up survey is out: when
    the survey returns it must not take an epoch (it would take the claimed one)."""
    starting = node(state=NodeState(1, ["b", "c"], "a"))
    (survey,) = only(starting.start(), m.Survey)
    (save,) = only(starting.fence_asked(2, "c"), m.SaveState)
    assert starting.surveyed(survey.token, {}, 0.0) == []  # no answer names a leader
    assert starting.state_saved(save.version)[0] == m.StartFollowing("c")
    assert role(starting) is m.Role.REPLICA and starting.state.epoch == 2
