"""The receiver core: reassembly under loss, reordering and duplication; NACK generation."""

from __future__ import annotations

import random

import pytest

from bootcast import page
from bootcast.cast import CastCore
from bootcast.nack import NackReport
from bootcast.page import DropReason
from bootcast.receiver import ReceiverCore

PAGE = 100


def pages_of(data: bytes, cast_id: int = 9) -> list[bytes]:
    return [
        page.encode(i + 1, cast_id, data[o : o + PAGE])
        for i, o in enumerate(range(0, len(data), PAGE))
    ]


def assemble(core: ReceiverCore, datagrams: list[bytes], buf: bytearray, now: float = 0.0) -> None:
    for d in datagrams:
        got = core.datagram(d, now)
        if got is not None:
            buf[got.offset : got.offset + len(got.payload)] = got.payload


@pytest.mark.parametrize("size", [1, 99, 100, 101, 1000, 1234])
@pytest.mark.parametrize("seed", range(5))
def test_shuffled_duplicated_dropped_then_complete(size: int, seed: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(size)
    dgrams = pages_of(data)
    core = ReceiverCore(pages=len(dgrams), page_size=PAGE, size=size, cast_id=9, now=0.0)
    buf = bytearray(size)
    noisy = [d for d in dgrams if rng.random() > 0.3]
    noisy += rng.sample(dgrams, k=len(dgrams) // 2)
    noisy += [rng.randbytes(rng.randrange(40)) for _ in range(10)]
    noisy += [page.encode(1, 1234, b"x" * PAGE)]  # foreign cast
    rng.shuffle(noisy)
    assemble(core, noisy, buf)
    assemble(core, dgrams, buf)  # the carousel comes round again
    assert core.complete and bytes(buf) == data and core.file_size() == size
    assert core.drops[DropReason.FOREIGN] == 1


def test_size_unknown_is_learned_from_the_last_page() -> None:
    data = bytes(range(250))
    core = ReceiverCore(pages=3, page_size=PAGE, size=None, cast_id=None, now=0.0)
    assemble(core, pages_of(data), bytearray(300))
    assert core.complete and core.file_size() == 250


def test_pages_of_the_wrong_size_are_dropped() -> None:
    core = ReceiverCore(pages=3, page_size=PAGE, size=250, cast_id=9, now=0.0)
    assert core.datagram(page.encode(1, 9, b"short"), 0.0) is None
    assert core.datagram(page.encode(3, 9, b"x" * 100), 0.0) is None  # last page is 50
    assert core.datagram(page.encode(4, 9, b"x" * 50), 0.0) is None  # beyond PAGES
    assert core.drops[DropReason.BAD_SIZE] == 2 and core.drops[DropReason.BAD_INDEX] == 1
    assert core.held == 0


def test_gaps_are_nacked_quickly_and_only_inside_the_passed_region() -> None:
    data = bytes(2000)
    dgrams = pages_of(data)
    core = ReceiverCore(
        pages=20, page_size=PAGE, size=2000, cast_id=9, now=0.0, idle_s=5.0, carousel_quiet_s=5.0
    )
    # A late joiner: first sees page 5, loses 8 and 9.
    for i in [5, 6, 7, 10, 11]:
        core.datagram(dgrams[i - 1], 0.0)
    assert core.poll(0.01) is None  # NACKs wait a moment for reordering
    report = core.poll(0.05)
    assert report is not None and report.missing == [(8, 9)] and report.lost == 2
    assert report.received == 5
    # The periodic sweep asks for the passed region only, not pages 1-4 or 12-20.
    report = core.poll(0.06 + core.report_interval_s)
    assert report is not None and report.missing == [(8, 9)]


def test_idle_receiver_asks_for_everything_missing() -> None:
    dgrams = pages_of(bytes(1000))
    core = ReceiverCore(pages=10, page_size=PAGE, size=1000, cast_id=9, now=0.0)
    for i in [3, 4, 5]:
        core.datagram(dgrams[i - 1], 0.0)
    report = core.poll(1.0)
    assert report is not None and report.missing == [(1, 2), (6, 10)]


def test_repairs_do_not_confuse_gap_detection() -> None:
    dgrams = pages_of(bytes(1000))
    repair = page.encode(2, 9, bytes(PAGE), repair=True)
    core = ReceiverCore(pages=10, page_size=PAGE, size=1000, cast_id=9, now=0.0)
    core.datagram(dgrams[0], 0.0)
    core.datagram(dgrams[2], 0.0)  # lost 2
    core.datagram(repair, 0.0)  # repair of 2 arrives between carousel pages
    core.datagram(dgrams[3], 0.0)
    report = core.poll(0.05)
    assert report is not None and report.missing == [] and report.lost == 1
    assert core.repairs_received == 1


def test_overrun_is_reported_as_a_delta() -> None:
    core = ReceiverCore(pages=10, page_size=PAGE, size=1000, cast_id=9, now=0.0)
    core.overrun(5)
    first = core.poll(1.0)
    core.overrun(7)
    second = core.poll(2.0)
    assert first is not None and second is not None
    assert (first.overrun, second.overrun) == (5, 2)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("loss", [0.05, 0.2, 0.5])
def test_cast_and_receivers_converge_under_loss(seed: int, loss: float) -> None:
    """The two cores wired together through a lossy fake network, NACK clients only."""
    rng = random.Random(seed)
    size = rng.randrange(1, 300 * PAGE)
    data = rng.randbytes(size)
    pages = page.page_count(size, PAGE)
    now = 0.0
    cast = CastCore(cast_id=9, pages=pages, idle_loops=50, loop_s=1.0, now=now)
    receivers = {}
    for i in range(4):
        cast.join(f"r{i}", now, nack_capable=True)
        receivers[f"r{i}"] = (
            ReceiverCore(pages=pages, page_size=PAGE, size=size, cast_id=9, now=now),
            bytearray(size),
        )
    sent = 0
    while any(not r.complete for r, _ in receivers.values()):
        now += 0.001
        assert now < 120, "did not converge"
        nxt = cast.next_page(now)
        if nxt is not None:
            sent += not nxt.speculative  # repeats only fill time the link would idle
            o = (nxt.index - 1) * PAGE
            dgram = page.encode(nxt.index, 9, data[o : o + PAGE], repair=nxt.repair)
            for rcv, buf in receivers.values():
                if rng.random() >= loss:
                    assemble(rcv, [dgram], buf, now)
        for token, (rcv, _) in receivers.items():
            report: NackReport | None = rcv.poll(now)
            if report is not None and rng.random() >= loss:
                cast.nack(token, report, now)
    for _rcv, buf in receivers.values():
        assert bytes(buf) == data
    # Repeating lost pages costs about 1/(1-loss) per receiver, more for the slowest of 4.
    assert sent <= pages * (1 + 6 * loss) + 10


def test_reordered_carousel_pages_are_not_a_wrap() -> None:
    dgrams = pages_of(bytes(10_000))  # 100 pages
    core = ReceiverCore(pages=100, page_size=PAGE, size=10_000, cast_id=9, now=0.0)
    order = [*range(1, 40), 41, 40, *range(42, 60)]  # 40 and 41 swapped on the way
    for i in order:
        core.datagram(dgrams[i - 1], 0.0)
    report = core.poll(0.05)
    assert report is not None and report.missing == [] and report.lost == 0
    # A real wrap after a lost tail is still a wrap.
    for i in [1, 2]:
        core.datagram(dgrams[i - 1], 0.1)
    report = core.poll(0.2)
    assert report is not None and report.lost == 41 and report.missing == [(60, 100)]


def test_a_quiet_carousel_means_ask_for_everything() -> None:
    """Repairs keep arriving, but the carousel has stopped (the server does so once every
    NACK client had its pass): what was never seen, before the first page too, is asked for."""
    dgrams = pages_of(bytes(1000))
    core = ReceiverCore(
        pages=10, page_size=PAGE, size=1000, cast_id=9, now=0.0, idle_s=5.0, carousel_quiet_s=0.1
    )
    for i in [3, 4, 5, 6, 7, 8, 9]:
        core.datagram(dgrams[i - 1], 0.0)
    core.datagram(page.encode(2, 9, bytes(PAGE), repair=True), 0.05)
    report = core.poll(0.06)
    assert report is None or report.missing == []  # the carousel may still come round
    core.datagram(page.encode(2, 9, bytes(PAGE), repair=True), 0.15)  # a repeat, not carousel
    report = core.poll(0.3)
    assert report is not None and report.missing == [(1, 1), (10, 10)]


def test_a_repair_flagged_carousel_done_means_ask_for_everything_now() -> None:
    """Our server flags repairs sent while the carousel is paused: no need to wait for the
    carousel to go quiet (repairs crowding it out for a while must not look like its end)."""
    dgrams = pages_of(bytes(1000))
    core = ReceiverCore(pages=10, page_size=PAGE, size=1000, cast_id=9, now=0.0, idle_s=5.0)
    for i in [3, 4, 5, 6, 7, 8, 9]:
        core.datagram(dgrams[i - 1], 0.0)
    core.datagram(page.encode(2, 9, bytes(PAGE), repair=True), 0.05)
    core.datagram(page.encode(2, 9, bytes(PAGE), repair=True), 0.2)
    report = core.poll(0.3)
    assert report is None or report.missing == []  # 0.2 s quiet: repairs may crowd it out
    done = bytearray(page.encode(2, 9, bytes(PAGE), repair=True))
    done[-2] |= page.FLAG_CAROUSEL_DONE
    core.datagram(bytes(done), 0.31)
    report = core.poll(0.6)
    assert report is not None and report.missing == [(1, 1), (10, 10)]
