"""The leader's sans-I/O bookkeeping: the dedupe table (against a reference model), the
commit rule. (The restamping of a producer's pre-encoded batch: test_storage_batch.py.)"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from boomscooter.errors import ConfigError
from boomscooter.node.core import (
    DEFAULT_DEDUPE_WINDOW,
    MAX_PRODUCER_ID_BYTES,
    Appended,
    CommitTracker,
    DedupeTable,
    DedupeWindowError,
)


def appended(sequence: int) -> Appended:
    """A distinct, checkable outcome per sequence."""
    return Appended(base_seqno=sequence * 10 + 1, record_count=sequence % 7 + 1, epoch=3)


# -- DedupeTable: lookups ---------------------------------------------------------------------


def test_unknown_producer_is_new() -> None:
    table = DedupeTable()
    assert table.lookup("p", 1) is None
    assert len(table) == 0  # a lookup does not create a producer


def test_stored_sequence_returns_the_original_outcome() -> None:
    table = DedupeTable()
    first = Appended(1, 5, 1)
    table.add("p", 1, first)
    table.add("p", 2, Appended(6, 2, 1))
    assert table.lookup("p", 1) == first
    assert table.lookup("p", 2) == Appended(6, 2, 1)
    assert table.lookup("p", 3) is None  # the next sequence is new
    assert table.lookup("p", 1000) is None  # a jump ahead is new too
    assert len(table) == 1


def test_producers_are_independent() -> None:
    table = DedupeTable()
    table.add("a", 1, Appended(1, 1, 1))
    assert table.lookup("b", 1) is None
    assert table.lookup("a", 1) == Appended(1, 1, 1)
    table.add("b", 1, Appended(2, 1, 1))
    assert table.lookup("b", 1) == Appended(2, 1, 1)
    assert table.lookup("a", 1) == Appended(1, 1, 1)


def test_appended_last_seqno() -> None:
    assert Appended(10, 1, 0).last_seqno == 10
    assert Appended(10, 5, 0).last_seqno == 14


def test_default_window() -> None:
    table = DedupeTable()
    assert table.window == DEFAULT_DEDUPE_WINDOW == 1024
    for sequence in range(1, 1101):
        table.add("p", sequence, appended(sequence))
    assert table.lookup("p", 1100 - 1023) == appended(1100 - 1023)
    with pytest.raises(DedupeWindowError):
        table.lookup("p", 1100 - 1024)


# -- DedupeTable: the window ------------------------------------------------------------------


def test_sequence_below_the_window_is_refused() -> None:
    table = DedupeTable(window=4)
    for sequence in range(1, 11):
        table.add("p", sequence, appended(sequence))
    # highest 10, window 4: 7..10 remembered, 6 and below refused
    for sequence in range(7, 11):
        assert table.lookup("p", sequence) == appended(sequence)
    for sequence in (6, 5, 1, 0):
        with pytest.raises(DedupeWindowError, match=r"older than the dedupe window") as info:
            table.lookup("p", sequence)
        assert "'p'" in str(info.value)
    assert DedupeWindowError.grpc_status == "FAILED_PRECONDITION"
    assert not DedupeWindowError.retriable


def test_old_sequences_are_evicted() -> None:
    table = DedupeTable(window=3)
    for sequence in range(1, 8):
        table.add("p", sequence, appended(sequence))
    assert [s for _, s, _ in table.items()] == [5, 6, 7]


def test_a_jump_evicts_everything_below_the_new_window() -> None:
    table = DedupeTable(window=3)
    for sequence in (1, 2, 3):
        table.add("p", sequence, appended(sequence))
    table.add("p", 100, appended(100))
    assert [s for _, s, _ in table.items()] == [100]
    with pytest.raises(DedupeWindowError):
        table.lookup("p", 3)
    assert table.lookup("p", 98) is None  # inside the window, never stored: new


def test_gap_inside_the_window_is_new_not_refused() -> None:
    table = DedupeTable(window=8)
    table.add("p", 1, appended(1))
    table.add("p", 5, appended(5))
    # 2..4 were never stored (failed batches): inside the window they may still come
    for sequence in (2, 3, 4):
        assert table.lookup("p", sequence) is None
    table.add("p", 3, appended(3))
    assert table.lookup("p", 3) == appended(3)
    assert table.lookup("p", 5) == appended(5)
    assert table.lookup("p", 1) == appended(1)


def test_out_of_order_within_the_window_keeps_every_entry() -> None:
    table = DedupeTable(window=4)
    for sequence in (10, 8, 9, 7):  # 7 > 10 - 4: still inside the window
        assert table.lookup("p", sequence) is None
        table.add("p", sequence, appended(sequence))
    for sequence in (7, 8, 9, 10):
        assert table.lookup("p", sequence) == appended(sequence)


def test_out_of_order_eviction_keeps_sequences_inside_the_window() -> None:
    table = DedupeTable(window=3)
    table.add("p", 10, appended(10))
    table.add("p", 8, appended(8))  # 8 > 10 - 3: inside the window
    table.add("p", 9, appended(9))
    table.add("p", 11, appended(11))  # window now 9..11
    # 10 is inside the window and was stored: a retry must be answered as a duplicate
    assert table.lookup("p", 10) == appended(10)


def test_readding_a_sequence_replaces_it() -> None:
    table = DedupeTable(window=4)
    table.add("p", 1, Appended(1, 1, 1))
    table.add("p", 1, Appended(7, 2, 2))
    assert table.lookup("p", 1) == Appended(7, 2, 2)
    assert list(table.items()) == [("p", 1, Appended(7, 2, 2))]


def test_window_of_one() -> None:
    table = DedupeTable(window=1)
    table.add("p", 1, appended(1))
    table.add("p", 2, appended(2))
    assert table.lookup("p", 2) == appended(2)
    with pytest.raises(DedupeWindowError):
        table.lookup("p", 1)
    assert table.lookup("p", 3) is None


@pytest.mark.parametrize(("window", "max_producers"), [(0, 1), (1, 0), (-1, 5), (5, -1)])
def test_window_and_producer_count_must_be_positive(window: int, max_producers: int) -> None:
    with pytest.raises(ConfigError, match="must be positive"):
        DedupeTable(window=window, max_producers=max_producers)


# -- DedupeTable: producers -------------------------------------------------------------------


def test_least_recently_used_producer_is_evicted() -> None:
    table = DedupeTable(max_producers=2)
    table.add("a", 1, appended(1))
    table.add("b", 1, appended(1))
    assert table.lookup("a", 1) == appended(1)  # a is now more recent than b
    table.add("c", 1, appended(1))
    assert len(table) == 2
    assert table.lookup("b", 1) is None  # b was evicted: forgotten, so "new"
    assert table.lookup("a", 1) == appended(1)
    assert table.lookup("c", 1) == appended(1)
    assert {p for p, _, _ in table.items()} == {"a", "c"}


def test_add_refreshes_a_producer() -> None:
    table = DedupeTable(max_producers=2)
    table.add("a", 1, appended(1))
    table.add("b", 1, appended(1))
    table.add("a", 2, appended(2))  # a is now more recent than b
    table.add("c", 1, appended(1))
    assert {p for p, _, _ in table.items()} == {"a", "c"}


def test_a_refused_lookup_still_refreshes_the_producer() -> None:
    table = DedupeTable(window=1, max_producers=2)
    table.add("a", 1, appended(1))
    table.add("a", 2, appended(2))
    table.add("b", 1, appended(1))
    with pytest.raises(DedupeWindowError):
        table.lookup("a", 1)
    table.add("c", 1, appended(1))
    assert {p for p, _, _ in table.items()} == {"a", "c"}


def test_new_producer_is_never_its_own_victim() -> None:
    table = DedupeTable(max_producers=1)
    table.add("a", 1, appended(1))
    table.add("b", 1, appended(1))
    assert len(table) == 1
    assert table.lookup("b", 1) == appended(1)
    assert table.lookup("a", 1) is None


# -- DedupeTable: forget_after, items, check_id -----------------------------------------------


def test_forget_after_drops_entries_past_the_truncation() -> None:
    table = DedupeTable()
    table.add("a", 1, Appended(1, 3, 1))  # 1..3
    table.add("b", 1, Appended(4, 2, 1))  # 4..5
    table.add("a", 2, Appended(6, 4, 1))  # 6..9
    table.add("b", 2, Appended(10, 1, 1))  # 10
    table.forget_after(5)
    assert sorted(table.items()) == [("a", 1, Appended(1, 3, 1)), ("b", 1, Appended(4, 2, 1))]
    assert table.lookup("a", 2) is None  # may be appended again (its records were cut)
    assert table.lookup("b", 2) is None
    assert table.lookup("a", 1) == Appended(1, 3, 1)


def test_forget_after_drops_a_batch_that_straddles_the_cut() -> None:
    table = DedupeTable()
    table.add("a", 1, Appended(1, 5, 1))  # 1..5
    table.forget_after(4)  # seqno 5 was cut: the batch is not wholly stored
    assert list(table.items()) == []
    assert table.lookup("a", 1) is None


def test_forget_after_zero_forgets_everything() -> None:
    table = DedupeTable()
    for sequence in range(1, 5):
        table.add("p", sequence, appended(sequence))
    table.forget_after(0)
    assert list(table.items()) == []
    table.forget_after(10**6)  # nothing to drop: no error
    assert list(table.items()) == []


def test_items_lists_every_entry_by_producer() -> None:
    table = DedupeTable(window=2)
    table.add("a", 1, appended(1))
    table.add("b", 7, appended(7))
    table.add("a", 2, appended(2))
    table.add("a", 3, appended(3))
    assert list(table.items()) == [
        ("b", 7, appended(7)),
        ("a", 2, appended(2)),
        ("a", 3, appended(3)),
    ]


def test_check_id_limit_is_in_utf8_bytes() -> None:
    DedupeTable.check_id("")
    DedupeTable.check_id("x" * MAX_PRODUCER_ID_BYTES)
    DedupeTable.check_id("é" * (MAX_PRODUCER_ID_BYTES // 2))  # 2 bytes each: exactly 128
    DedupeTable.check_id("\udc80")  # a lone surrogate is measured, not an error
    with pytest.raises(ConfigError, match=f"longer than {MAX_PRODUCER_ID_BYTES} bytes"):
        DedupeTable.check_id("x" * (MAX_PRODUCER_ID_BYTES + 1))
    with pytest.raises(ConfigError):
        DedupeTable.check_id("é" * (MAX_PRODUCER_ID_BYTES // 2 + 1))  # 65 chars, 130 bytes
    with pytest.raises(ConfigError):
        DedupeTable.check_id("🛴" * 33)  # 33 chars, 132 bytes


# -- DedupeTable: a reference model -----------------------------------------------------------


@dataclass
class ModelProducer:
    highest: int = 0
    stored: dict[int, Appended] = field(default_factory=dict)


class DedupeModel:
    """What the table promises: a stored sequence inside the window is answered with its
    outcome; one below the window is refused, or (if still stored) answered correctly; a
    sequence never stored inside the window is new; producers are forgotten LRU first."""

    def __init__(self, window: int, max_producers: int) -> None:
        self.window = window
        self.max_producers = max_producers
        self.producers: OrderedDict[str, ModelProducer] = OrderedDict()

    def add(self, producer_id: str, sequence: int, outcome: Appended) -> None:
        producer = self.producers.setdefault(producer_id, ModelProducer())
        self.producers.move_to_end(producer_id)
        while len(self.producers) > self.max_producers:
            self.producers.popitem(last=False)
        producer.stored[sequence] = outcome
        producer.highest = max(producer.highest, sequence)

    def forget_after(self, seqno: int) -> None:
        for producer in self.producers.values():
            for sequence in [s for s, a in producer.stored.items() if a.last_seqno > seqno]:
                del producer.stored[sequence]

    def check(self, table: DedupeTable, producer_id: str, sequence: int) -> None:
        producer = self.producers.get(producer_id)
        if producer is None:
            assert table.lookup(producer_id, sequence) is None
            return
        self.producers.move_to_end(producer_id)
        below = sequence <= producer.highest - self.window
        if below:
            try:
                found = table.lookup(producer_id, sequence)
            except DedupeWindowError:
                return
            assert found is not None, f"{producer_id}/{sequence} below the window read as new"
            assert found == producer.stored.get(sequence)
        else:
            assert table.lookup(producer_id, sequence) == producer.stored.get(sequence)


PRODUCERS = st.sampled_from(["a", "b", "c", "d"])


@st.composite
def in_order_ops(draw: st.DrawFn) -> list[tuple[str, str, int]]:
    """Adds in increasing sequence per producer (what the SDK does), with gaps, and
    lookups of any sequence (retries, stale retries)."""
    ops: list[tuple[str, str, int]] = []
    next_sequence: dict[str, int] = {}
    for _ in range(draw(st.integers(1, 50))):
        producer = draw(PRODUCERS)
        if draw(st.booleans()):
            sequence = next_sequence.get(producer, 1) + draw(st.integers(0, 3))
            next_sequence[producer] = sequence + 1
            ops.append(("add", producer, sequence))
        else:
            ops.append(("lookup", producer, draw(st.integers(0, 40))))
    return ops


def run_model(window: int, max_producers: int, ops: list[tuple[str, str, int]]) -> None:
    table = DedupeTable(window=window, max_producers=max_producers)
    model = DedupeModel(window, max_producers)
    for op, producer, sequence in ops:
        if op == "add":
            table.add(producer, sequence, appended(sequence))
            model.add(producer, sequence, appended(sequence))
        elif op == "forget":
            table.forget_after(sequence * 10)  # appended(s) ends above s * 10
            model.forget_after(sequence * 10)
        else:
            model.check(table, producer, sequence)
        assert len(table) == len(model.producers)
        assert len(table) <= max_producers
    items = set(table.items())
    for producer_id, state in model.producers.items():
        floor = state.highest - window
        remembered = {(producer_id, s, a) for s, a in state.stored.items() if s > floor}
        everything = {(producer_id, s, a) for s, a in state.stored.items()}
        mine = {item for item in items if item[0] == producer_id}
        assert remembered <= mine <= everything
        assert len(mine) <= window
    assert {item[0] for item in items} <= set(model.producers)
    for producer_id, state in list(model.producers.items()):
        for sequence in range(0, state.highest + 2):
            model.check(table, producer_id, sequence)


@settings(max_examples=60, deadline=None)
@given(window=st.integers(1, 6), max_producers=st.integers(1, 4), ops=in_order_ops())
def test_dedupe_table_matches_the_model_in_order(
    window: int, max_producers: int, ops: list[tuple[str, str, int]]
) -> None:
    run_model(window, max_producers, ops)


OUT_OF_ORDER_OPS = st.lists(
    st.tuples(st.sampled_from(["add", "add", "lookup", "forget"]), PRODUCERS, st.integers(1, 30)),
    max_size=60,
)


@settings(max_examples=100, deadline=None)
@example(
    window=3,
    max_producers=1,
    ops=[("add", "a", 10), ("add", "a", 8), ("add", "a", 9), ("add", "a", 11)],
)
@given(window=st.integers(1, 6), max_producers=st.integers(1, 4), ops=OUT_OF_ORDER_OPS)
def test_dedupe_table_matches_the_model_out_of_order(
    window: int, max_producers: int, ops: list[tuple[str, str, int]]
) -> None:
    run_model(window, max_producers, ops)


# -- CommitTracker ----------------------------------------------------------------------------


def test_commit_min_insync_one_follows_the_leader() -> None:
    tracker = CommitTracker(1)
    assert tracker.commit_seqno == 0
    assert tracker.copies() == 0
    assert tracker.held("", 5) is True
    assert tracker.commit_seqno == 5
    assert tracker.held("", 5) is False  # no change
    assert tracker.held("", 9) is True
    assert tracker.commit_seqno == 9
    assert tracker.copies() == 1


def test_commit_min_insync_two_needs_a_second_copy() -> None:
    tracker = CommitTracker(2)
    assert tracker.held("", 10) is False
    assert tracker.commit_seqno == 0
    assert tracker.held("r1", 4) is True
    assert tracker.commit_seqno == 4  # the second highest of {10, 4}
    assert tracker.held("r1", 12) is True
    assert tracker.commit_seqno == 10  # now the leader is the one behind
    assert tracker.held("r2", 11) is False
    assert tracker.commit_seqno == 10  # {10, 12, 11}: never past the leader's own copy
    assert tracker.held("", 13) is True
    assert tracker.commit_seqno == 12  # the second highest of {13, 12, 11}


def test_commit_min_insync_three() -> None:
    tracker = CommitTracker(3)
    assert tracker.held("", 20) is False
    assert tracker.held("r1", 15) is False
    assert tracker.commit_seqno == 0
    assert tracker.held("r2", 7) is True
    assert tracker.commit_seqno == 7  # the third highest
    assert tracker.held("r3", 18) is True
    assert tracker.commit_seqno == 15  # third highest of {20, 15, 7, 18}
    assert tracker.held("r2", 8) is False  # still below the third highest
    assert tracker.commit_seqno == 15


def test_commit_never_goes_backwards() -> None:
    tracker = CommitTracker(2)
    tracker.held("", 10)
    tracker.held("r1", 10)
    assert tracker.commit_seqno == 10
    assert tracker.held("r1", 3) is False  # a lower ack is ignored
    tracker.remove("r1")
    assert tracker.copies() == 1
    assert tracker.commit_seqno == 10  # fewer copies do not take the commit back
    assert tracker.held("r2", 2) is False  # a copy far behind does not either
    assert tracker.commit_seqno == 10
    assert tracker.copies() == 2
    assert tracker.held("r2", 11) is False  # {10, 11}: second highest is 10, no advance
    assert tracker.held("", 12) is True
    assert tracker.commit_seqno == 11


def test_commit_remove_stops_counting_a_copy() -> None:
    tracker = CommitTracker(2)
    tracker.held("", 5)
    tracker.held("r1", 5)
    tracker.remove("r1")
    tracker.remove("nobody")  # unknown copies are fine
    assert tracker.held("", 9) is False  # one copy only: no advance
    assert tracker.commit_seqno == 5
    assert tracker.held("r1", 9) is True  # a removed copy may come back, from any seqno
    assert tracker.commit_seqno == 9


def test_commit_starts_at_the_given_seqno() -> None:
    tracker = CommitTracker(1, commit_seqno=50)
    assert tracker.commit_seqno == 50
    assert tracker.held("", 40) is False
    assert tracker.commit_seqno == 50
    assert tracker.held("", 51) is True
    assert tracker.commit_seqno == 51


@pytest.mark.parametrize("min_insync", [0, -1])
def test_commit_min_insync_must_be_positive(min_insync: int) -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        CommitTracker(min_insync)


@settings(max_examples=100, deadline=None)
@given(
    min_insync=st.integers(1, 3),
    acks=st.lists(
        st.tuples(st.sampled_from(["", "r1", "r2", "r3", "-r1", "-r2"]), st.integers(0, 50)),
        max_size=40,
    ),
)
def test_commit_rule_matches_a_model(min_insync: int, acks: list[tuple[str, int]]) -> None:
    tracker = CommitTracker(min_insync)
    held: dict[str, int] = {}
    commit = 0
    for copy, seqno in acks:
        if copy.startswith("-"):
            tracker.remove(copy[1:])
            held.pop(copy[1:], None)
        else:
            before = tracker.commit_seqno
            advanced = tracker.held(copy, seqno)
            held[copy] = max(held.get(copy, -1), seqno)
            assert advanced == (tracker.commit_seqno > before)
        if len(held) >= min_insync:
            quorum = sorted(held.values(), reverse=True)[min_insync - 1]
            commit = max(commit, min(quorum, held.get("", 0)))  # capped by the leader's copy
        assert tracker.commit_seqno == commit
        assert tracker.copies() == len(held)
