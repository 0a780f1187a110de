"""Token-bucket pacing and the adaptive rate controller, against simulated links."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bootcast.pacing import Pacer, RateChange, RateController


def test_pacer_holds_the_rate() -> None:
    pacer = Pacer(100.0)  # 100 Mbit/s = 12.5 MB/s
    now, sent = 0.0, 0
    while now < 1.0:
        if pacer.delay(now) == 0:
            pacer.sent(1500, now)
            sent += 1500
        else:
            now += pacer.delay(now)
    assert sent == pytest.approx(12.5e6, rel=0.01)


def test_pacer_does_not_bank_idle_time() -> None:
    pacer = Pacer(8.0, burst_s=0.002)  # 1 byte per µs
    pacer.sent(1000, 0.0)
    now = 10.0  # idle for a long time
    burst = 0
    while pacer.delay(now) == 0:
        pacer.sent(100, now)
        burst += 100
    assert burst <= 2100  # 2 ms of burst, not 10 s of savings


def run(controller: RateController, link: str, seconds: float = 30.0) -> list[float]:
    """Feed the controller what a receiver would report on a simulated link."""
    rates = []
    now = 0.0
    controller.poll(now)
    while now < seconds:
        now += controller.window_s
        sent = controller.rate_mbit * 1e6 / 8 / 1500 * controller.window_s  # pages
        if link == "congested":  # a 300 Mbit/s bottleneck
            delivered = min(sent, 300e6 / 8 / 1500 * controller.window_s)
            controller.report("r", received=int(delivered), lost=int(sent - delivered), overrun=0)
        elif link == "random20":
            controller.report("r", received=int(sent * 0.8), lost=int(sent * 0.2), overrun=0)
        elif link == "overrun":  # the receiver's socket drops above 200 Mbit/s
            over = max(0.0, sent - 200e6 / 8 / 1500 * controller.window_s)
            controller.report("r", received=int(sent - over), lost=int(over), overrun=int(over))
        controller.poll(now)
        rates.append(controller.rate_mbit)
    return rates


def test_congestion_converges_near_the_bottleneck() -> None:
    rates = run(RateController(1000.0), "congested")
    tail = rates[len(rates) // 2 :]
    assert 150 <= sum(tail) / len(tail) <= 360
    assert max(tail) < 500


def test_random_loss_does_not_throttle() -> None:
    controller = RateController(1000.0)
    rates = run(controller, "random20")
    tail = rates[len(rates) // 2 :]
    assert min(tail) == 1000.0
    assert controller.loss_floor == pytest.approx(0.2, abs=0.02)


def test_receiver_overrun_slows_down() -> None:
    rates = run(RateController(1000.0), "overrun")
    tail = rates[len(rates) // 2 :]
    assert sum(tail) / len(tail) <= 260


def test_clean_link_reaches_and_keeps_full_rate() -> None:
    controller = RateController(500.0)
    assert controller.rate_mbit <= RateController.START_RATE_MBIT  # slow start
    controller.poll(0.0)
    rates = []
    for i in range(1, 20):
        controller.report("r", received=1000, lost=0, overrun=0)
        controller.poll(i * 0.5)
        rates.append(controller.rate_mbit)
    assert rates == sorted(rates) and rates[-5:] == [500.0] * 5


def test_slow_start_ramps_a_high_limit_quickly() -> None:
    controller = RateController(10_000.0)
    controller.poll(0.0)
    for i in range(1, 13):  # six seconds of clean windows
        controller.report("r", received=1000, lost=0, overrun=0)
        controller.poll(i * 0.5)
    assert controller.rate_mbit == 10_000.0


SANS_IO = ["page", "ranges", "joinreply", "nack", "pacing", "cast", "receiver", "errors"]
FORBIDDEN = {"asyncio", "socket", "time", "os", "selectors", "threading"}


@pytest.mark.parametrize("module", SANS_IO)
def test_cores_import_no_io(module: str) -> None:
    source = Path(__file__).parent.parent / "bootcast" / f"{module}.py"
    tree = ast.parse(source.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN, f"{module} imports {imported & FORBIDDEN}"


def test_random_loss_found_after_an_inconclusive_probe_restores_the_original_rate() -> None:
    """Delivery is noisy while repairs share the link: the first window after a probing
    cut may not show delivery falling, so the controller cuts again; once it finds the loss
    random, it must return to the rate before the first cut, not the second."""
    controller = RateController(100.0, window_s=0.5)
    controller.poll(0.0)

    def window(t: float, received: int, lost: int) -> RateChange | None:
        controller.report("a", received=received, lost=lost, overrun=0)
        return controller.poll(t)

    assert controller.rate_mbit == 100.0
    first = window(0.5, 4000, 1000)  # 20 % loss: probe
    assert first is not None and first.reason == "heavy_loss"
    second = window(1.0, 4000, 1000)  # delivery did not fall: inconclusive, probe again
    assert second is not None and second.reason == "heavy_loss"
    third = window(1.5, 3000, 750)  # delivery fell with the rate: random loss
    assert third is not None and third.reason == "random_loss"
    assert controller.rate_mbit == 100.0
