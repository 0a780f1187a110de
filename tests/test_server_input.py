"""``bootcast serve`` against bad input over real loopback sockets: paths that try to leave
the served directory, garbage and oversized HTTP, malformed NACKs; and the repair
endpoint's aggregation, suppression and repeats."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import random
from pathlib import Path
from typing import Any

import pytest

from conftest import RunningServer, StartBootcast
from support.bootcast_http import (
    REJECTED,
    Joined,
    build_request,
    cast_of,
    content,
    is_repair,
    join,
    listening,
    nack,
    raw_exchange,
    request,
    staged_exchange,
    write_file,
)
from support.spec_client import (
    parse_datagram,
)
from support.waiting import QUIET_S, eventually

MARKER = b"OUTSIDE-THE-ROOT-" + os.urandom(8).hex().encode()

TRAVERSALS = [
    "/join/..",
    "/join/../outside/secret.txt",
    "/join/a/../../outside/secret.txt",
    "/join/a/b/../../../outside/secret.txt",
    "/join/%2e%2e/outside/secret.txt",
    "/join/%2E%2E%2Foutside%2Fsecret.txt",
    "/join/..%2Foutside%2Fsecret.txt",
    "/join/a%2F..%2F..%2Foutside%2Fsecret.txt",
    "/join/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/join//etc/passwd",
    "/join/%2Fetc%2Fpasswd",
    "/join//{outside}/secret.txt",
    "/join/%2F{outside_q}%2Fsecret.txt",
    "/join/link_out",
    "/join/dir_out/secret.txt",
    "/join/a/link_up/outside/secret.txt",
    "/join/ok.txt%00",
    "/join/ok.txt%00.png",
    "/join/%00",
    "/join/..\\outside\\secret.txt",
    "/join/a\\b\\c\\file",
    "/join/%5C..%5Coutside%5Csecret.txt",
    "/join/%252e%252e/outside/secret.txt",
    "/join/%c0%ae%c0%ae/outside/secret.txt",
    "/join/",
    "/join/a/b/c",
    "/join/a/b/c/",
    "/join/nonexistent",
]


@pytest.fixture
def confined_root(tmp_path: Path) -> Path:
    """A served root with files, and symlinks that lead inside and outside it."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir(exist_ok=True)
    outside.mkdir()
    (outside / "secret.txt").write_bytes(MARKER)
    write_file(root, "ok.txt", b"inside")
    write_file(root, "a/b/c/file", b"nested")
    (root / "link_out").symlink_to(outside / "secret.txt")
    (root / "dir_out").symlink_to(outside, target_is_directory=True)
    (root / "a" / "link_up").symlink_to(tmp_path, target_is_directory=True)
    (root / "link_in").symlink_to(root / "a" / "b" / "c" / "file")
    return root


def _target(template: str, root: Path) -> bytes:
    outside = str(root.parent / "outside").lstrip("/")
    return template.format(outside=outside, outside_q=outside.replace("/", "%2F")).encode()


@pytest.mark.parametrize("template", TRAVERSALS)
async def test_join_outside_the_root_is_refused(
    start_bootcast: StartBootcast, confined_root: Path, template: str
) -> None:
    served = await start_bootcast(root=confined_root)
    response = await request(served.port, "GET", _target(template, confined_root))
    assert response.status in REJECTED, response
    assert b"CONNECT=" not in response.body
    assert MARKER not in response.body
    assert not served.server.casts
    assert served.metric("bootcast_casts_started_total") == 0
    assert served.metric("bootcast_joins_total") == 0


@pytest.mark.parametrize(
    ("target", "expected"),
    [("/join/ok.txt", b"inside"), ("/join/a/b/c/file", b"nested"), ("/join/link_in", b"nested")],
)
async def test_raw_join_inside_the_root_works(
    start_bootcast: StartBootcast, confined_root: Path, target: str, expected: bytes
) -> None:
    """The positive control for the traversal cases: the same raw request path works."""
    served = await start_bootcast(root=confined_root)
    response = await request(served.port, "GET", target)
    assert response.status == 200
    values = dict(line.partition("=")[::2] for line in response.body.decode().splitlines())
    assert values["SHA256"] == hashlib.sha256(expected).hexdigest()
    assert served.metric("bootcast_casts_started_total") == 1


