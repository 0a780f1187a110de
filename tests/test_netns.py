"""Multi-host tests: a server and clients in network namespaces on a bridge, with loss.

nftables in a client's namespace drops a random share of the multicast it receives (the
kernel here has no netem). Needs root, iproute2 and nftables; skipped with the reason
otherwise. Every namespace is torn down by the topology's context manager.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bench.netns import Topology, netns_available

AVAILABLE, REASON = netns_available()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not AVAILABLE, reason=f"network namespaces unavailable: {REASON}"),
]
REPO = Path(__file__).resolve().parent.parent
BOOTCAST = [sys.executable, "-m", "bootcast"]


def wait_listening(
    proc: subprocess.Popen[str], log: list[dict[str, object]]
) -> tuple[int, threading.Thread]:
    """Read the server's JSON log until it says where it listens; keep draining it in a
    thread (a full pipe would block the server)."""
    assert proc.stderr is not None
    stream = proc.stderr
    for line in stream:
        event = json.loads(line)
        log.append(event)
        if event["event"] == "serve.listening":
            drain = threading.Thread(
                target=lambda: log.extend(json.loads(x) for x in stream), daemon=True
            )
            drain.start()
            return int(str(event["port"])), drain
    raise AssertionError("bootcast serve did not start")


@pytest.mark.slow
@pytest.mark.parametrize("loss", [5, 20])
def test_lossy_clients_verify_with_fetch_and_with_the_spec_client(
    tmp_path: Path, loss: int
) -> None:
    root = tmp_path / "srv"
    (root / "img").mkdir(parents=True)
    data = os.urandom(6 * 1024 * 1024 + 777)
    (root / "img" / "initrd").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with Topology(n_clients=4, server_rate_mbit=200, prefix="bct") as topo:
        server = topo.run(
            topo.server,
            [
                *BOOTCAST,
                "--log-json",
                "serve",
                "--dir",
                str(root),
                "--listen",
                f"{topo.server.addr}:8080",
                "--rate",
                "190",
                "--idle-loops",
                "200",
            ],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        server_log: list[dict[str, object]] = []
        port, drain = wait_listening(server, server_log)
        url = f"http://{topo.server.addr}:{port}/join/img/initrd"
        lossy_fetch, lossy_spec, clean_fetch, clean_spec = topo.clients
        topo.set_loss(lossy_fetch, loss)
        topo.set_loss(lossy_spec, loss)
        outputs = {h.name: tmp_path / f"{h.name}.out" for h in topo.clients}
        procs = []
        for host in (lossy_fetch, clean_fetch):
            procs.append(
                topo.run(
                    host,
                    [
                        *BOOTCAST,
                        "fetch",
                        url,
                        "-O",
                        str(outputs[host.name]),
                        "-q",
                        "--timeout",
                        "60",
                    ],
                    env=env,
                    cwd=tmp_path,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for host in (lossy_spec, clean_spec):
            procs.append(
                topo.run(
                    host,
                    [
                        sys.executable,
                        "-m",
                        "tests.support.spec_client",
                        url,
                        "--interface",
                        host.addr,
                        "-O",
                        str(outputs[host.name]),
                        "--timeout",
                        "120",
                    ],
                    env=env,
                    cwd=REPO,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for proc in procs:
            _, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err
        assert topo.loss_counters(lossy_fetch) > 0 and topo.loss_counters(lossy_spec) > 0
        server.terminate()
        server.wait(timeout=10)
        drain.join(10)
        assert server.stderr is not None
        server.stderr.close()
    stopped = [e for e in server_log if e["event"] == "cast.stopped"]
    assert stopped and stopped[0]["reason"] == "last_leave"
    for host_name, path in outputs.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, host_name


@pytest.mark.slow
@pytest.mark.parametrize("parity", [True, False])
def test_fetch_clients_repair_with_parity_or_pages(tmp_path: Path, parity: bool) -> None:
    """Three fetch clients, 20 % loss on each, no spec client (so nothing but repairs
    follows the first pass): with parity the losses are repaired by parity symbols, with
    --no-parity by resent pages; every copy verifies either way."""
    root = tmp_path / "srv"
    root.mkdir()
    data = os.urandom(4 * 1024 * 1024 + 123)
    (root / "img").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with Topology(n_clients=3, server_rate_mbit=200, prefix="bcp") as topo:
        server = topo.run(
            topo.server,
            [*BOOTCAST, "--log-json", "serve", "--dir", str(root), "--rate", "190",
             "--listen", f"{topo.server.addr}:8080"],
            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
        )  # fmt: skip
        server_log: list[dict[str, object]] = []
        port, drain = wait_listening(server, server_log)
        url = f"http://{topo.server.addr}:{port}/join/img"
        topo.set_all_loss(20)
        outputs = [tmp_path / f"out{i}" for i in range(3)]
        extra = [] if parity else ["--no-parity"]
        procs = []
        for host, out in zip(topo.clients, outputs, strict=True):
            argv = [*BOOTCAST, "fetch", url, "-O", str(out), "-q", "--timeout", "60", *extra]
            procs.append(
                topo.run(host, argv, env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
            )
        for proc in procs:
            _, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err
        assert all(topo.loss_counters(host) > 0 for host in topo.clients)
        server.terminate()
        server.wait(timeout=10)
        drain.join(10)
        assert server.stderr is not None
        server.stderr.close()
    stopped = [e for e in server_log if e["event"] == "cast.stopped"]
    assert stopped and stopped[0]["reason"] == "last_leave"
    joined = [e for e in server_log if e["event"] == "cast.joined"]
    assert [e["parity"] for e in joined] == [parity] * 3
    parity_sent, resent = int(str(stopped[0]["parity_sent"])), int(str(stopped[0]["pages_resent"]))
    pages = -(-len(data) // 1400)
    if parity:
        # 20 % loss at three clients: about a quarter of the pages again, as symbols.
        assert pages * 0.15 < parity_sent < pages * 0.8, (parity_sent, pages)
        assert resent < pages * 0.05, resent
    else:
        assert parity_sent == 0
        assert resent > pages * 0.15, (resent, pages)
    for out in outputs:
        assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
