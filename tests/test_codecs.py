"""Join replies, NACK reports and range lists."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bootcast.errors import RemoteProtocolError
from bootcast.joinreply import JoinReply, split_hostport
from bootcast.nack import MAX_RANGES, NackReport
from bootcast.ranges import count_pages, format_ranges, missing_ranges, parse_ranges

SHA = "ab" * 32


def test_join_reply_order_and_round_trip() -> None:
    reply = JoinReply(
        group="239.1.2.3",
        port=5000,
        token="t0k",
        pages=3,
        page_size=1400,
        size=3000,
        sha256=SHA,
        cast_id=77,
        nack_path="/nack/x",
    )
    text = reply.encode()
    assert [line.split("=")[0] for line in text.splitlines()][:4] == [
        "CONNECT",
        "TOKEN",
        "PAGES",
        "PAGESIZE",
    ]
    assert text.startswith("CONNECT=239.1.2.3:5000\nTOKEN=t0k\nPAGES=3\nPAGESIZE=1400\n")
    assert JoinReply.parse(text) == reply


def test_join_reply_ipv6_and_unknown_keys() -> None:
    text = "CONNECT=ff15::b007:1:27000\nTOKEN=a\nPAGES=0\nPAGESIZE=1400\nFUTURE=thing\n"
    reply = JoinReply.parse(text)
    assert (reply.group, reply.port, reply.pages, reply.extra) == (
        "ff15::b007:1",
        27000,
        0,
        {"FUTURE": "thing"},
    )
    assert split_hostport("[ff15::1]:9") == ("ff15::1", 9)


@pytest.mark.parametrize(
    "text",
    [
        "TOKEN=a\nCONNECT=239.1.1.1:5\nPAGES=1\nPAGESIZE=1\n",  # wrong order
        "CONNECT=10.0.0.1:5\nTOKEN=a\nPAGES=1\nPAGESIZE=1\n",  # not multicast
        "CONNECT=239.1.1.1:0\nTOKEN=a\nPAGES=1\nPAGESIZE=1\n",  # port 0
        "CONNECT=239.1.1.1:5\nTOKEN=a\nPAGES=x\nPAGESIZE=1\n",
        "CONNECT=239.1.1.1:5\nTOKEN=a\nPAGES=2\nPAGESIZE=10\nSIZE=5\n",  # SIZE ≠ PAGES
        "CONNECT=239.1.1.1:5\nTOKEN=a\nPAGES=1\nPAGESIZE=10\nSHA256=xyz\n",
        "garbage",
        "",
    ],
)
def test_join_reply_rejects(text: str) -> None:
    with pytest.raises(RemoteProtocolError):
        JoinReply.parse(text)


@pytest.mark.parametrize(
    ("text", "ranges"),
    [("", []), ("1", [(1, 1)]), ("1-5,9,12-20", [(1, 5), (9, 9), (12, 20)])],
)
def test_ranges_table(text: str, ranges: list[tuple[int, int]]) -> None:
    assert parse_ranges(text, pages=20) == ranges
    assert format_ranges(ranges) == text


@pytest.mark.parametrize(
    "text", ["0", "21", "5-3", "3,2", "1-3,3", "a", "1-", "-1", "+1", "1,,2", " 1-2 3"]
)
def test_ranges_reject(text: str) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_ranges(text, pages=20)


def test_ranges_bounded() -> None:
    with pytest.raises(RemoteProtocolError):
        parse_ranges(",".join(str(i) for i in range(1, 100, 2)), pages=100, max_ranges=10)


@given(st.lists(st.booleans(), min_size=1, max_size=300))
def test_missing_ranges_match_naive(bits: list[bool]) -> None:
    have = bytearray([1] + [int(b) for b in bits])
    expected = [i for i, b in enumerate(bits, 1) if not b]
    got = missing_ranges(have, 1, len(bits))
    assert [i for a, b in got for i in range(a, b + 1)] == expected
    assert count_pages(got) == len(expected)


def test_nack_round_trip_and_limits() -> None:
    report = NackReport(missing=[(1, 3), (7, 7)], received=10, lost=4, overrun=1, held=99)
    assert NackReport.parse(report.encode(), pages=10) == report
    assert NackReport.parse(b"", pages=10) == NackReport()
    for body in [
        b"MISSING=11",
        b"RECEIVED=-1",
        b"LOST=x",
        b"\xff\xfe",
        b"noequals",
        b"MISSING=" + b"1," * 70000,
    ]:
        with pytest.raises(RemoteProtocolError):
            NackReport.parse(body, pages=10)
    with pytest.raises(RemoteProtocolError):
        NackReport(missing=[(i, i) for i in range(1, 2 * MAX_RANGES + 2, 2)])