async def test_leave_and_nack_outside_the_root_find_no_cast(
    start_bootcast: StartBootcast, confined_root: Path
) -> None:
    served = await start_bootcast(root=confined_root)
    joined = await join(served.port, "ok.txt", nack=True)
    for target in ["/leave/../root/ok.txt", "/leave/%2e%2e/root/ok.txt", "/leave/link_out"]:
        response = await request(served.port, "GET", target, {"X-TOKEN": joined.info.token})
        assert response.status in REJECTED, target
    assert cast_of(served, "ok.txt").core.clients == 1  # type: ignore[union-attr]


# -- garbage on the HTTP port -----------------------------------------------------------------


def _garbage(name: str, token: str) -> bytes:
    rng = random.Random(name)
    if name == "random-bytes":
        return rng.randbytes(4096)
    if name == "random-bytes-after-get":
        return b"GET /join/ok.txt HTTP/1.1\r\n" + rng.randbytes(2048) + b"\r\n\r\n"
    if name == "request-line-100kB":
        return b"GET /join/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    if name == "header-over-8kB":
        return build_request("GET", "/join/ok.txt", {"X-Big": "b" * 9000})
    if name == "5000-headers":
        return build_request("GET", "/join/ok.txt", {f"X-H{i}": "v" for i in range(5000)})
    if name == "nack-body-over-64kB":
        body = b"MISSING=1\n" + b"X=" + b"y" * 70_000 + b"\n"
        return build_request("POST", "/nack/ok.txt", {"X-TOKEN": token}, body)
    if name == "nack-chunked-over-64kB":
        chunk = b"X=" + b"y" * 39_997 + b"\n"
        body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(2)) + b"0\r\n\r\n"
        return (
            b"POST /nack/ok.txt HTTP/1.1\r\nHost: x\r\nX-TOKEN: "
            + token.encode()
            + b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            + body
        )
    if name == "bad-method":
        return build_request("BREW", "/join/ok.txt")
    if name == "unrouted-method":
        return build_request("DELETE", "/join/ok.txt")
    if name == "bad-version":
        return b"GET /join/ok.txt HTTP/9.9\r\nHost: x\r\nConnection: close\r\n\r\n"
    if name == "negative-content-length":
        return b"POST /nack/ok.txt HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"
    if name == "nul-in-request-line":
        return b"GET /join/ok.txt\x00 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    raise AssertionError(name)


GARBAGE = [
    "random-bytes",
    "random-bytes-after-get",
    "request-line-100kB",
    "header-over-8kB",
    "5000-headers",
    "nack-body-over-64kB",
    "nack-chunked-over-64kB",
    "bad-method",
    "unrouted-method",
    "bad-version",
    "negative-content-length",
    "nul-in-request-line",
]


@pytest.mark.parametrize("name", GARBAGE)
async def test_garbage_http_is_rejected_and_the_server_survives(
    start_bootcast: StartBootcast, name: str
) -> None:
    served = await start_bootcast()
    write_file(served.root, "ok.txt", content(3000))
    holder = await join(served.port, "ok.txt", nack=True)  # a token for the NACK cases
    rejected_before = served.metric_sum("bootcast_http_rejected_total")

    response = await raw_exchange(served.port, _garbage(name, holder.info.token))

    if response is not None:
        assert response.status >= 400, response
        assert b"CONNECT=" not in response.body
        await eventually(
            lambda: served.metric_sum("bootcast_http_rejected_total") > rejected_before,
            what="bootcast_http_rejected counted the error answer",
        )
    assert served.metric("bootcast_joins_total") == 1  # the garbage joined nobody
    assert served.metric("bootcast_nacks_received_total") == 0
    # Still serving: a normal join of another file works.
    write_file(served.root, "after.txt", content(10))
    after = await join(served.port, "after.txt")
    assert after.info.pages == 1


