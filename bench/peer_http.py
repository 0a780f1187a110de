"""HTTP, the unicast baseline of :mod:`bench.files_bench`: one TCP download per client.

nginx (``sendfile``, one worker) if installed, else ``python -m http.server``, on the
server at :data:`bench.processes.SERVER_NICE`; the clients are ``curl -sSf``. The clock runs
from launching the N ``curl`` downloads until all have exited (the server is started and
made ready first).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
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
    wait_tcp_from,
)

HTTP_PORT = 8080
TOOLS = ("curl",)
"""What the peer needs on ``PATH`` (the server falls back to ``http.server``)."""


def _nginx_conf(root: Path, run_dir: Path, addr: str) -> Path:
    conf = run_dir / "nginx.conf"
    tmp = run_dir / "nginx-tmp"
    tmp.mkdir(exist_ok=True)
    conf.write_text(
        f"""
daemon off;
master_process off;
worker_processes 1;
user root;
pid {run_dir}/nginx.pid;
error_log {run_dir}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen {addr}:{HTTP_PORT};
        root {root};
    }}
}}
"""
    )
    return conf


def run_http(spec: RunSpec) -> Outcome:
    topo = spec.topo
    logs = RunLogs(spec.logdir)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        nginx = shutil.which("nginx")
        if nginx is not None:
            conf = _nginx_conf(spec.src.parent, spec.logdir, topo.server.addr)
            server_argv = [nginx, "-e", str(spec.logdir / "nginx-error.log"), "-c", str(conf)]
            server_name = "nginx"
        else:
            server_argv = [
                sys.executable, "-m", "http.server", str(HTTP_PORT),
                "--bind", topo.server.addr, "--directory", str(spec.src.parent),
            ]  # fmt: skip
            server_name = "http.server"
        procs.append(start_process(spec, logs, topo.server, "http-server", server_argv))
        if not wait_tcp_from(topo, topo.clients[0], topo.server.addr, HTTP_PORT, 10.0):
            return Outcome(wall_s=None, note=f"{server_name} did not start")
        url = f"http://{topo.server.addr}:{HTTP_PORT}/{spec.src.name}"
        t0 = time.monotonic()
        max_time = f"{spec.timeout_s:.0f}"
        clients = start_clients(
            spec,
            logs,
            "curl",
            lambda host, out: ["curl", "-sSf", "--max-time", max_time, "-o", str(out), url],
        )
        procs.extend(clients)
        end = wait_all(clients, t0 + spec.timeout_s)
        if end is None:
            return Outcome(wall_s=None, note="timeout")
        note = failed_exits([f"curl{i}" for i in range(len(clients))], clients)
        return Outcome(wall_s=end - t0, note=f"{server_name} {note}".strip())
    finally:
        stop_processes(procs)
        logs.close()
