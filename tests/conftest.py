"""Shared fixtures (loopback multicast slots, in-process bootcast servers and nodes) and the
hooks that print the multicast-group seed and a failing test's groups (``support/net.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import bootcast.logs
from boomscooter.node.config import NodeConfig
from boomscooter.node.runtime import Node, start_leader
from bootcast.server import BootcastServer, ServeConfig, start_server

from support import net, node_cluster
from support.net import random_group

_FIRST_GROUP = pytest.StashKey[int]()


@dataclass(frozen=True, slots=True)
class McastSlot:
    """A base group and port base unlikely to collide with another test's casts."""

    group: str
    port_base: int


@pytest.fixture(autouse=True)
def library_logging() -> Generator[None, None, None]:
    """Every test starts with the packages' logging in library mode: a tool's ``main()``
    run in-process (or a helper that quiets the logs) configures logging for the whole
    process, and structlog's ``capture_logs`` in a later test would then miss events."""
    bootcast.logs.reset()
    yield
    bootcast.logs.reset()


@pytest.fixture
def mcast_slot() -> McastSlot:
    group, port_base = net.group_slot()
    return McastSlot(group=group, port_base=port_base)


def pytest_report_header() -> str:
    return f"multicast groups: BOOMSCOOTER_TEST_GROUP_SEED={net.SEED}"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_FIRST_GROUP] = len(net.handed_out)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        groups = net.handed_out[item.stash.get(_FIRST_GROUP, len(net.handed_out)) :]
        lines = [f"seed {net.SEED} (BOOMSCOOTER_TEST_GROUP_SEED)", *groups]
        report.sections.append(("multicast groups of this test", "\n".join(lines)))
    return report


@dataclass(slots=True)
class RunningServer:
    server: BootcastServer
    runner: web.AppRunner
    port: int
    root: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/join/{path}"

    def metric(self, name: str, **labels: str) -> float:
        """A sample from ``stats()``: ``metric("bootcast_casts_stopped_total", reason="idle")``."""
        key = name
        if labels:
            key += "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"
        return self.server.stats().get(key, 0.0)

    def metric_sum(self, name: str) -> float:
        """The sum of a labelled metric over all its label values."""
        return sum(
            v for k, v in self.server.stats().items() if k == name or k.startswith(name + "{")
        )


StartBootcast = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def start_bootcast(tmp_path: Path, mcast_slot: McastSlot) -> AsyncIterator[StartBootcast]:
    """Factory: ``await start_bootcast(page_size=8192)`` → a server on 127.0.0.1, port 0.

    Serves ``tmp_path / "root"`` (created) unless ``root=`` is given; every server started
    is cleaned up (casts cancelled, sockets closed) after the test.
    """
    runners: list[web.AppRunner] = []
    default_root = tmp_path / "root"
    default_root.mkdir(exist_ok=True)

    async def start(**overrides: Any) -> RunningServer:
        options: dict[str, Any] = {
            "root": default_root,
            "host": "127.0.0.1",
            "port": 0,
            "group": mcast_slot.group,
            "port_base": mcast_slot.port_base,
        }
        options.update(overrides)
        server, runner, port = await start_server(ServeConfig(**options))
        runners.append(runner)
        return RunningServer(server=server, runner=runner, port=port, root=options["root"])

    try:
        yield start
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--sim-seed",
        type=int,
        default=None,
        help="replay one seed of the replication simulation (tests/test_simulation.py)",
    )


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[node_cluster.Start]:
    """``await start(name, **NodeConfig options)``: a node in ``tmp_path/name`` on one
    group for the whole test; every node still running is stopped at the end."""
    group = random_group()
    nodes: list[Node] = []

    async def start(name: str, **options: Any) -> Node:
        settings: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "group": group,
            "interface": "127.0.0.1",
            "heartbeat_ms": 50,
            "fsync": node_cluster.ALWAYS,
        }
        settings.update(options)
        node = await start_leader(NodeConfig(data_dir=str(tmp_path / name), **settings))
        nodes.append(node)
        return node

    try:
        yield start
    finally:
        for node in reversed(nodes):
            await node.stop(grace_s=0.1)  # a no-op for a node the test stopped