# -- NACK -------------------------------------------------------------------------------------

MALFORMED_NACKS = [
    b"MISSING=0",
    b"MISSING=11",  # beyond PAGES (10)
    b"MISSING=5-11",
    b"MISSING=1-999999999999999999999",
    b"MISSING=5-3",  # descending range
    b"MISSING=6,2",  # descending list
    b"MISSING=2-4,4-6",  # overlapping
    b"MISSING=-1",
    b"MISSING=1-",
    b"MISSING=+1",
    b"MISSING=1,,2",
    b"MISSING=a-b",
    b"MISSING=0x3",
    b"MISSING=1 2",
    "MISSING=\u0663".encode(),  # ARABIC-INDIC DIGIT THREE
    "MISSING=\u00b2".encode(),  # SUPERSCRIPT TWO
    b"MISSING=1\xff",
    b"\xfe\xff\x00M\x00I",
    b"RECEIVED=-5",
    b"LOST=lots",
    b"MISSING 3",
    b"MISSING=" + b",".join(b"%d" % i for i in range(1, 5000, 2)),  # > 2048 ranges
]


async def _paused_nack_cast(
    start_bootcast: StartBootcast, pages: int, clients: int = 1, **options: Any
) -> tuple[RunningServer, list[Joined]]:
    """A cast whose clients are all NACK-capable, after its first pass: it is paused."""
    served = await start_bootcast(page_size=1400, idle_loops=60, **options)
    write_file(served.root, "f", content(pages * 1400 - 100))
    joined = [await join(served.port, "f", nack=True) for _ in range(clients)]
    core = cast_of(served, "f").core
    assert core is not None
    await eventually(lambda: core.paused, what="the first pass done")
    # At least one pass; clients that joined during it extend it to a full pass from where
    # each came in.
    assert served.metric("bootcast_pages_sent_total") >= pages
    # Past the suppression window of the first pass, a NACK leads to a resend.
    await asyncio.sleep(core.suppress_s + 0.05)
    return served, joined


@pytest.mark.parametrize("body", MALFORMED_NACKS)
async def test_malformed_nack_is_400(start_bootcast: StartBootcast, body: bytes) -> None:
    served = await start_bootcast(idle_loops=60)
    write_file(served.root, "f", content(10 * 1400 - 1))
    joined = await join(served.port, "f", nack=True)
    response = await nack(served.port, "f", joined.info.token, body)
    assert response.status == 400, (body[:60], response)
    assert served.metric("bootcast_nacks_received_total") == 0
    assert cast_of(served, "f").core.repair_backlog == 0  # type: ignore[union-attr]


async def test_nack_needs_a_token_of_that_cast(start_bootcast: StartBootcast) -> None:
    served = await start_bootcast(idle_loops=60)
    write_file(served.root, "f", content(5 * 1400))
    write_file(served.root, "g", content(5 * 1400, 1))
    joined = await join(served.port, "f", nack=True)
    other = await join(served.port, "g", nack=True)
    body = b"MISSING=2\n"
    assert (await nack(served.port, "f", None, body)).status == 400
    assert (await nack(served.port, "f", "", body)).status == 400
    assert (await nack(served.port, "f", "no-such-token", body)).status == 404
    assert (await nack(served.port, "f", other.info.token, body)).status == 404
    assert (await nack(served.port, "nothere", joined.info.token, body)).status == 404
    assert served.metric("bootcast_nacks_received_total") == 0
    # GET on the NACK endpoint is not a NACK either.
    assert (
        await request(served.port, "GET", "/nack/f", {"X-TOKEN": joined.info.token})
    ).status == 405


