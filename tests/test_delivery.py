"""The subscriber's delivery core: commit gating, exactly once in order, range, count and
channel filters, skips and drops, gaps — and a hypothesis run over random batch splits,
commit advances and overlaps."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from boomscooter.client.delivery import Delivery, GapError
from boomscooter.errors import ClientError, ConfigError
from boomscooter.storage.batch import Batch, Entry, Record, encode_batch


def channel_of(seqno: int) -> str | None:
    """The channel of the record at ``seqno`` in batches made with ``channels=True``:
    1 → "a/1", 2 → "b/2", 3 → None, 4 → "", 5 → "a/5", … (repeating by 4)."""
    kind = seqno % 4
    if kind == 1:
        return f"a/{seqno}"
    if kind == 2:
        return f"b/{seqno}"
    return None if kind == 3 else ""


def make_batch(base: int, count: int, *, channels: bool = False) -> Batch:
    """Records ``base`` … ``base + count - 1``; the payload names the seqno, so batches of
    the same range made separately hold the same records."""
    entries = [
        Entry(1000 + s, b"p%d" % s, channel_of(s) if channels else None)
        for s in range(base, base + count)
    ]
    return encode_batch(entries, base_seqno=base, epoch=1)


def split(first: int, last: int, sizes: list[int], **options: bool) -> list[Batch]:
    """Batches covering ``first`` … ``last`` with the given sizes (the last one absorbs the
    rest)."""
    batches = []
    base = first
    for size in sizes:
        if base > last:
            break
        count = min(size, last - base + 1)
        batches.append(make_batch(base, count, **options))
        base += count
    if base <= last:
        batches.append(make_batch(base, last - base + 1, **options))
    return batches


def seqnos(records: list[Record]) -> list[int]:
    return [r.seqno for r in records]


# -- construction -----------------------------------------------------------------------------


@pytest.mark.parametrize("start", [0, -1])
def test_start_must_be_positive(start: int) -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        Delivery(start)


def test_count_must_not_be_negative() -> None:
    with pytest.raises(ConfigError, match="negative"):
        Delivery(1, count=-1)


def test_gap_error_is_a_client_error_with_data_loss() -> None:
    assert issubclass(GapError, ClientError)
    assert GapError.grpc_status == "DATA_LOSS"


# -- commit gating ----------------------------------------------------------------------------


def test_nothing_is_released_before_the_commit() -> None:
    delivery = Delivery(1)
    delivery.add(make_batch(1, 5))
    assert delivery.release() == []
    assert delivery.received_end == 6
    delivery.commit(3)
    out = delivery.release()
    assert seqnos(out) == [1, 2, 3]
    assert [r.payload for r in out] == [b"p1", b"p2", b"p3"]
    assert delivery.release() == []  # nothing new until the commit moves
    delivery.commit(2)  # a lower commit is ignored
    assert delivery.commit_seqno == 3
    assert delivery.release() == []
    delivery.commit(10)  # above what was received: releases what is held
    assert seqnos(delivery.release()) == [4, 5]
    assert delivery.next_seqno == 6
    assert delivery.stats.batches == 1
    assert delivery.stats.records == 5


def test_commit_before_the_batch_arrives() -> None:
    delivery = Delivery(1)
    delivery.commit(4)
    assert delivery.release() == []
    delivery.add(make_batch(1, 2))
    delivery.add(make_batch(3, 3))
    assert seqnos(delivery.release()) == [1, 2, 3, 4]
    delivery.commit(5)
    assert seqnos(delivery.release()) == [5]


def test_commit_at_a_batch_boundary_releases_whole_batches_only() -> None:
    delivery = Delivery(1)
    for batch in split(1, 9, [3, 3, 3]):
        delivery.add(batch)
    delivery.commit(6)
    assert seqnos(delivery.release()) == [1, 2, 3, 4, 5, 6]
    assert delivery.stats.batches == 2


# -- exactly once, overlaps -------------------------------------------------------------------


def test_overlapping_batches_release_each_record_once() -> None:
    delivery = Delivery(1)
    delivery.add(make_batch(1, 4))
    delivery.add(make_batch(1, 4))  # the same batch again (repair and live stream)
    delivery.add(make_batch(3, 4))  # overlaps: only 5 and 6 are new
    delivery.add(make_batch(2, 2))  # wholly inside: nothing new
    assert delivery.received_end == 7
    delivery.commit(100)
    out = delivery.release()
    assert seqnos(out) == [1, 2, 3, 4, 5, 6]
    assert [r.payload for r in out] == [b"p%d" % s for s in range(1, 7)]
    delivery.add(make_batch(1, 6))  # a late resend of what was delivered
    assert delivery.release() == []
    delivery.add(make_batch(6, 2))
    assert seqnos(delivery.release()) == [7]


def test_a_batch_starting_before_the_start_contributes_its_later_records() -> None:
    delivery = Delivery(5)
    delivery.add(make_batch(1, 8))  # the receiver joined inside this batch
    delivery.commit(8)
    assert seqnos(delivery.release()) == [5, 6, 7, 8]
    assert delivery.next_seqno == 9


def test_a_batch_ending_before_the_start_is_ignored() -> None:
    delivery = Delivery(10)
    delivery.add(make_batch(1, 9))  # 1..9: nothing at or after 10
    assert delivery.received_end == 10
    delivery.commit(100)
    assert delivery.release() == []
    delivery.add(make_batch(10, 1))
    assert seqnos(delivery.release()) == [10]


def test_partial_release_inside_a_batch_continues_from_there() -> None:
    delivery = Delivery(1)
    delivery.add(make_batch(1, 10))
    delivery.commit(4)
    assert seqnos(delivery.release()) == [1, 2, 3, 4]
    delivery.add(make_batch(1, 12))  # overlaps the held batch: 11 and 12 are new
    delivery.commit(7)
    assert seqnos(delivery.release()) == [5, 6, 7]
    delivery.commit(12)
    assert seqnos(delivery.release()) == [8, 9, 10, 11, 12]


# -- gaps -------------------------------------------------------------------------------------


def test_a_batch_that_skips_raises_gap_error() -> None:
    delivery = Delivery(1)
    delivery.add(make_batch(1, 3))
    with pytest.raises(GapError, match=r"batch 5\.\.6 does not continue the subscription at 4"):
        delivery.add(make_batch(5, 2))
    # nothing changed: the continuing batch is still accepted
    assert delivery.received_end == 4
    delivery.add(make_batch(4, 3))
    delivery.commit(6)
    assert seqnos(delivery.release()) == [1, 2, 3, 4, 5, 6]


def test_a_first_batch_past_the_start_raises_gap_error() -> None:
    delivery = Delivery(3)
    with pytest.raises(GapError):
        delivery.add(make_batch(4, 1))


# -- until and count --------------------------------------------------------------------------


def test_until_stops_inside_a_batch() -> None:
    delivery = Delivery(2, until=5)
    delivery.add(make_batch(1, 10))
    delivery.commit(10)
    assert seqnos(delivery.release()) == [2, 3, 4, 5]
    assert delivery.done
    delivery.add(make_batch(11, 1))
    assert delivery.release() == []


def test_until_waits_for_the_commit() -> None:
    delivery = Delivery(1, until=6)
    delivery.add(make_batch(1, 8))
    delivery.commit(3)
    assert seqnos(delivery.release()) == [1, 2, 3]
    assert not delivery.done
    delivery.commit(8)
    assert seqnos(delivery.release()) == [4, 5, 6]
    assert delivery.done


def test_until_before_the_start_is_done_at_once() -> None:
    delivery = Delivery(5, until=4)
    assert delivery.done
    delivery.add(make_batch(5, 1))
    delivery.commit(5)
    assert delivery.release() == []


def test_count_stops_after_that_many_records() -> None:
    delivery = Delivery(3, count=4)
    for batch in split(1, 10, [2, 2, 2, 2, 2]):
        delivery.add(batch)
    delivery.commit(10)
    assert seqnos(delivery.release()) == [3, 4, 5, 6]
    assert delivery.done
    assert delivery.remaining == 0
    assert delivery.release() == []


def test_count_across_commits() -> None:
    delivery = Delivery(1, count=3)
    delivery.add(make_batch(1, 5))
    delivery.commit(2)
    assert seqnos(delivery.release()) == [1, 2]
    assert delivery.remaining == 1
    delivery.commit(5)
    assert seqnos(delivery.release()) == [3]
    assert delivery.done


def test_count_zero_is_done_at_once() -> None:
    delivery = Delivery(1, count=0)
    assert delivery.done
    delivery.add(make_batch(1, 2))
    delivery.commit(2)
    assert delivery.release() == []


def test_count_and_until_whichever_comes_first() -> None:
    delivery = Delivery(1, until=3, count=10)
    delivery.add(make_batch(1, 5))
    delivery.commit(5)
    assert seqnos(delivery.release()) == [1, 2, 3]
    assert delivery.done
    delivery = Delivery(1, until=30, count=2)
    delivery.add(make_batch(1, 5))
    delivery.commit(5)
    assert seqnos(delivery.release()) == [1, 2]


# -- channel prefix ---------------------------------------------------------------------------


def test_channel_prefix_keeps_matching_records() -> None:
    delivery = Delivery(1, channel="a/")
    batch = make_batch(1, 8, channels=True)
    assert [r.channel for r in batch.records()] == ["a/1", "b/2", None, "", "a/5", "b/6", None, ""]
    delivery.add(batch)
    delivery.commit(8)
    out = delivery.release()
    assert seqnos(out) == [1, 5]
    assert [r.channel for r in out] == ["a/1", "a/5"]
    assert delivery.next_seqno == 9  # the filtered records are consumed, not pending
    assert delivery.stats.filtered == 6
    assert delivery.stats.records == 2


def test_empty_prefix_means_any_record_with_a_channel() -> None:
    delivery = Delivery(1, channel="")
    delivery.add(make_batch(1, 8, channels=True))
    delivery.commit(8)
    out = delivery.release()
    assert seqnos(out) == [1, 2, 4, 5, 6, 8]  # "" is a channel; None is not
    assert [r.channel for r in out] == ["a/1", "b/2", "", "a/5", "b/6", ""]


def test_no_channel_never_matches_a_prefix() -> None:
    delivery = Delivery(1, channel="")
    delivery.add(make_batch(1, 3))  # a batch without channels at all
    delivery.commit(3)
    assert delivery.release() == []
    assert delivery.next_seqno == 4
    assert delivery.stats.filtered == 3


def test_no_prefix_releases_everything() -> None:
    delivery = Delivery(1, channel=None)
    delivery.add(make_batch(1, 8, channels=True))
    delivery.commit(8)
    assert seqnos(delivery.release()) == list(range(1, 9))


def test_count_counts_matching_records_only() -> None:
    delivery = Delivery(1, channel="b/", count=2)
    for batch in split(1, 16, [3, 5, 8], channels=True):
        delivery.add(batch)
    delivery.commit(16)
    out = delivery.release()
    assert seqnos(out) == [2, 6]
    assert delivery.done
    assert delivery.next_seqno == 7  # stops right after the last counted record


def test_filtered_counts_only_consumed_records_when_count_cuts() -> None:
    delivery = Delivery(1, channel="a/", count=1)
    delivery.add(make_batch(1, 8, channels=True))  # a/ at 1 and 5
    delivery.commit(8)
    assert seqnos(delivery.release()) == [1]
    assert delivery.next_seqno == 2  # 2..8 were not consumed
    assert delivery.stats.filtered == 0


def test_count_with_channel_across_commits() -> None:
    delivery = Delivery(1, channel="a/", count=3)
    delivery.add(make_batch(1, 16, channels=True))  # a/ at 1, 5, 9, 13
    delivery.commit(6)
    assert seqnos(delivery.release()) == [1, 5]
    assert delivery.remaining == 1
    delivery.commit(16)
    assert seqnos(delivery.release()) == [9]
    assert delivery.done
    assert delivery.next_seqno == 10


# -- skip_to and drop_uncommitted -------------------------------------------------------------


def test_skip_to_moves_past_filtered_records() -> None:
    delivery = Delivery(1, channel="a/")
    delivery.skip_to(5)  # the server filtered 1..4 out
    assert delivery.next_seqno == 5
    assert delivery.received_end == 5
    assert delivery.stats.filtered == 4
    delivery.add(make_batch(5, 1, channels=True))
    delivery.commit(5)
    assert seqnos(delivery.release()) == [5]
    delivery.skip_to(3)  # backwards: no effect
    assert delivery.next_seqno == 6


def test_skip_to_with_records_held_raises() -> None:
    delivery = Delivery(1)
    delivery.add(make_batch(1, 2))
    with pytest.raises(GapError, match="held"):
        delivery.skip_to(10)
    delivery.commit(2)
    assert seqnos(delivery.release()) == [1, 2]
    delivery.skip_to(10)
    assert delivery.next_seqno == 10
    with pytest.raises(GapError):
        delivery.add(make_batch(11, 1))


def test_skip_to_then_a_batch_that_began_earlier() -> None:
    delivery = Delivery(1)
    delivery.skip_to(4)
    delivery.add(make_batch(2, 5))  # 2..6: only 4..6 are due
    delivery.commit(6)
    assert seqnos(delivery.release()) == [4, 5, 6]


def test_drop_uncommitted_forgets_batches_above_the_commit() -> None:
    delivery = Delivery(1)
    for batch in split(1, 9, [3, 3, 3]):
        delivery.add(batch)
    delivery.commit(3)
    delivery.drop_uncommitted()
    assert delivery.received_end == 4
    # a new epoch's batches replace 4..9 (different payloads, different split)
    replacement = encode_batch([Entry(1, b"new%d" % s) for s in range(4, 8)], base_seqno=4, epoch=2)
    delivery.add(replacement)
    delivery.commit(7)
    out = delivery.release()
    assert seqnos(out) == [1, 2, 3, 4, 5, 6, 7]
    assert [r.payload for r in out[3:]] == [b"new4", b"new5", b"new6", b"new7"]


def test_drop_uncommitted_with_nothing_committed() -> None:
    delivery = Delivery(3)
    delivery.add(make_batch(3, 4))
    delivery.drop_uncommitted()
    assert delivery.received_end == 3
    delivery.commit(6)
    assert delivery.release() == []
    with pytest.raises(GapError):
        delivery.add(make_batch(4, 1))  # the dropped records must come again


def test_drop_uncommitted_after_a_partial_release() -> None:
    delivery = Delivery(1)
    delivery.add(make_batch(1, 4))
    delivery.add(make_batch(5, 4))
    delivery.commit(2)
    assert seqnos(delivery.release()) == [1, 2]
    delivery.drop_uncommitted()  # 1..4 straddles the commit and stays, 5..8 goes
    assert delivery.received_end == 5
    delivery.commit(4)
    assert seqnos(delivery.release()) == [3, 4]


def test_drop_uncommitted_keeps_committed_held_batches() -> None:
    delivery = Delivery(1)
    delivery.add(make_batch(1, 2))
    delivery.add(make_batch(3, 2))
    delivery.commit(4)
    delivery.drop_uncommitted()
    assert delivery.received_end == 5
    assert seqnos(delivery.release()) == [1, 2, 3, 4]


# -- a random run -----------------------------------------------------------------------------


Run = tuple[int, int, list[Batch | int]]


@st.composite
def runs(draw: st.DrawFn) -> Run:
    """A log of ``total`` records in random batches, a start seqno, and a schedule of
    batches (each in order, with resends of earlier ones and overlapping batches of other
    boundaries, as a Fetch and the live stream overlap) and commits (ints) that never pass
    what was sent."""
    total = draw(st.integers(1, 60))
    sizes = draw(st.lists(st.integers(1, 8), min_size=1, max_size=60))
    batches = split(1, total, sizes, channels=True)
    start = draw(st.integers(1, total))
    first = next(i for i, b in enumerate(batches) if b.last_seqno >= start)
    schedule: list[Batch | int] = []
    commit = 0
    for index in range(first, len(batches)):
        schedule.append(batches[index])
        end = batches[index].last_seqno
        for _ in range(draw(st.integers(0, 2))):
            choice = draw(st.integers(0, 2))
            if choice == 0:
                schedule.append(batches[draw(st.integers(first, index))])  # a resend
            elif choice == 1:
                low = draw(st.integers(1, end))
                high = draw(st.integers(low, end))
                schedule.append(make_batch(low, high - low + 1, channels=True))
            else:
                commit = draw(st.integers(commit, end))
                schedule.append(commit)
    schedule.append(total)
    return start, total, schedule


def play(delivery: Delivery, schedule: list[Batch | int]) -> list[Record]:
    released: list[Record] = []
    committed = 0
    for step in schedule:
        if isinstance(step, int):
            delivery.commit(step)
            committed = max(committed, step)
        else:
            delivery.add(step)
        out = delivery.release()
        assert all(r.seqno <= committed for r in out), "released above the commit"
        released += out
    return released


@settings(max_examples=80, deadline=None)
@given(run=runs())
def test_random_splits_commits_and_overlaps_release_the_range_once(run: Run) -> None:
    start, total, schedule = run
    delivery = Delivery(start)
    released = play(delivery, schedule)
    assert seqnos(released) == list(range(start, total + 1))
    assert [r.payload for r in released] == [b"p%d" % s for s in range(start, total + 1)]
    assert delivery.next_seqno == total + 1
    assert delivery.stats.records == total - start + 1


@settings(max_examples=80, deadline=None)
@given(
    run=runs(),
    prefix=st.sampled_from([None, "", "a/", "b/", "a/1", "zzz"]),
    count=st.none() | st.integers(0, 20),
    until=st.none() | st.integers(0, 70),
)
def test_random_runs_with_filters_release_exactly_the_wanted_records(
    run: Run, prefix: str | None, count: int | None, until: int | None
) -> None:
    start, total, schedule = run
    delivery = Delivery(start, channel=prefix, count=count, until=until)
    released = play(delivery, schedule)
    wanted = [
        s
        for s in range(start, total + 1)
        if (until is None or s <= until)
        and (prefix is None or ((c := channel_of(s)) is not None and c.startswith(prefix)))
    ]
    if count is not None:
        wanted = wanted[:count]
    assert seqnos(released) == wanted
    assert [r.channel for r in released] == [channel_of(s) for s in wanted]
    if count is None:  # every consumed seqno was either delivered or filtered
        consumed = delivery.next_seqno - start
        assert delivery.stats.records + delivery.stats.filtered == consumed
