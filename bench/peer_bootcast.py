"""bootcast, this project, in :mod:`bench.files_bench` and :mod:`bench.files_floor`:
clients join over HTTP and receive the multicast carousel.

``bootcast serve --rate <link rate>`` (it counts wire bytes), ``bootcast fetch --quiet``
(or the clients a caller makes, as :mod:`bench.files_floor` does). The clock runs from
launching the N ``bootcast fetch`` until all have exited (the server is started and made
ready first).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
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
    wait_tcp_from,
)
from bench.netns import Host

BOOTCAST_PORT = 8765
TOOLS: tuple[str, ...] = ()
"""``bootcast`` itself is looked for by :func:`find_bootcast`."""


def find_bootcast() -> str | None:
    """The ``bootcast`` executable: on ``PATH``, else the repository's ``.venv``."""
    found = shutil.which("bootcast")
    if found is not None:
        return found
    venv = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "bootcast"
    return str(venv) if venv.is_file() and os.access(venv, os.X_OK) else None


ClientArgv = Callable[[str, Host, Path], list[str]]
"""``(join URL, client host, output path) -> argv`` of one client process."""


def run_bootcast(spec: RunSpec, client_argv: ClientArgv | None = None) -> Outcome:
    """``bootcast serve`` and N ``bootcast fetch`` (or the clients ``client_argv`` makes)."""
    exe = find_bootcast()
    if exe is None:
        return Outcome(wall_s=None, note="bootcast: not installed")
    topo = spec.topo
    logs = RunLogs(spec.logdir)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        server_argv = [
            exe, "serve", "--dir", str(spec.src.parent),
            "--listen", f"{topo.server.addr}:{BOOTCAST_PORT}",
            "--interface", topo.server.addr,
            # bootcast's --rate counts bytes on the wire (Ethernet, IP, UDP and page
            # headers), so the link rate itself is the right limit; the qdisc's backpressure
            # on the socket keeps the sender from overrunning it.
            "--rate", f"{spec.link_mbit:g}", "--log-json",
        ]  # fmt: skip
        procs.append(start_process(spec, logs, topo.server, "bootcast-serve", server_argv))
        if not wait_tcp_from(topo, topo.clients[0], topo.server.addr, BOOTCAST_PORT, 15.0):
            return Outcome(
                wall_s=None, note="bootcast serve did not start: " + logs.tail("bootcast-serve")
            )
        url = f"http://{topo.server.addr}:{BOOTCAST_PORT}/join/{spec.src.name}"
        t0 = time.monotonic()
        timeout = f"{spec.timeout_s:.0f}"

        def fetch_argv(host: Host, out: Path) -> list[str]:
            if client_argv is not None:
                return client_argv(url, host, out)
            return [
                exe, "fetch", url, "-O", str(out), "--interface", host.addr, "--quiet",
                "--timeout", timeout,
            ]  # fmt: skip

        clients = start_clients(spec, logs, "bootcast-fetch", fetch_argv)
        procs.extend(clients)
        end = wait_all(clients, t0 + spec.timeout_s)
        if end is None:
            return Outcome(wall_s=None, note="timeout")
        note = failed_exits([f"fetch{i}" for i in range(len(clients))], clients)
        if note:
            note += ": " + logs.tail("bootcast-fetch-0", 1)
        return Outcome(wall_s=end - t0, note=note)
    finally:
        stop_processes(procs)
        logs.close()
