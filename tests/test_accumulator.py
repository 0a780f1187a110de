"""The producer's sans-I/O core: batching, the window, matching responses, retries."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from boomscooter.client._accumulator import (
    CLOSED,
    OPENED,
    Accumulator,
    Ack,
    AckLevel,
    Completion,
    OutBatch,
    ProduceResult,
    ProducerSettings,
    Reconnect,
    check_entry,
)
from boomscooter.errors import (
    ConfigError,
    ExpectedSeqnoError,
    NotLeaderError,
    RequestError,
    ServerUnavailableError,
)
from boomscooter.storage.batch import HEADER_BYTES, Batch, Entry


def core(**overrides: object) -> Accumulator[str]:
    return Accumulator(ProducerSettings(**overrides))  # type: ignore[arg-type]


def ack_for(batch: OutBatch[str], base: int, *, duplicate: bool = False) -> Ack:
    return Ack(batch.sequence, base, batch.record_count, 1, base, duplicate)


def drain(c: Accumulator[str]) -> list[OutBatch[str]]:
    sent = []
    while (batch := c.next_to_send()) is not None:
        sent.append(batch)
    return sent


def test_core_imports_no_io() -> None:
    source = Path(__file__).parent.parent / "boomscooter" / "client" / "_accumulator.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "socket", "time", "os", "threading", "grpc"}


def test_first_record_opens_a_batch_and_the_last_fitting_one_closes_it() -> None:
    c = core(max_batch_records=3)
    assert c.append(Entry(1, b"a"), "a", 0.0) == OPENED
    assert c.append(Entry(1, b"b"), "b", 0.0) == 0
    assert c.append(Entry(1, b"c"), "c", 0.0) == CLOSED
    assert c.open_deadline is None and c.last_sequence == 1 and not c.accepting
    [batch] = drain(c)
    assert batch.handles == ["a", "b", "c"]
    assert [e.payload for e in Batch.from_bytes(batch.data).entries()] == [b"a", b"b", b"c"]


def test_linger_closes_the_open_batch_at_its_deadline() -> None:
    c = core(linger_s=0.5)
    c.append(Entry(1, b"a"), "a", 10.0)
    assert c.open_deadline == 10.5
    assert not c.close_due(10.4)
    assert c.close_due(10.5)
    assert c.open_deadline is None and c.queued == 1


@given(
    st.lists(
        st.tuples(
            st.binary(max_size=300),
            st.none() | st.text(max_size=20),
            st.none() | st.binary(max_size=30),
        ),
        min_size=1,
        max_size=60,
    ),
    st.integers(min_value=HEADER_BYTES + 400, max_value=4000),
    st.integers(min_value=1, max_value=20),
)
@settings(max_examples=200, deadline=None)
def test_batches_never_exceed_the_limits_and_keep_every_record_in_order(
    records: list[tuple[bytes, str | None, bytes | None]], max_bytes: int, max_records: int
) -> None:
    c = core(max_batch_bytes=max_bytes, max_batch_records=max_records, max_in_flight=1000)
    entries = [Entry(i + 1, p, ch, k) for i, (p, ch, k) in enumerate(records)]
    for i, entry in enumerate(entries):
        check_entry(entry, max_bytes)
        c.append(entry, str(i), 0.0)
    c.close_open()
    batches = drain(c)
    assert [b.sequence for b in batches] == list(range(1, len(batches) + 1))
    decoded = []
    for batch in batches:
        assert len(batch.data) <= max_bytes
        assert batch.record_count <= max_records
        decoded += Batch.from_bytes(batch.data).entries()
    assert decoded == entries
    assert [h for b in batches for h in b.handles] == [str(i) for i in range(len(entries))]


def test_a_batch_is_closed_exactly_when_the_next_record_would_not_fit() -> None:
    c = core(max_batch_bytes=HEADER_BYTES + 3 * (12 + 10))
    for i in range(3):
        assert not c.append(Entry(1, b"x" * 10), str(i), 0.0) & CLOSED
    assert c.append(Entry(1, b"x" * 10), "3", 0.0) == CLOSED | OPENED
    [batch] = drain(c)
    assert len(batch.data) == HEADER_BYTES + 3 * 22 and batch.record_count == 3


def test_a_key_column_appearing_late_counts_for_earlier_records() -> None:
    # Two plain records (48 + 2*22 = 92); a keyed one makes every record pay 4 more.
    c = core(max_batch_bytes=HEADER_BYTES + 2 * 22 + 22 + 4 * 3 - 1)
    c.append(Entry(1, b"x" * 10), "a", 0.0)
    c.append(Entry(1, b"x" * 10), "b", 0.0)
    assert c.append(Entry(1, b"x" * 10, None, b""), "c", 0.0) & CLOSED


def test_oversized_and_malformed_records_are_request_errors() -> None:
    check_entry(Entry(0, b"x" * 40), HEADER_BYTES + 52)
    with pytest.raises(RequestError, match="exceeds max_batch_bytes") as raised:
        check_entry(Entry(0, b"x" * 41), HEADER_BYTES + 52)
    assert raised.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(RequestError, match="channel"):
        check_entry(Entry(0, b"", "c" * 70_000), 1 << 20)
    with pytest.raises(RequestError, match="timestamp"):
        check_entry(Entry(-1, b""), 1 << 20)
    with pytest.raises(RequestError, match="key"):
        check_entry(Entry(0, b"", None, "k"), 1 << 20)  # type: ignore[arg-type]
    c = core(max_batch_bytes=100)
    with pytest.raises(RequestError):
        c.append(Entry(0, b"x" * 100), "h", 0.0)
    assert c.idle


def test_the_window_bounds_batches_in_flight_and_backpressure_follows() -> None:
    c = core(max_batch_records=1, max_in_flight=2)
    for i in range(3):
        c.append(Entry(1, b"x"), str(i), 0.0)
    sent = drain(c)
    assert [b.sequence for b in sent] == [1, 2]
    assert c.in_flight == 2 and c.queued == 1 and not c.accepting
    assert isinstance(c.on_ack(ack_for(sent[1], 2)), Completion)
    assert c.lowest_unresolved() == 1 and not c.resolved_through(1)
    [third] = drain(c)
    assert third.sequence == 3 and c.accepting


def test_acks_match_by_sequence_in_any_order() -> None:
    c = core(max_batch_records=2, max_in_flight=10)
    for i in range(6):
        c.append(Entry(1, b"x"), str(i), 0.0)
    b1, b2, b3 = drain(c)
    done = c.on_ack(ack_for(b3, 5))
    assert done is not None and done.batch is b3
    assert done.result == ProduceResult(5, 2, 1, False, 5)
    assert c.on_ack(ack_for(b3, 5)) is None  # answered twice: ignored
    assert not c.resolved_through(3)
    c.on_ack(ack_for(b1, 1))
    assert c.resolved_through(1) and not c.resolved_through(2)
    c.on_ack(ack_for(b2, 3))
    assert c.resolved_through(3) and c.idle


def test_ack_level_none_resolves_on_write() -> None:
    c = core(ack_level=AckLevel.NONE, max_batch_records=1)
    c.append(Entry(1, b"x"), "a", 0.0)
    [batch] = drain(c)
    assert c.on_written(batch) == Completion(batch, None, None)
    assert c.idle
    assert c.on_rejection(1, RequestError("late")) is None
    assert isinstance(c.take_first_error(), RequestError)  # reported by the next flush


def test_a_disconnect_requeues_unresolved_batches_in_order_with_their_sequences() -> None:
    c = core(max_batch_records=1, max_in_flight=3)
    for i in range(5):
        c.append(Entry(1, b"x"), str(i), 0.0)
    b1, b2, _b3 = drain(c)
    c.on_ack(ack_for(b2, 2))
    c.on_disconnect(100.0)
    assert c.retry_deadline == 130.0
    again = drain(c)
    assert [b.sequence for b in again] == [1, 3, 4]
    assert again[0] is b1 and b1.sends == 2
    assert c.on_ack(ack_for(b1, 1, duplicate=True)) is not None
    # The deadline ends with the first ack after the break.
    assert c.retry_deadline is None


def test_an_ack_from_the_old_stream_resolves_a_requeued_batch() -> None:
    c = core(max_batch_records=1)
    c.append(Entry(1, b"x"), "a", 0.0)
    [batch] = drain(c)
    c.on_disconnect(0.0)
    assert c.queued == 1
    assert c.on_ack(ack_for(batch, 7)) is not None
    assert c.idle and c.accepting


def test_retry_deadline_fails_everything_pending_including_the_open_batch() -> None:
    c = core(max_batch_records=2, retry_timeout_s=5.0)
    for i in range(5):
        c.append(Entry(1, b"x"), str(i), 0.0)
    drain(c)
    c.on_disconnect(10.0)
    assert c.expire(14.9) == []
    failed = c.expire(15.0, "connection refused")
    assert sorted(h for f in failed for h in f.batch.handles) == ["0", "1", "2", "3", "4"]
    error = failed[0].error
    assert isinstance(error, ServerUnavailableError) and "connection refused" in str(error)
    assert c.idle and c.accepting and c.take_first_error() is error
    c.append(Entry(1, b"x"), "new", 20.0)  # still usable
    assert c.close_open() == 3  # the failed open batch never had a sequence


def test_rejections_end_the_batch_or_ask_for_a_reconnect() -> None:
    c = core(max_batch_records=1, max_in_flight=5)
    for i in range(4):
        c.append(Entry(1, b"x"), str(i), 0.0)
    b1, _b2, _b3, b4 = drain(c)
    mismatch = ExpectedSeqnoError("no", next_seqno=9)
    done = c.on_rejection(1, mismatch)
    assert isinstance(done, Completion) and done.batch is b1 and done.error is mismatch
    redirect = c.on_rejection(2, NotLeaderError("no", leader_address="h:2"))
    assert isinstance(redirect, Reconnect) and redirect.address == "h:2"
    retry = c.on_rejection(3, ServerUnavailableError("later"))
    assert isinstance(retry, Reconnect) and retry.address is None
    assert c.in_flight == 3  # both stay unresolved until resent
    bad = c.on_rejection(4, RequestError("bad"))
    assert isinstance(bad, Completion) and bad.batch is b4
    assert c.take_first_error() is mismatch and c.take_first_error() is None


def test_an_explicit_batch_keeps_its_place_after_the_open_one() -> None:
    c = core()
    c.append(Entry(1, b"a"), "a", 0.0)
    c.add_batch([Entry(1, b"b"), Entry(1, b"c")], "batch", expected_first_seqno=2)
    first, second = drain(c)
    assert first.handles == ["a"] and second.batch_handle == "batch"
    assert second.expected_first_seqno == 2 and second.record_count == 2
    with pytest.raises(RequestError):
        c.add_batch([], "empty")
    with pytest.raises(RequestError):
        c.add_batch([Entry(1, b"")], "x", expected_first_seqno=0)


def test_a_mismatched_record_count_is_an_error_not_wrong_seqnos() -> None:
    c = core(max_batch_records=2)
    c.append(Entry(1, b"a"), "a", 0.0)
    c.append(Entry(1, b"b"), "b", 0.0)
    [_batch] = drain(c)
    done = c.on_ack(Ack(1, 1, 1, 1, 1, False))
    assert done is not None and isinstance(done.error, RequestError)


def test_backoff_grows_to_its_cap_and_resets_on_ack() -> None:
    c = core(initial_backoff_s=0.1, max_backoff_s=1.0, max_batch_records=1)
    delays = [c.backoff_s(1.0) for _ in range(6)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert c.backoff_s(0.0) == pytest.approx(0.5)
    c.append(Entry(1, b"a"), "a", 0.0)
    [batch] = drain(c)
    c.on_ack(ack_for(batch, 1))
    assert c.backoff_s(1.0) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_batch_records": 0},
        {"max_batch_bytes": 10},
        {"max_in_flight": 0},
        {"linger_s": -1.0},
        {"retry_timeout_s": float("nan")},
    ],
)
def test_bad_settings(overrides: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ProducerSettings(**overrides)  # type: ignore[arg-type]


def test_ack_level_parse() -> None:
    assert AckLevel.parse("QUORUM") is AckLevel.QUORUM
    assert AckLevel.parse(AckLevel.NONE) is AckLevel.NONE
    with pytest.raises(ConfigError):
        AckLevel.parse("all")


@given(st.data())
@settings(max_examples=100, deadline=None)
def test_random_acks_and_disconnects_resolve_every_handle_once(data: st.DataObject) -> None:
    """Whatever order acks, rejections and breaks come in, every record ends resolved
    exactly once, and batches are only sent again with their original sequence."""
    c = core(max_batch_records=3, max_in_flight=4)
    resolved: dict[str, int] = {}
    contents: dict[int, list[str]] = {}
    n = data.draw(st.integers(min_value=1, max_value=40))
    for i in range(n):
        c.append(Entry(1, b"x"), str(i), 0.0)
    c.close_open()
    inflight: list[OutBatch[str]] = []
    for _ in range(400):
        if c.idle:
            break
        inflight += drain(c)
        for batch in inflight:
            contents.setdefault(batch.sequence, list(batch.handles))
            assert contents[batch.sequence] == batch.handles
        action = data.draw(st.sampled_from(["ack", "reject", "break"]))
        if action == "break" or not inflight:
            c.on_disconnect(0.0)
            inflight = []
            continue
        batch = data.draw(st.sampled_from(inflight))
        inflight.remove(batch)
        done = (
            c.on_ack(ack_for(batch, 1))
            if action == "ack"
            else c.on_rejection(batch.sequence, RequestError("no"))
        )
        assert isinstance(done, Completion)
        for handle in done.batch.handles:
            resolved[handle] = resolved.get(handle, 0) + 1
    else:
        pytest.fail("did not finish")
    assert resolved == {str(i): 1 for i in range(n)}
