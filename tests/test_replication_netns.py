"""Replication across hosts: a leader in one network namespace, two replicas in two others
on a bridge (:class:`bench.netns.Topology`), nftables dropping 5 % of the multicast that
reaches one replica and 20 % of what reaches the other; a subscriber in a fourth namespace
(also losing 5 % of its multicast) reads the log through the 20 % replica.

Every process is the real command line (``boomscooter leader|replica|produce|subscribe|
status``) run with ``ip netns exec``. The leader commits at ``--min-insync 2`` (itself and
one replica) with ``--fsync interval``; ``produce --acks quorum`` writes 50,000 records and
exits 0 only once every one is acknowledged at quorum, at seqnos ``first..last``. Then:

* every node's ``status`` reaches the same last and commit seqno, both replicas in sync;
* the lossy replicas repaired: their ``status`` counters show gaps found and batches
  fetched, fewer batches fetched than the log holds (the multicast carried the rest),
  and nftables counted drops in their namespaces;
* the subscriber printed every record exactly once, in order, with its payload;
* once every node stopped (cleanly), the three data directories hold the same log — the
  same segment files byte for byte — and every acknowledged seqno has its payload.

Needs root, iproute2 and nftables; skipped with the reason otherwise. The topology's
context manager (and the :class:`Cluster`) tear everything down, also on failure.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from bench.netns import Host, Topology, netns_available

from support.netns_cluster import (
    Cluster,
    log_digest,
    node_argv,
    read_payloads,
    segment_digests,
    status,
    wait_status,
)
from support.process import CLI, ENV, REPO, NodeProcess

AVAILABLE, REASON = netns_available()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not AVAILABLE, reason=f"network namespaces unavailable: {REASON}"),
]
RECORDS = 50_000
BATCH_RECORDS = 500
GROUP = "239.255.77.8:27708"
PORT = 7700
LOSSES = {"replica-5": 5, "replica-20": 20}  # percent of the multicast each one drops
SUBSCRIBER_LOSS = 5


def line(index: int) -> bytes:
    return b"replicated-%06d" % index


def spawn_in(topo: Topology, host: Host) -> Any:
    """A ``spawn`` for :class:`NodeProcess`: start in ``host``'s namespace (the topology
    terminates it on teardown too)."""
    return lambda argv, **popen: topo.run(host, argv, **popen)


def test_lossy_replicas_in_other_namespaces_hold_every_acked_record(tmp_path: Path) -> None:
    with Topology(n_clients=3, prefix="bsr", ipv6=False) as topo, Cluster(tmp_path) as cluster:
        hosts = dict(zip(LOSSES, topo.clients, strict=False))
        reader = topo.clients[2]
        in_leader_ns = topo.ns_argv(topo.server, [])
        server = f"{topo.server.addr}:{PORT}"
        leader = cluster.add(NodeProcess("leader", node_argv(
            "leader", tmp_path / "leader", listen=server, group=GROUP,
            interface=topo.server.addr, fsync="interval",
            extra=["--min-insync", "2", "--heartbeat-ms", "50"],
        ), spawn=spawn_in(topo, topo.server)))  # fmt: skip
        leader.start()
        replicas = []
        for name, host in hosts.items():
            topo.set_loss(host, LOSSES[name])
            replicas.append(cluster.add(NodeProcess(name, node_argv(
                "replica", tmp_path / name, listen=f"{host.addr}:{PORT}",
                group="239.255.77.9:27709", interface=host.addr, fsync="interval",
                leader=server, extra=["--heartbeat-ms", "50"],
            ), spawn=spawn_in(topo, host))))  # fmt: skip
        for replica in replicas:
            replica.start()
        wait_status(
            server,
            lambda s: len(s["replicas"]) == 2 and all(r["in_sync"] for r in s["replicas"]),
            timeout_s=30,
            prefix=in_leader_ns,
        )

        # A multicast subscriber of the 20 % replica, itself losing 5 %: it joins the
        # leader's stream (the replica's handshake names it) and repairs from the replica.
        topo.set_loss(reader, SUBSCRIBER_LOSS)
        subscriber = topo.run(reader, [
            *CLI, "--log-json", "subscribe", "--server", f"{hosts['replica-20'].addr}:{PORT}",
            "--from", "1",
            "--count", str(RECORDS), "--interface", reader.addr,
        ], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=REPO)  # fmt: skip
        outputs: list[tuple[bytes, bytes]] = []  # read at once: a full pipe would stall it
        reading = threading.Thread(target=lambda: outputs.append(subscriber.communicate()))
        reading.start()
        replica_20 = replicas[1]
        replica_20.wait_for("rpc.handshake", lambda events: bool(events), timeout_s=30)

        produce = subprocess.run(
            topo.ns_argv(topo.server, [
                *CLI, "--log-json", "produce", "--server", server, "--acks", "quorum",
                "--batch-records", str(BATCH_RECORDS),
            ]),
            input=b"".join(line(i) + b"\n" for i in range(RECORDS)),
            capture_output=True, env=ENV, cwd=REPO, timeout=120, check=False,
        )  # fmt: skip
        assert produce.returncode == 0, produce.stderr.decode(errors="replace")[-3000:]
        done = [json.loads(x) for x in produce.stderr.splitlines() if x.startswith(b"{")]
        (summary,) = [e for e in done if e["event"] == "produce.done"]
        # One producer, records in order, each acked at quorum: record i is at seqno i + 1.
        assert (summary["records"], summary["first_seqno"], summary["last_seqno"]) == (
            RECORDS, 1, RECORDS,
        ), summary  # fmt: skip

        for node, host in [(leader, topo.server), *zip(replicas, hosts.values(), strict=True)]:
            wait_status(
                node.address,
                lambda s: s["last_seqno"] == RECORDS and s["commit_seqno"] == RECORDS,
                timeout_s=30,
                prefix=topo.ns_argv(host, []),
            )
        final = status(server, in_leader_ns)
        assert [(r["in_sync"], r["durable_seqno"]) for r in final["replicas"]] == [
            (True, RECORDS), (True, RECORDS),
        ], final  # fmt: skip
        counters = {
            r.name: status(r.address, topo.ns_argv(host, []))["counters"]
            for r, host in zip(replicas, hosts.values(), strict=True)
        }
        reading.join(60)
        assert outputs, "the subscriber did not end within 60 s"
        ((out, err),) = outputs
        drops = {name: topo.loss_counters(host) for name, host in hosts.items()}
        subscriber_drops = topo.loss_counters(reader)
        exits = cluster.stop_all()
    assert exits == {"leader": 0, "replica-5": 0, "replica-20": 0}, exits

    # -- repair: loss happened, and was made good by Fetch, not by refetching everything --
    batches = -(-RECORDS // BATCH_RECORDS)  # at least this many batches in the log
    for name, counted in counters.items():
        assert drops[name] > 0, f"nftables dropped nothing in {name}'s namespace"
        assert counted["gaps"] > 0 and counted["fetched_batches"] > 0, (name, counted)
        assert counted["truncations"] == 0 and counted["segments_cast"] == 0, (name, counted)
        assert counted["sessions"] == 1, (name, counted)  # never lost its leader
        assert counted["fetched_batches"] <= counted["appended_batches"], (name, counted)
    assert counters["replica-5"]["fetched_batches"] < batches, counters
    assert not leader.events("replica.out_of_sync"), leader.events("replica.out_of_sync")

    # -- the subscriber of the lossy replica: every record once, in order -----------------
    assert subscriber.returncode == 0, err.decode(errors="replace")[-2000:]
    assert out.splitlines() == [line(i) for i in range(RECORDS)]
    (sub_done,) = [
        json.loads(x) for x in err.splitlines() if x.startswith(b"{") and b"subscribe.done" in x
    ]
    assert sub_done["mode"] == "multicast" and sub_done["records"] == RECORDS, sub_done
    assert subscriber_drops > 0 and sub_done["gaps"] > 0 and sub_done["fetches"] > 0, sub_done

    # -- no divergence, no lost acknowledged record ------------------------------------------
    names = ["leader", *LOSSES]
    files = {name: segment_digests(tmp_path / name) for name in names}
    assert files["replica-5"] == files["leader"] == files["replica-20"], files
    digests = {name: log_digest(tmp_path / name) for name in names}
    assert digests["leader"].last_seqno == RECORDS, digests
    assert digests["replica-5"] == digests["leader"] == digests["replica-20"], digests
    expected = {i + 1: line(i) for i in range(RECORDS)}
    for name in names:
        assert read_payloads(tmp_path / name) == expected, name
    print(f"repair counters {counters}; nft drops {drops}; subscriber {sub_done}, nft drops "
          f"{subscriber_drops}")  # fmt: skip
