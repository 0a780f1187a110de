"""Parity repair: the symbol codec, the block arithmetic, and the cast and receiver cores
repairing with parity through a lossy fake network."""

from __future__ import annotations

import random

import pytest

from bootcast import page, parity
from bootcast.cast import CastCore
from bootcast.errors import RemoteProtocolError
from bootcast.joinreply import JoinReply
from bootcast.page import DropReason
from bootcast.receiver import ReceiverCore

PAGE = 100


@pytest.mark.parametrize(
    ("index", "block"), [(1, 0), (16, 0), (17, 1), (32, 1), (33, 2)]
)  # fmt: skip
def test_block_of(index: int, block: int) -> None:
    assert parity.block_of(index, 16) == block


@pytest.mark.parametrize(
    ("block", "pages", "span"),
    [(0, 40, (1, 16)), (1, 40, (17, 16)), (2, 40, (33, 8)), (0, 5, (1, 5))],
)  # fmt: skip
def test_block_span(block: int, pages: int, span: tuple[int, int]) -> None:
    assert parity.block_span(block, pages, 16) == span
    assert parity.block_count(pages, 16) == -(-pages // 16)


@pytest.mark.parametrize("seed", range(10))
def test_any_k_symbols_rebuild_the_block(seed: int) -> None:
    rng = random.Random(seed)
    k = rng.randrange(1, 33)
    data = [rng.randbytes(PAGE) for _ in range(k)]
    extra = rng.randrange(1, 20)
    symbols = dict(enumerate(data))
    numbers = list(range(k, k + extra))
    symbols.update(zip(numbers, parity.encode_symbols(data, numbers), strict=True))
    chosen = rng.sample(sorted(symbols), k)
    assert parity.decode_symbols(k, {n: symbols[n] for n in chosen}) == data


def test_too_few_symbols_and_bad_numbers_are_errors() -> None:
    data = [bytes(PAGE)] * 4
    with pytest.raises(ValueError):
        parity.encode_symbols(data, [3])  # a data symbol's number
    with pytest.raises(ValueError):
        parity.encode_symbols(data, [256])
    with pytest.raises(ValueError):
        parity.decode_symbols(4, {0: bytes(PAGE), 5: bytes(PAGE)})


def test_pad_fills_only_the_short_last_page() -> None:
    assert parity.pad([b"ab", b"c"], 2) == [b"ab", b"c\0"]
    assert parity.pad([b"ab", b"cd"], 2) == [b"ab", b"cd"]


def _datagram(block: int = 3, number: int = 20, cast_id: int = 9) -> bytes:
    return parity.encode_datagram(block, number, cast_id, bytes(range(PAGE)))


def test_datagram_round_trip() -> None:
    sym = parity.decode_datagram(_datagram(), cast_id=9, page_size=PAGE, blocks=10)
    assert sym == parity.Symbol(3, 20, bytes(range(PAGE)), False)
    done = parity.encode_datagram(3, 20, 9, bytes(PAGE), carousel_done=True)
    got = parity.decode_datagram(done, cast_id=9, page_size=PAGE, blocks=10)
    assert got is not None and got.carousel_done


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x40
    return bytes(out)


@pytest.mark.parametrize(
    ("name", "datagram"),
    [
        ("foreign cast", _datagram(cast_id=8)),
        ("block beyond the file", _datagram(block=10)),
        ("flipped payload bit", _flip(_datagram(), page.HEADER_BYTES + 5)),
        ("truncated", _datagram()[:-1]),
        ("trailing garbage", _datagram() + b"x"),
        ("no parity flag", _datagram()[:-2] + b"\x01" + _datagram()[-1:]),
        ("empty", b""),
    ],
)
def test_bad_datagrams_are_not_symbols(name: str, datagram: bytes) -> None:
    assert parity.decode_datagram(datagram, cast_id=9, page_size=PAGE, blocks=10) is None, name


def test_receiver_counts_bad_parity_and_ignores_data_symbol_numbers() -> None:
    core = ReceiverCore(pages=40, page_size=PAGE, size=4000, cast_id=9, now=0.0, block_pages=16)
    core.parity(b"garbage", 0.0)
    assert core.drops[DropReason.BAD_PARITY] == 1
    core.parity(parity.encode_datagram(0, 3, 9, bytes(PAGE)), 0.0)  # 3 < k: a data number
    assert core.parity_received == 0 and core.duplicates == 1


def test_join_reply_parity_round_trip_and_checks() -> None:
    base = dict(group="239.1.1.1", port=5000, token="t", pages=3, page_size=PAGE, size=250)
    reply = JoinReply(**base, cast_id=7, parity_port=5001, block_pages=16)  # type: ignore[arg-type]
    assert "PARITY=5001/16" in reply.encode()
    assert JoinReply.parse(reply.encode()) == reply
    with pytest.raises(RemoteProtocolError):
        JoinReply(**base, cast_id=7, parity_port=5001)  # type: ignore[arg-type]
    with pytest.raises(RemoteProtocolError):
        JoinReply(**base, parity_port=5001, block_pages=16)  # type: ignore[arg-type]
    with pytest.raises(RemoteProtocolError):
        JoinReply(**base, cast_id=7, parity_port=5001, block_pages=300)  # type: ignore[arg-type]


def _simulate(seed: int, loss: float, *, use_parity: bool) -> tuple[int, int]:
    """4 NACK clients through a lossy fake network; returns (datagrams sent, pages)."""
    rng = random.Random(seed)
    size = rng.randrange(20 * PAGE, 600 * PAGE)
    data = rng.randbytes(size)
    pages = page.page_count(size, PAGE)
    bp = 16
    now = 0.0
    cast = CastCore(cast_id=9, pages=pages, idle_loops=50, loop_s=1.0, now=now, block_pages=bp)
    receivers = {}
    for i in range(4):
        cast.join(f"r{i}", now, nack_capable=True, parity=use_parity)
        core = ReceiverCore(
            pages=pages,
            page_size=PAGE,
            size=size,
            cast_id=9,
            now=now,
            block_pages=bp if use_parity else None,
        )
        receivers[f"r{i}"] = (core, bytearray(size))
    sent = 0
    while any(not r.complete for r, _ in receivers.values()):
        now += 0.001
        assert now < 120, "did not converge"
        nxt = cast.next_page(now)
        if nxt is not None:
            sent += not nxt.speculative  # repeats only fill time the link would idle
            if nxt.symbol is not None:
                first, k = parity.block_span(nxt.index, pages, bp)
                chunks = [data[(i - 1) * PAGE : i * PAGE] for i in range(first, first + k)]
                symbol = parity.encode_symbols(parity.pad(chunks, PAGE), [nxt.symbol])[0]
                dgram = parity.encode_datagram(nxt.index, nxt.symbol, 9, symbol)
            else:
                o = (nxt.index - 1) * PAGE
                dgram = page.encode(nxt.index, 9, data[o : o + PAGE], repair=nxt.repair)
            for rcv, buf in receivers.values():
                if rng.random() < loss:
                    continue
                if nxt.symbol is not None:
                    rcv.parity(dgram, now)
                else:
                    got = rcv.datagram(dgram, now)
                    if got is not None:
                        buf[got.offset : got.offset + len(got.payload)] = got.payload
                for block in list(rcv.decodable):
                    held = {
                        i: bytes(buf[(i - 1) * PAGE : i * PAGE])
                        for i in rcv.block_pages_held(block)
                    }
                    for got in rcv.rebuild(block, held, now):
                        buf[got.offset : got.offset + len(got.payload)] = got.payload
        for token, (rcv, _) in receivers.items():
            report = rcv.poll(now)
            if report is not None and rng.random() >= loss:
                cast.nack(token, report, now)
    for rcv, buf in receivers.values():
        assert bytes(buf) == data
        assert rcv.held == pages
    return sent, pages


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("loss", [0.05, 0.2, 0.5])
def test_parity_repair_converges_and_beats_repeats(seed: int, loss: float) -> None:
    sent, pages = _simulate(seed, loss, use_parity=True)
    # Parity's limit is 1/(1-loss) of the file; repeats need about 1.9× at 20 % for 4
    # receivers. Allow for small blocks at the file's end and lost repair rounds.
    assert sent <= pages / (1 - loss) * 1.35 + 40


def test_parity_needs_fewer_datagrams_than_repeats_over_many_seeds() -> None:
    with_parity = sum(_simulate(s, 0.2, use_parity=True)[0] for s in range(6))
    repeats = sum(_simulate(s, 0.2, use_parity=False)[0] for s in range(6))
    assert with_parity < 0.85 * repeats, (with_parity, repeats)
