"""UFTP, a peer of :mod:`bench.files_bench`: a multicast sender with NAK-based repair to a
closed group of daemons.

``uftpd -d -D DIR -U <id> -I eth0 -B 8M``, ``uftp -R 95000 -M 230.4.4.1 -P 230.5.5.1 -H
<ids of all clients> -B 8M``. The ``uftpd`` daemons are started first; the clock runs from
launching ``uftp`` until it exits after every client reported completion (closed group,
``-H`` lists all clients).
"""

from __future__ import annotations

import subprocess
import time

from bench.files_harness import Outcome, RunLogs, RunSpec, start_process, stop_processes, wait_all

TOOLS = ("uftp", "uftpd")


def _uftp_id(addr: str) -> str:
    a, b, c, d = (int(x) for x in addr.split("."))
    return f"0x{a:02x}{b:02x}{c:02x}{d:02x}"


def run_uftp(spec: RunSpec) -> Outcome:
    topo = spec.topo
    logs = RunLogs(spec.logdir)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        daemons = []
        for i, (host, out) in enumerate(zip(topo.clients, spec.outputs, strict=True)):
            argv = [
                "uftpd", "-d", "-q", "-x", "1", "-D", str(out.parent),
                "-U", _uftp_id(host.addr), "-I", host.veth,
                "-B", "8388608",
            ]  # fmt: skip
            daemons.append(start_process(spec, logs, host, f"uftpd-{i}", argv))
        procs.extend(daemons)
        time.sleep(0.5)  # let the daemons bind and join 230.4.4.1 before the announce
        dead = [i for i, d in enumerate(daemons) if d.poll() is not None]
        if dead:
            return Outcome(wall_s=None, note=f"uftpd {dead} died: {logs.tail(f'uftpd-{dead[0]}')}")
        ids = ",".join(_uftp_id(h.addr) for h in topo.clients)
        server_argv = [
            "uftp", "-R", f"{spec.send_rate_mbit * 1000:.0f}", "-I", topo.server.veth,
            "-M", "230.4.4.1", "-P", "230.5.5.1", "-H", ids, "-x", "1",
            "-B", "8388608", "-D", spec.outputs[0].name, str(spec.src),
        ]  # fmt: skip
        t0 = time.monotonic()
        server = start_process(spec, logs, topo.server, "uftp", server_argv)
        procs.append(server)
        end = wait_all([server], t0 + spec.timeout_s)
        if end is None:
            return Outcome(wall_s=None, note="timeout")
        note = f"uftp exit {server.returncode}" if server.returncode else ""
        return Outcome(wall_s=end - t0, note=note)
    finally:
        stop_processes(procs)
        logs.close()
