"""Model-based test: any sequence of appends, encoded appends, rolls, reopens, torn-tail
crashes, retention runs and truncations leaves SegmentedLog and MemoryLog reading back
exactly what a plain list-of-segments model says.

The model knows nothing of the codec: batch sizes come from the specification-written
encoder in ``support.storage``, and the roll and retention rules are restated here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import bootcast.logs
from boomscooter.storage import Entry, MemoryLog, Record, SegmentedLog, encode_batch

from support.storage import small_config, spec_encode

SEGMENT_BYTES = 700
RETENTION_BYTES = 2500
CONFIG = small_config(
    segment_bytes=SEGMENT_BYTES, retention_bytes=RETENTION_BYTES, index_interval_bytes=120
)

entries_strategy = st.lists(
    st.builds(
        Entry,
        timestamp_ms=st.integers(0, 1000),
        payload=st.binary(max_size=90),
        channel=st.none() | st.text(max_size=4),
        key=st.none() | st.binary(max_size=4),
    ),
    min_size=1,
    max_size=5,
)


@dataclass
class ModelSegment:
    base_seqno: int
    batches: list[tuple[int, list[Record]]] = field(default_factory=list)  # (size, records)

    @property
    def size(self) -> int:
        return 32 + sum(size for size, _ in self.batches)


class Model:
    def __init__(self) -> None:
        self.segments = [ModelSegment(1)]
        self.epochs: dict[int, int] = {}  # base seqno of each batch -> its epoch

    @property
    def records(self) -> list[Record]:
        return [r for s in self.segments for _, records in s.batches for r in records]

    @property
    def next_seqno(self) -> int:
        for segment in reversed(self.segments):
            if segment.batches:
                return segment.batches[-1][1][-1].seqno + 1
        return self.segments[-1].base_seqno

    @property
    def first_seqno(self) -> int:
        return self.segments[0].base_seqno

    def append(self, entries: list[Entry], epoch: int) -> None:
        base = self.next_seqno
        size = len(spec_encode(entries, base_seqno=base, epoch=epoch))
        active = self.segments[-1]
        if active.batches and active.size + size > SEGMENT_BYTES:
            active = ModelSegment(base)
            self.segments.append(active)
        records = [
            Record(base + i, e.timestamp_ms, e.channel, e.key, e.payload)
            for i, e in enumerate(entries)
        ]
        active.batches.append((size, records))
        self.epochs[base] = epoch

    def roll(self) -> None:
        if self.segments[-1].batches:
            self.segments.append(ModelSegment(self.next_seqno))

    def retention(self) -> int:
        deleted = 0
        while len(self.segments) > 1 and sum(s.size for s in self.segments) > RETENTION_BYTES:
            self.segments.pop(0)
            deleted += 1
        return deleted

    def truncate_after(self, seqno: int) -> None:
        if seqno >= self.next_seqno - 1:
            return
        while len(self.segments) > 1 and self.segments[-1].base_seqno > seqno:
            self.segments.pop()
        active = self.segments[-1]
        kept: list[tuple[int, list[Record]]] = []
        partial: list[Record] = []
        epoch = 0
        for size, records in active.batches:
            if records[-1].seqno <= seqno:
                kept.append((size, records))
            elif records[0].seqno <= seqno:
                partial = [r for r in records if r.seqno <= seqno]
                epoch = self.epochs.get(records[0].seqno, 0)
        active.batches = kept
        if partial:
            self.append(
                [Entry(r.timestamp_ms, r.payload, r.channel, r.key) for r in partial], epoch
            )


class StorageMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        bootcast.logs.configure(level="error")  # torn-tail crashes warn on every reopen
        self.directory = tempfile.mkdtemp(prefix="boomscooter-model-")
        self.disk = SegmentedLog.open(self.directory, CONFIG)
        self.memory = MemoryLog(CONFIG)
        self.model = Model()

    def _append(self, entries: list[Entry], epoch: int, *, encoded: bool) -> None:
        base = self.model.next_seqno
        if encoded:
            data = encode_batch(entries, base_seqno=base, epoch=epoch).data
            self.disk.append_batch(data)
            self.memory.append_batch(data)
        else:
            self.disk.append(entries, epoch=epoch)
            self.memory.append(entries, epoch=epoch)
        self.model.append(entries, epoch)

    @rule(entries=entries_strategy, epoch=st.integers(0, 3))
    def append(self, entries: list[Entry], epoch: int) -> None:
        self._append(entries, epoch, encoded=False)

    @rule(entries=entries_strategy, epoch=st.integers(0, 3))
    def append_encoded(self, entries: list[Entry], epoch: int) -> None:
        self._append(entries, epoch, encoded=True)

    @rule()
    def roll(self) -> None:
        self.disk.roll()
        self.memory.roll()
        self.model.roll()

    @rule()
    def reopen(self) -> None:
        self.disk.close()
        self.disk = SegmentedLog.open(self.directory, CONFIG)
        assert self.disk.recovery.kinds() == []

    @precondition(lambda self: len(self.model.segments[-1].batches) >= 2)
    @rule(data=st.data(), zeros=st.booleans())
    def crash_with_torn_tail(self, data: st.DataObject, zeros: bool) -> None:
        """The last write reached the disk only in part: cut short, or its tail zeroed."""
        self.disk.close()
        active = self.model.segments[-1]
        path = os.path.join(self.directory, f"{active.base_seqno:020d}.log")
        size = os.path.getsize(path)
        last_size, last_records = active.batches[-1]
        start = size - last_size
        with open(path, "rb") as f:
            tail = f.read()[start:]
        # Zeros must change something: a batch's last bytes are often zeros already.
        last_nonzero = start + max(i for i, byte in enumerate(tail) if byte)
        cut = data.draw(
            st.integers(start if zeros else start + 1, last_nonzero if zeros else size - 1)
        )
        if zeros:
            with open(path, "r+b") as f:
                f.seek(cut)
                f.write(bytes(size - cut))
        else:
            os.truncate(path, cut)
        self.disk = SegmentedLog.open(self.directory, CONFIG)
        assert [a.kind.value for a in self.disk.recovery.actions] == ["truncated"]
        dropped_after = last_records[0].seqno - 1
        self.memory.truncate_after(dropped_after)
        self.model.truncate_after(dropped_after)

    @rule()
    def retention(self) -> None:
        expected = self.model.retention()
        assert self.disk.apply_retention() == expected
        assert self.memory.apply_retention() == expected

    @rule(data=st.data())
    def truncate_after(self, data: st.DataObject) -> None:
        seqno = data.draw(st.integers(self.model.first_seqno - 1, self.model.next_seqno))
        for log in (self.disk, self.memory):
            log.truncate_after(seqno)
        self.model.truncate_after(seqno)

    @rule(data=st.data())
    def read_range(self, data: st.DataObject) -> None:
        first, end = self.model.first_seqno, self.model.next_seqno
        start = data.draw(st.integers(first, end + 1))
        stop = data.draw(st.none() | st.integers(start - 1, end + 1))
        expected = [
            r for r in self.model.records if r.seqno >= start and (stop is None or r.seqno <= stop)
        ]
        for log in (self.disk, self.memory):
            assert list(log.read(start, to_seqno=stop)) == expected

    @rule(timestamp_ms=st.integers(0, 1001))
    def seqno_for_time(self, timestamp_ms: int) -> None:
        expected = next(
            (r.seqno for r in self.model.records if r.timestamp_ms >= timestamp_ms), None
        )
        assert self.disk.seqno_for_time(timestamp_ms) == expected
        assert self.memory.seqno_for_time(timestamp_ms) == expected

    @invariant()
    def logs_agree_with_the_model(self) -> None:
        model = self.model
        total = sum(s.size for s in model.segments)
        for log in (self.disk, self.memory):
            assert log.first_seqno == model.first_seqno
            assert log.next_seqno == model.next_seqno
            assert log.segment_count == len(model.segments)
            assert log.total_bytes == total
            assert list(log.read(log.first_seqno)) == model.records
        first = model.first_seqno
        assert self.disk.read_batches(first, max_bytes=1 << 30) == self.memory.read_batches(
            first, max_bytes=1 << 30
        )

    def teardown(self) -> None:
        self.disk.close()
        shutil.rmtree(self.directory, ignore_errors=True)
        bootcast.logs.reset()


StorageMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestStorageModel = StorageMachine.TestCase
