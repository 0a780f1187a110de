"""Sender pacing (sans-I/O): a token bucket and an adaptive rate controller.

:class:`Pacer` is a token bucket in virtual-time form: every datagram of ``n`` bytes moves
``next_at`` forward by ``8n / rate``; the sender may send while ``next_at <= now`` and sleeps
otherwise. ``next_at`` never lags ``now`` by more than the burst, so an idle sender cannot
save up an unbounded burst.

:class:`RateController` adapts the rate to what receivers report in NACKs (``nack.py``):

* Receiver **overruns** (datagrams the receiver's own socket dropped) always mean "too fast":
  multiplicative decrease.
* Heavy **loss** is ambiguous: congestion (sending faster than a link) or random loss that no
  rate change cures (a bad cable, a lossy radio, nftables in our tests). After a cut, the
  worst receiver's *delivered* rate tells them apart: under congestion it stays about the
  same (the link was full), under random loss it falls with the rate. In the second case the
  controller restores the rate and learns that loss level as the floor, so random loss never
  throttles the cast.
* A cast starts at ``START_RATE_MBIT`` at most (slow start: +50 % per clean window until
  the first cut), so an unpaced blast at a high ``--rate`` never overruns receivers for
  long.
* Otherwise a gentle increase (10 % of the current rate per clean window) back towards
  the configured maximum.
"""

from __future__ import annotations

from dataclasses import dataclass


class Pacer:
    def __init__(self, rate_mbit: float, *, burst_s: float = 0.02) -> None:
        self.burst_s = burst_s
        self.next_at = 0.0
        self.set_rate(rate_mbit)

    def set_rate(self, rate_mbit: float) -> None:
        if rate_mbit <= 0:
            raise ValueError("rate must be > 0")
        self.rate_mbit = rate_mbit
        self._s_per_byte = 8.0 / (rate_mbit * 1e6)

    def delay(self, now: float) -> float:
        """Seconds to wait before the next datagram may go (0 if it may go now)."""
        return max(0.0, self.next_at - now)

    def sent(self, nbytes: int, now: float) -> None:
        floor = now - self.burst_s
        if self.next_at < floor:
            self.next_at = floor
        self.next_at += nbytes * self._s_per_byte


@dataclass(slots=True)
class _Window:
    received: int = 0
    lost: int = 0
    overrun: int = 0


@dataclass(frozen=True, slots=True)
class RateChange:
    rate_mbit: float
    reason: str
    loss: float


class RateController:
    HEAVY_LOSS_MARGIN = 0.10  # loss above floor + this → suspect congestion
    CLEAN_LOSS_MARGIN = 0.03  # loss below floor + this → may speed up
    OVERRUN_FRACTION = 0.005
    DECREASE = 0.7
    PROBE_DECREASE = 0.85  # a cheaper cut while it is unclear whether loss is congestion
    INCREASE_FRACTION = 0.10  # of the current rate, per clean window
    MIN_INCREASE_FRACTION = 0.01  # of the maximum: recovery from a deep cut is not glacial
    CONGESTION_DELIVERY_RATIO = 0.93
    MIN_SAMPLES = 64
    START_RATE_MBIT = 400.0
    SLOW_START_INCREASE = 0.5

    def __init__(
        self, max_rate_mbit: float, *, min_rate_mbit: float = 1.0, window_s: float = 0.5
    ) -> None:
        self.max_rate_mbit = max_rate_mbit
        self.min_rate_mbit = min(min_rate_mbit, max_rate_mbit)
        self.rate_mbit = min(max_rate_mbit, self.START_RATE_MBIT)
        self._slow_start = self.rate_mbit < max_rate_mbit
        self.window_s = window_s
        self.loss_floor = 0.0
        self._windows: dict[str, _Window] = {}
        self._window_start: float | None = None
        # After a cut: (loss before, worst delivered/s before, rate before)
        self._probe: tuple[float, float, float] | None = None
        # The rate before the first of consecutive probing cuts: an inconclusive window
        # (delivery is noisy while repairs share the link) cuts again, and random loss
        # found then restores this, not the rate of the second cut.
        self._probe_origin: float | None = None

    def report(self, client: str, *, received: int, lost: int, overrun: int) -> None:
        w = self._windows.setdefault(client, _Window())
        w.received += received
        w.lost += lost
        w.overrun += overrun

    def forget(self, client: str) -> None:
        self._windows.pop(client, None)

    def poll(self, now: float) -> RateChange | None:
        """Evaluate the finished window, if one is due. Returns a change, or None."""
        if self._window_start is None:
            self._window_start = now
            return None
        elapsed = now - self._window_start
        if elapsed < self.window_s:
            return None
        windows = [w for w in self._windows.values() if w.received + w.lost >= self.MIN_SAMPLES]
        self._windows = {}
        self._window_start = now
        if not windows:
            return None
        worst = max(windows, key=lambda w: (w.lost + w.overrun) / (w.received + w.lost))
        total = worst.received + worst.lost
        loss = worst.lost / total
        overrun = max(w.overrun / (w.received + w.lost) for w in windows)
        delivered_per_s = worst.received / elapsed
        return self._decide(loss, overrun, delivered_per_s)

    def _set(self, rate: float, reason: str, loss: float) -> RateChange | None:
        rate = min(self.max_rate_mbit, max(self.min_rate_mbit, rate))
        if rate < self.rate_mbit:
            self._slow_start = False
        if abs(rate - self.rate_mbit) < 1e-9:
            return None
        self.rate_mbit = rate
        return RateChange(rate, reason, loss)

    def _decide(self, loss: float, overrun: float, delivered: float) -> RateChange | None:
        heavy = loss > self.loss_floor + self.HEAVY_LOSS_MARGIN
        if overrun > self.OVERRUN_FRACTION:
            self._probe = self._probe_origin = None
            return self._set(self.rate_mbit * self.DECREASE, "receiver_overrun", loss)
        if self._probe is not None:
            _loss_before, delivered_before, rate_before = self._probe
            self._probe = None
            if heavy and delivered < delivered_before * self.CONGESTION_DELIVERY_RATIO:
                # Delivery fell with the rate: the loss is not ours to cure.
                self.loss_floor = loss
                origin = self._probe_origin or rate_before
                self._probe_origin = None
                return self._set(max(origin, rate_before), "random_loss", loss)
        if heavy:
            if self._probe_origin is None:
                self._probe_origin = self.rate_mbit
            self._probe = (loss, delivered, self.rate_mbit)
            return self._set(self.rate_mbit * self.PROBE_DECREASE, "heavy_loss", loss)
        self._probe_origin = None
        if loss < self.loss_floor:
            self.loss_floor = 0.8 * self.loss_floor + 0.2 * loss
        if loss <= self.loss_floor + self.CLEAN_LOSS_MARGIN:
            step = max(
                self.rate_mbit
                * (self.SLOW_START_INCREASE if self._slow_start else self.INCREASE_FRACTION),
                self.max_rate_mbit * self.MIN_INCREASE_FRACTION,
            )
            return self._set(self.rate_mbit + step, "clean", loss)
        return None
