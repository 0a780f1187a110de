"""The event-loop watchdog (``boomscooter/node/watchdog.py``): a blocked loop is logged once
per stall, with the stack of the loop's thread where it is stuck, and counted."""

from __future__ import annotations

import time

from structlog.testing import capture_logs

from boomscooter.node.watchdog import LoopWatchdog

from support.waiting import eventually


def block_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # a synchronous call on the event loop: the stall under test


async def test_a_blocked_loop_is_logged_with_where_it_is_stuck() -> None:
    watchdog = LoopWatchdog(bound_s=0.2, interval_s=0.05)
    with capture_logs() as logs:
        watchdog.start()
        try:
            block_the_loop(2.0)
            await eventually(
                lambda: any(e["event"] == "node.loop_unblocked" for e in logs), "the stall's end"
            )
        finally:
            watchdog.stop()
    blocked = [e for e in logs if e["event"] == "node.loop_blocked"]
    assert len(blocked) == 1 and watchdog.stalls == 1, logs
    assert blocked[0]["blocked_s"] > 0.2
    assert any("block_the_loop" in line for line in blocked[0]["stack"]), blocked[0]["stack"]
    (unblocked,) = [e for e in logs if e["event"] == "node.loop_unblocked"]
    assert unblocked["blocked_s"] >= 1.9
