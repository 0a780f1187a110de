"""The log across hosts: a leader in one network namespace, subscribers in three others on
a bridge (:class:`bench.netns.Topology`), nftables dropping 5 % and 20 % of the multicast
that two of them receive.

Every process is the real command line (``boomscooter leader|produce|subscribe``) run with
``ip netns exec``. A producer writes 20,000 records; each subscriber (multicast, joined on
its own veth address) must print every record exactly once, in order, with the right
payload, and the lossy ones must show that they repaired (gaps found, Fetch calls made).
Needs root, iproute2 and nftables; skipped with the reason otherwise. The topology's
context manager tears everything down, also on failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.netns import Topology, netns_available

from support.netns_cluster import Cluster
from support.process import NodeProcess
from support.waiting import PATIENCE_S, eventually_blocking

AVAILABLE, REASON = netns_available()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not AVAILABLE, reason=f"network namespaces unavailable: {REASON}"),
]
REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "boomscooter.cli", "--log-json"]
RECORDS = 20_000
GROUP = "239.255.77.7:27707"
LOSSES = [0, 5, 20]  # percent of the multicast each subscriber's namespace drops


def line(index: int) -> bytes:
    return b"netns-%06d" % index


def done_event(err: bytes) -> dict[str, Any]:
    for raw in err.decode(errors="replace").splitlines():
        if raw.startswith("{"):
            event = json.loads(raw)
            if event.get("event") == "subscribe.done":
                return dict(event)
    raise AssertionError(f"no subscribe.done in {err[-2000:]!r}")


@pytest.mark.slow
def test_lossy_subscribers_in_other_namespaces_get_every_record_once(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with (
        Topology(n_clients=len(LOSSES), prefix="bsl", ipv6=False) as topo,
        Cluster(log_dir=tmp_path) as cluster,
    ):
        leader = cluster.add(NodeProcess(
            "leader",
            [*CLI, "leader", "--data-dir", str(tmp_path / "log"),
             "--listen", f"{topo.server.addr}:7700", "--group", GROUP,
             "--interface", topo.server.addr, "--heartbeat-ms", "50"],
            spawn=lambda argv, **popen: topo.run(topo.server, argv, **popen),
        ))  # fmt: skip
        leader.start()
        server = f"{topo.server.addr}:7700"
        for host, loss in zip(topo.clients, LOSSES, strict=True):
            if loss:
                topo.set_loss(host, loss)
        subscribers = []
        logs = [tmp_path / f"subscriber-{i}.log" for i in range(len(topo.clients))]
        for host, log_file in zip(topo.clients, logs, strict=True):
            argv = [*CLI, "subscribe", "--server", server, "--from", "1", "--count",
                    str(RECORDS), "--json", "--interface", host.addr]  # fmt: skip
            with log_file.open("wb") as log_out:
                pipes: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": log_out}
                subscribers.append(topo.run(host, argv, env=env, cwd=REPO, **pipes))
        # Produce once every subscriber has joined the group: the records then reach them as
        # multicast, not as a catch-up.
        eventually_blocking(
            lambda: all(b'"subscriber.joined"' in f.read_bytes() for f in logs),
            "every subscriber joined the group",
        )
        stdin = b"".join(line(i) + b"\n" for i in range(RECORDS))
        produce = subprocess.run(
            topo.ns_argv(
                topo.server, [*CLI, "produce", "--server", server, "--batch-records", "500"]
            ),
            input=stdin, capture_output=True, env=env, cwd=REPO, timeout=60, check=False,
        )  # fmt: skip
        assert produce.returncode == 0, produce.stderr.decode(errors="replace")
        outputs = [
            (proc.communicate(timeout=PATIENCE_S)[0], log_file.read_bytes())
            for proc, log_file in zip(subscribers, logs, strict=True)
        ]
        dropped = [topo.loss_counters(host) for host in topo.clients]
        assert leader.stop() == 0, leader.tail()

    expected = [line(i).decode() for i in range(RECORDS)]
    for loss, proc, (out, err), drops in zip(LOSSES, subscribers, outputs, dropped, strict=True):
        assert proc.returncode == 0, (loss, err.decode(errors="replace")[-2000:])
        records = [json.loads(raw) for raw in out.splitlines()]
        assert [r["seqno"] for r in records] == list(range(1, RECORDS + 1)), loss
        assert [r["payload"] for r in records] == expected, loss
        done = done_event(err)
        assert done["records"] == RECORDS and done["mode"] == "multicast", done
        if loss:
            assert drops > 0, f"nftables dropped nothing at {loss} %"
            assert done["gaps"] > 0 and done["fetches"] > 0, done
            assert done["fetched_batches"] < RECORDS // 500, "fetched more than it lost"
        else:
            assert drops == 0
    stopped = leader.events("leader.stopped")
    assert stopped and stopped[0]["last_seqno"] == RECORDS
