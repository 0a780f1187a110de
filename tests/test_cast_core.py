"""The cast core: scheduling, aggregation and suppression of repairs, lifecycle."""

from __future__ import annotations

import pytest

from bootcast.cast import CastCore, CastState, NextPage, StopReason
from bootcast.errors import LocalProtocolError
from bootcast.nack import NackReport


def make(pages: int = 10, idle_loops: int = 3, loop_s: float = 1.0) -> CastCore:
    return CastCore(cast_id=1, pages=pages, idle_loops=idle_loops, loop_s=loop_s, now=0.0)


def drain(core: CastCore, now: float, limit: int = 10_000) -> list[NextPage]:
    out: list[NextPage] = []
    while len(out) < limit and (p := core.next_page(now)) is not None:
        out.append(p)
    return out


def test_spec_client_gets_an_endless_carousel_in_order() -> None:
    core = make(pages=4, idle_loops=100)
    core.join("a", 0.0, nack_capable=False)
    sent = [core.next_page(0.0) for _ in range(10)]
    assert [p.index for p in sent if p] == [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
    assert not any(p.repair for p in sent if p)


def test_nack_client_gets_one_pass_then_the_cast_pauses() -> None:
    core = make(pages=5)
    core.join("a", 0.0, nack_capable=True)
    assert [p.index for p in drain(core, 0.0)] == [1, 2, 3, 4, 5]
    assert core.paused


def test_late_joiner_gets_the_pass_from_where_it_came_in() -> None:
    core = make(pages=6)
    core.join("a", 0.0, nack_capable=True)
    first = [core.next_page(0.0) for _ in range(4)]
    assert [p.index for p in first if p] == [1, 2, 3, 4]
    core.join("b", 0.0, nack_capable=True)
    assert [p.index for p in drain(core, 0.0)] == [5, 6, 1, 2, 3, 4]


def test_repairs_jump_the_carousel_queue() -> None:
    core = make(pages=100)
    core.join("a", 0.0, nack_capable=True)
    drain(core, 0.0, limit=50)
    out = core.nack("a", NackReport(missing=[(3, 4), (10, 10)]), 1.0)
    assert out is not None and out.queued == 3
    nxt = [core.next_page(1.0) for _ in range(4)]
    assert [(p.index, p.repair) for p in nxt if p] == [
        (3, True),
        (4, True),
        (10, True),
        (51, False),
    ]


def test_fifty_clients_missing_one_page_cause_one_resend() -> None:
    core = make(pages=20)
    for i in range(50):
        core.join(f"c{i}", 0.0, nack_capable=True)
    drain(core, 0.0)
    outcomes = [core.nack(f"c{i}", NackReport(missing=[(7, 7)]), 5.0) for i in range(50)]
    assert sum(o.queued for o in outcomes if o) == 1
    assert sum(o.aggregated for o in outcomes if o) == 49
    resent = drain(core, 5.0)
    assert [(p.index, p.repair) for p in resent] == [(7, True)]
    # NACKs that crossed the resend on the wire are suppressed...
    late = [core.nack(f"c{i}", NackReport(missing=[(7, 7)]), 5.05) for i in range(50)]
    assert sum(o.suppressed for o in late if o) == 50 and drain(core, 5.05) == []
    # ...but a client still missing it after the window gets it again.
    again = core.nack("c0", NackReport(missing=[(7, 7)]), 5.0 + core.suppress_s + 0.01)
    assert again is not None and again.queued == 1


def test_carousel_send_satisfies_a_queued_repair() -> None:
    core = make(pages=10, idle_loops=50)
    core.join("spec", 0.0, nack_capable=False)
    core.join("n", 0.0, nack_capable=True)
    assert [p.index for p in drain(core, 0.0, limit=3)] == [1, 2, 3]
    core.nack("n", NackReport(missing=[(2, 2)]), 1.0)  # queued
    assert core.next_page(1.0) == NextPage(2, True)
    assert core.next_page(1.0) == NextPage(4, False)


def test_unknown_tokens_change_nothing() -> None:
    core = make()
    core.join("a", 0.0, nack_capable=True)
    assert core.leave("nope", 0.0) is False
    assert core.nack("nope", NackReport(missing=[(1, 1)]), 0.0) is None
    assert core.clients == 1 and core.repair_backlog == 0
    with pytest.raises(LocalProtocolError):
        core.join("a", 0.0, nack_capable=True)


def test_last_leave_stops() -> None:
    core = make()
    core.join("a", 0.0, nack_capable=False)
    core.join("b", 0.0, nack_capable=True)
    assert core.leave("a", 1.0) and core.poll(1.0) is CastState.RUNNING
    assert core.leave("b", 1.0) and core.poll(1.0) is CastState.STOPPED
    assert core.stop_reason is StopReason.LAST_LEAVE
    assert core.next_page(1.0) is None
    assert core.leave("b", 1.0) is False


def test_vanished_spec_client_stops_after_idle_loops_of_carousel() -> None:
    core = make(pages=4, idle_loops=3)
    core.join("a", 0.0, nack_capable=False)
    sent = 0
    now = 0.0
    while core.poll(now) is CastState.RUNNING:
        assert core.next_page(now) is not None
        sent += 1
        now += 0.25  # one pass per loop_s
    assert sent == 12 and core.stop_reason is StopReason.IDLE


def test_join_leave_and_nack_reset_the_idle_count() -> None:
    core = make(pages=4, idle_loops=2)
    core.join("a", 0.0, nack_capable=False)
    for _ in range(7):
        core.next_page(10.0)
    assert core.poll(10.0) is CastState.RUNNING
    core.join("b", 10.0, nack_capable=False)  # resets: the next wrap is the first again
    for _ in range(4):
        core.next_page(20.0)
    assert core.poll(20.0) is CastState.RUNNING
    core.nack("b", NackReport(), 20.0)  # so does a NACK report
    for _ in range(4):
        core.next_page(30.0)
    assert core.poll(30.0) is CastState.RUNNING
    core.next_page(30.0)  # the second wrap since the NACK
    assert core.poll(30.0) is CastState.STOPPED


def test_fast_wraps_of_a_tiny_file_do_not_end_the_cast_early() -> None:
    core = make(pages=1, idle_loops=3)  # loop_s = 1 s
    core.join("a", 0.0, nack_capable=False)
    for _ in range(1000):  # a thousand passes in 10 ms
        assert core.next_page(0.01) is not None
    assert core.poll(0.01) is CastState.RUNNING
    assert core.poll(2.9) is CastState.RUNNING
    assert core.poll(3.0) is CastState.STOPPED and core.stop_reason is StopReason.IDLE


def test_paused_cast_counts_time_as_loops() -> None:
    core = make(pages=5, idle_loops=3, loop_s=2.0)
    core.join("a", 0.0, nack_capable=True)
    drain(core, 0.0)  # one full iteration, then paused
    assert core.poll(3.9) is CastState.RUNNING
    core.nack("a", NackReport(), 3.9)  # a sign of life
    assert core.poll(9.8) is CastState.RUNNING
    assert core.idle_deadline(9.8) == pytest.approx(9.9)
    assert core.poll(9.95) is CastState.STOPPED and core.stop_reason is StopReason.IDLE


def test_empty_file_cast_never_sends_and_idles_out() -> None:
    core = make(pages=0, idle_loops=2, loop_s=0.0)
    core.join("a", 0.0, nack_capable=False)
    assert core.next_page(0.0) is None
    assert core.poll(1.9) is CastState.RUNNING
    assert core.poll(2.1) is CastState.STOPPED


def test_carousel_skips_pages_repaired_since_the_latest_join() -> None:
    core = make(pages=10)
    core.join("a", 0.0, nack_capable=True)
    assert [p.index for p in drain(core, 0.1)] == list(range(1, 11))  # a's pass
    core.join("b", 0.2, nack_capable=True)  # b gets a pass of its own
    assert [p.index for p in drain(core, 0.3, limit=3)] == [1, 2, 3]
    core.nack("a", NackReport(missing=[(7, 8)]), 0.4)  # lost by a in its pass
    assert [(p.index, p.repair) for p in drain(core, 0.5)] == [
        (7, True),
        (8, True),
        (4, False),
        (5, False),
        (6, False),
        (9, False),
        (10, False),
    ]


def test_pages_the_carousel_has_not_sent_yet_are_not_repaired() -> None:
    """A client asking ahead (everything, after a slow start) must not turn the file into
    repairs that crowd the carousel out for everyone: the carousel brings those pages."""
    core = make(pages=10)
    core.join("a", 0.0, nack_capable=True)
    assert [p.index for p in drain(core, 0.1, limit=3)] == [1, 2, 3]
    outcome = core.nack("a", NackReport(missing=[(2, 2), (5, 10)]), 0.2)
    assert outcome is not None and outcome.suppressed == 6
    assert [(p.index, p.repair) for p in drain(core, 0.3)] == [
        (2, True),
        *((i, False) for i in range(4, 11)),
    ]


def test_carousel_never_skips_for_spec_clients() -> None:
    core = make(pages=5, idle_loops=100)
    core.join("spec", 0.0, nack_capable=False)
    core.join("n", 0.0, nack_capable=True)
    assert [p.index for p in drain(core, 0.05, limit=5)] == [1, 2, 3, 4, 5]
    core.nack("n", NackReport(missing=[(3, 3)]), 0.2)
    sent = [core.next_page(0.3) for _ in range(6)]
    assert [(p.index, p.repair) for p in sent if p] == [
        (3, True),
        (1, False),
        (2, False),
        (3, False),
        (4, False),
        (5, False),
    ]
