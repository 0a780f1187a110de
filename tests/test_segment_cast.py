"""Sealed segments cast with bootcast (the "file join/leave mode" of DESIGN §3.3).

A leader started with ``cast_listen`` and small segments offers every *sealed* segment as
``/join/segments/<file>``: ``bootcast fetch`` gets a byte-identical copy, and the copy alone
in an empty directory is a readable log (``LogReader``) holding the same records. The
active segment, the other files of the data directory, traversal and paths outside
``segments/`` are refused with 404.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from boomscooter.client.producer import Producer
from boomscooter.node.runtime import Node
from boomscooter.storage import LogReader
from boomscooter.storage.batch import Record

from support.log import check_exactly_once, payload, running_leader

REPO = Path(__file__).resolve().parent.parent
RECORDS = 3000
SEGMENT_BYTES = 16 * 1024


@dataclass
class CastingLeader:
    node: Node
    data_dir: Path
    records: dict[int, bytes]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.node.cast_port}"

    def sealed(self) -> list[str]:
        return [name for name, _ in self.node.segment_files()[:-1]]

    def active(self) -> str:
        return self.node.segment_files()[-1][0]


@pytest.fixture
async def leader(tmp_path: Path) -> AsyncIterator[CastingLeader]:
    data_dir = tmp_path / "log"
    async with running_leader(
        data_dir, cast_listen="127.0.0.1:0", segment_bytes=SEGMENT_BYTES
    ) as node:
        sent: dict[int, bytes] = {}
        async with Producer(node.address, max_batch_records=100) as producer:
            futures = [(await producer.send(payload("s", i)), i) for i in range(RECORDS)]
            await producer.flush()
        for future, i in futures:
            seqno = future.result()
            assert seqno is not None
            sent[seqno] = payload("s", i)
        yield CastingLeader(node, data_dir, sent)


def read_all(directory: Path) -> list[Record]:
    records: list[Record] = []
    with LogReader(directory) as reader:
        while chunk := reader.read():
            records.extend(chunk)
    return records


async def fetch(url: str, out: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bootcast.cli", "fetch", url, "-O", str(out),
        "--interface", "127.0.0.1", "--timeout", "20", "-q",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, err.decode(errors="replace")


async def test_small_segments_seal_and_the_leader_casts_them(leader: CastingLeader) -> None:
    assert leader.node.cast_port
    sealed = leader.sealed()
    assert len(sealed) >= 3, f"only {len(sealed)} sealed segments: make them smaller"
    for name in sealed:
        assert (leader.data_dir / name).stat().st_size <= SEGMENT_BYTES


async def test_fetch_of_a_sealed_segment_is_byte_identical_and_readable(
    leader: CastingLeader, tmp_path: Path
) -> None:
    names = leader.sealed()
    picks = [names[0], names[len(names) // 2]]
    outs = []
    for name in picks:
        lone = tmp_path / f"copy-{name}"
        lone.mkdir()
        outs.append(lone / name)
    results = await asyncio.gather(
        *(
            fetch(f"{leader.base_url}/join/segments/{name}", out)
            for name, out in zip(picks, outs, strict=True)
        )
    )
    for (code, err), name, out in zip(results, picks, outs, strict=True):
        assert code == 0, err
        assert out.read_bytes() == (leader.data_dir / name).read_bytes()
        # The copy, alone in an empty directory, is a log of its own: the same records.
        records = read_all(out.parent)
        base = int(name.removesuffix(".log"))
        assert records, name
        check_exactly_once(records, base + len(records) - 1, first=base)
        for record in records:
            assert record.payload == leader.records[record.seqno]
        assert sorted(p.name for p in out.parent.iterdir()) == [name], "the reader wrote files"


async def test_every_sealed_segment_fetched_rebuilds_the_whole_sealed_log(
    leader: CastingLeader, tmp_path: Path
) -> None:
    names = leader.sealed()
    copy = tmp_path / "copy"
    copy.mkdir()
    results = await asyncio.gather(
        *(fetch(f"{leader.base_url}/join/segments/{name}", copy / name) for name in names)
    )
    assert all(code == 0 for code, _ in results), [err for _, err in results]
    records = read_all(copy)
    first_active = int(leader.active().removesuffix(".log"))
    check_exactly_once(records, first_active - 1)
    assert {r.seqno: r.payload for r in records} == {
        s: p for s, p in leader.records.items() if s < first_active
    }


async def raw_get(port: int, target: str) -> int:
    """The status of ``GET target`` sent verbatim (an HTTP client would normalize ``..``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    return int(status_line.split()[1])


async def test_only_sealed_segments_are_offered(leader: CastingLeader) -> None:
    sealed = leader.sealed()[0]
    refused = [
        f"segments/{leader.active()}",  # still being written
        "segments/producers.journal",
        "segments/boomscooter.lock",
        f"segments/{sealed.removesuffix('.log')}.index",
        f"segments/../{sealed}",
        "segments/../producers.journal",
        "segments/%2e%2e/producers.journal",
        "segments/..%2fproducers.journal",
        f"segments/./{sealed}",
        f"segments//{sealed}",
        "segments/",
        "segments/00000000000000999999.log",  # no such segment
        sealed,  # outside segments/
        "producers.journal",
        f"other/{sealed}",
        f"segmentsx/{sealed}",
    ]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{leader.base_url}/join/segments/{sealed}") as ok:
            assert ok.status == 200
            await ok.read()
        for path in refused:
            assert leader.node.cast_port is not None
            status = await raw_get(leader.node.cast_port, f"/join/{path}")
            assert status == 404, (path, status)
        # Leave the one cast we started, so the server has nothing running at teardown.
        async with session.get(f"{leader.base_url}/leave/segments/{sealed}") as left:
            await left.read()
