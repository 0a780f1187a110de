"""udpcast, a peer of :mod:`bench.files_bench`: ``udp-sender`` multicasts the file in
slices, each acknowledged by every receiver.

``udp-sender --nopointopoint --full-duplex --max-bitrate 95m --rexmit-hello-interval 50
--fec 8x4 --min-receivers N --nokbd``, ``udp-receiver --nokbd --file F``; the
configuration was tuned on this topology (see the comments at the command line). The clock
runs from launching ``udp-sender`` (receivers are started right after) until the sender
exits, which it does once every receiver acknowledged the last slice.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from bench.files_harness import (
    Outcome,
    RunLogs,
    RunSpec,
    failed_exits,
    start_clients,
    start_process,
    stop_processes,
    wait_all,
)
from bench.netns import Host

UDPCAST_PORTBASE = 9000
TOOLS = ("udp-sender", "udp-receiver")


def run_udpcast(spec: RunSpec) -> Outcome:
    topo = spec.topo
    n = len(topo.clients)
    logs = RunLogs(spec.logdir)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        start_timeout = f"{max(10, int(spec.timeout_s)):d}"
        # Without FEC, udpcast collapses at high loss: every slice needs an ack from all
        # receivers, a multicast REQACK reaches all N with probability (1-p)^N, and each
        # miss costs a timeout (16 MiB at 20 %, N=4: >50 s instead of 2.8 s).
        fec = ["--fec", spec.udpcast_fec] if spec.udpcast_fec else []
        sender_argv = [
            "udp-sender", "--file", str(spec.src), "--interface", topo.server.veth,
            "--portbase", str(UDPCAST_PORTBASE), "--min-receivers", str(n), "--nokbd",
            # Point-to-point (unicast) would be chosen automatically for a single receiver
            # and would bypass the multicast-only loss rule; the switch is full duplex.
            "--nopointopoint", "--full-duplex",
            "--max-bitrate", f"{spec.send_rate_mbit:g}m",
            # The sender checks --min-receivers only when its hello timer fires, which is
            # every 2 s by default: without this every run starts up to 2 s late.
            "--rexmit-hello-interval", "50",
            "--start-timeout", start_timeout, *fec,
        ]  # fmt: skip
        t0 = time.monotonic()
        sender = start_process(spec, logs, topo.server, "udp-sender", sender_argv)
        procs.append(sender)

        def receiver_argv(host: Host, out: Path) -> list[str]:
            return [
                "udp-receiver", "--file", str(out), "--interface", host.veth,
                "--portbase", str(UDPCAST_PORTBASE), "--nokbd", "--start-timeout", start_timeout,
            ]  # fmt: skip

        receivers = start_clients(spec, logs, "udp-receiver", receiver_argv)
        procs.extend(receivers)
        end = wait_all([sender], t0 + spec.timeout_s)
        if end is None:
            return Outcome(wall_s=None, note="timeout: " + logs.tail("udp-sender", 1))
        # The receivers linger for --exit-wait (500 ms) after the final ack; the data is
        # complete when the sender exits, so they only have to exit before verification.
        if wait_all(receivers, time.monotonic() + 10.0) is None:
            return Outcome(wall_s=None, note="receivers did not exit")
        note = failed_exits(["sender", *(f"rx{i}" for i in range(n))], [sender, *receivers])
        return Outcome(wall_s=end - t0, note=note)
    finally:
        stop_processes(procs)
        logs.close()