async def test_nack_resends_the_page_marked_as_repair(start_bootcast: StartBootcast) -> None:
    served, (client,) = await _paused_nack_cast(start_bootcast, pages=10, repeat_repairs=False)
    cast_id = client.cast_id
    async with listening(client.info.group, client.info.port) as listener:
        response = await nack(served.port, "f", client.info.token, b"MISSING=7\nRECEIVED=9\n")
        assert (response.status, response.body) == (204, b"")
        await eventually(
            lambda: any(
                parse_datagram(d).index == 7  # type: ignore[union-attr]
                for _, d in listener.datagrams(cast_id)
            ),
            what="page 7 resent",
        )
        await asyncio.sleep(0.2)  # anything else that would follow
    got = listener.datagrams(cast_id)
    assert len(got) == 1, [parse_datagram(d) for _, d in got]
    datagram = got[0][1]
    page = parse_datagram(datagram)
    assert page is not None and page.index == 7
    assert is_repair(datagram)
    assert page.payload == content(10 * 1400 - 100)[6 * 1400 : 7 * 1400]
    assert served.metric("bootcast_pages_resent_total") == 1
    assert served.metric("bootcast_nack_pages_total", outcome="queued") == 1


async def test_fifty_nacks_for_one_page_cause_one_resend(start_bootcast: StartBootcast) -> None:
    served, clients = await _paused_nack_cast(
        start_bootcast, pages=20, clients=50, rate_mbit=5.0, repeat_repairs=False
    )
    cast_id = clients[0].cast_id
    assert len({c.info.token for c in clients}) == 50
    async with listening(clients[0].info.group, clients[0].info.port) as listener:
        requests = [
            build_request(
                "POST",
                "/nack/f",
                {"X-TOKEN": c.info.token, "Content-Type": "text/plain"},
                b"MISSING=5\n",
            )
            for c in clients
        ]
        responses = await staged_exchange(served.port, requests)
        assert [r.status if r else None for r in responses] == [204] * 50
        await eventually(
            lambda: served.metric("bootcast_pages_resent_total") >= 1,
            what="page 5 resent",
        )
        await asyncio.sleep(0.3)  # a second resend would come within this
    resent = [d for _, d in listener.datagrams(cast_id) if is_repair(d)]
    assert [parse_datagram(d).index for d in resent] == [5]  # type: ignore[union-attr]
    assert len(listener.datagrams(cast_id)) == 1
    assert served.metric("bootcast_pages_resent_total") == 1
    assert served.metric("bootcast_nacks_received_total") == 50
    queued = served.metric("bootcast_nack_pages_total", outcome="queued")
    others = served.metric("bootcast_nack_pages_total", outcome="aggregated") + served.metric(
        "bootcast_nack_pages_total", outcome="suppressed"
    )
    assert (queued, others) == (1, 49)


async def test_idle_link_repeats_recent_repairs_briefly(start_bootcast: StartBootcast) -> None:
    """While clients are still asking, the idle link repeats a recent repair once, a
    suppression window after it went out."""
    served, (client,) = await _paused_nack_cast(start_bootcast, pages=10)
    cast = cast_of(served, "f")
    assert cast.core is not None
    # Clients count as still asking for longer than the default 0.3 s: a loaded host can
    # hold the send loop off past a window that short, and then no repeat is due at all.
    cast.core.speculate_s = 10.0
    async with listening(client.info.group, client.info.port) as listener:
        response = await nack(served.port, "f", client.info.token, b"MISSING=7\n")
        assert response.status == 204
        await eventually(
            lambda: len(listener.datagrams(client.cast_id)) >= 2, "the repair and its repeat"
        )
        await asyncio.sleep(QUIET_S)  # a second repeat would come within this
    got = [(t, parse_datagram(d)) for t, d in listener.datagrams(client.cast_id)]
    assert [p.index for _, p in got if p is not None] == [7] * len(got)
    assert len(got) == 2
    times = [t for t, _ in got]
    assert all(b - a >= cast.core.suppress_s * 0.9 for a, b in itertools.pairwise(times))
    assert served.metric("bootcast_pages_resent_total") == 1
    assert served.metric("bootcast_pages_repeated_total") == len(got) - 1
