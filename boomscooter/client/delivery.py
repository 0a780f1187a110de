"""What a subscriber hands to the application (sans-I/O), whatever the mode.

:class:`Delivery` takes whole batches in log order (from the multicast receiver, a Fetch,
a Subscribe stream or the file reader), holds them until the commit seqno covers them, and
releases the records the subscription asked for: seqnos from ``next_seqno`` on, never one
twice or out of order, up to ``until`` or ``count`` records, only channels starting with
``channel`` when a prefix is set. Batches that begin before ``next_seqno`` (a receiver that
started inside a batch, an overlapping Fetch) contribute only their later records.

Anything that would break the contract raises :class:`GapError` instead of being
delivered: a batch that starts past ``next_seqno`` means records would be skipped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from boomscooter.errors import ClientError, ConfigError
from boomscooter.storage.batch import Batch, Record


class GapError(ClientError):
    """A batch did not continue the delivered records (a bug or a changed log): delivering
    it would skip seqnos, so the subscription stops instead."""

    grpc_status = "DATA_LOSS"


@dataclass(slots=True)
class DeliveryStats:
    batches: int = 0
    records: int = 0
    filtered: int = 0


class Delivery:
    """Commit gating, range, count and channel filtering, exactly once, in order."""

    def __init__(
        self,
        next_seqno: int,
        *,
        until: int | None = None,
        count: int | None = None,
        channel: str | None = None,
    ) -> None:
        if next_seqno < 1:
            raise ConfigError(f"start seqno must be at least 1, got {next_seqno}")
        if count is not None and count < 0:
            raise ConfigError(f"count must not be negative, got {count}")
        self.next_seqno = next_seqno  # the first seqno not yet released (or filtered)
        self.until = until
        self.remaining = count
        self.channel = channel
        self.commit_seqno = 0
        self.stats = DeliveryStats()
        self._held: deque[Batch] = deque()  # received, not yet committed
        self._held_end = next_seqno  # one past the last seqno held

    @property
    def done(self) -> bool:
        return (self.remaining is not None and self.remaining <= 0) or (
            self.until is not None and self.next_seqno > self.until
        )

    @property
    def received_end(self) -> int:
        """One past the last seqno received (delivered or held)."""
        return self._held_end

    def add(self, batch: Batch) -> None:
        """A batch in log order (it may overlap what was received; it may not skip)."""
        if batch.next_seqno <= self._held_end:
            return  # nothing new
        if batch.base_seqno > self._held_end:
            raise GapError(
                f"batch {batch.base_seqno}..{batch.last_seqno} does not continue the "
                f"subscription at {self._held_end}"
            )
        self._held.append(batch)
        self._held_end = batch.next_seqno

    def skip_to(self, seqno: int) -> None:
        """The records before ``seqno`` were filtered out by the server (a unicast stream
        with a channel prefix sends only batches that match): nothing may be held."""
        if self._held:
            raise GapError(f"cannot skip to {seqno} with records held")
        if seqno > self._held_end:
            self.stats.filtered += seqno - self._held_end
            self.next_seqno = self._held_end = seqno

    def drop_uncommitted(self) -> None:
        """Forget received batches the commit does not cover (a new epoch may replace them)."""
        while self._held and self._held[-1].base_seqno > self.commit_seqno:
            self._held.pop()
        self._held_end = self._held[-1].next_seqno if self._held else self.next_seqno

    def commit(self, commit_seqno: int) -> None:
        if commit_seqno > self.commit_seqno:
            self.commit_seqno = commit_seqno

    def release(self) -> list[Record]:
        """The committed records now due (empty when none; stops at the end)."""
        out: list[Record] = []
        while self._held and not self.done:
            batch = self._held[0]
            limit = self.commit_seqno
            if self.until is not None:
                limit = min(limit, self.until)
            if self.next_seqno > limit:
                break
            stop = min(limit, batch.last_seqno)
            start = self.next_seqno
            records = list(batch.records(start, stop))
            if self.channel is not None:
                prefix = self.channel
                records = [
                    r for r in records if r.channel is not None and r.channel.startswith(prefix)
                ]
            if self.remaining is not None and len(records) >= self.remaining:
                records = records[: self.remaining]
                stop = records[-1].seqno if records else stop
            self.stats.filtered += stop - start + 1 - len(records)
            if self.remaining is not None:
                self.remaining -= len(records)
            out.extend(records)
            self.stats.records += len(records)
            self.next_seqno = stop + 1
            if stop >= batch.last_seqno:
                self._held.popleft()
                self.stats.batches += 1
        return out
