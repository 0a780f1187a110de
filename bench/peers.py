"""The peers of :mod:`bench.files_bench`: one runner per file-distribution tool.

Each runner takes a :class:`RunSpec` (a built :class:`bench.netns.Topology`, the source
file, one output path per client, a log directory and a timeout) and returns an
:class:`Outcome`: the measured wall time, or ``None`` when the run failed or timed out, and
a note. The driver injects loss, verifies the copies and tabulates the results.

The peers:

* http: unicast baseline, one TCP download per client. nginx (``sendfile``, one worker) if
  installed, else ``python -m http.server``; the clients are ``curl -sSf``;
* udpcast: ``udp-sender`` multicasts the file in slices, each acknowledged by every
  receiver; ``udp-sender --nopointopoint --full-duplex --max-bitrate 95m
  --rexmit-hello-interval 50 --fec 8x4 --min-receivers N --nokbd``,
  ``udp-receiver --nokbd --file F``;
* uftp: a multicast sender with NAK-based repair to a closed group of daemons;
  ``uftpd -d -D DIR -U <id> -I eth0 -B 8M``,
  ``uftp -R 95000 -M 230.4.4.1 -P 230.5.5.1 -H <ids of all clients> -B 8M``;
* bootcast: this project; clients join over HTTP and receive the multicast carousel;
  ``bootcast serve --rate <link rate>`` (it counts wire bytes), ``bootcast fetch --quiet``.

The configurations were tuned on this topology; see the comments at each command line.

Where the clock starts and stops, per peer (servers are started and made ready first):

* http: from launching the N ``curl`` downloads until all have exited;
* udpcast: from launching ``udp-sender`` (receivers are started right after) until the
  sender exits, which it does once every receiver acknowledged the last slice;
* uftp: ``uftpd`` daemons are started first; from launching ``uftp`` until it exits after
  every client reported completion (closed group, ``-H`` lists all clients);
* bootcast: from launching the N ``bootcast fetch`` until all have exited.

Every server process (nginx, udp-sender, uftp, bootcast serve) runs at ``SERVER_NICE``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from bench.netns import Host, Topology

HTTP_PORT = 8080
BOOTCAST_PORT = 8765
# Every host here shares the machine's cores; a real server has its own. Each peer's server
# (nginx, udp-sender, uftp, bootcast serve) runs at this niceness so that N busy clients do
# not starve it of the CPU its own machine would give it. The same for every peer.
SERVER_NICE = -5
UDPCAST_PORTBASE = 9000


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSpec:
    """Everything a peer runner needs for one run."""

    topo: Topology
    src: Path
    outputs: list[Path]
    """Destination file per client (index-aligned with ``topo.clients``)."""
    logdir: Path
    timeout_s: float
    send_rate_mbit: float
    udpcast_fec: str
    """``--fec`` value for udp-sender, empty for none."""
    link_mbit: float
    """The tbf rate of the server's link."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    wall_s: float | None
    note: str = ""


class _Logs:
    """Opens one log file per process and closes them all at the end of a run."""

    def __init__(self, logdir: Path) -> None:
        self._dir = logdir
        self._files: list[IO[bytes]] = []

    def open(self, name: str) -> IO[bytes]:
        fh = (self._dir / f"{name}.log").open("wb")
        self._files.append(fh)
        return fh

    def close(self) -> None:
        for fh in self._files:
            fh.close()

    def tail(self, name: str, lines: int = 3) -> str:
        path = self._dir / f"{name}.log"
        try:
            text = path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])


def _start(
    spec: RunSpec, logs: _Logs, host: Host, name: str, argv: Sequence[str], cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    if host is spec.topo.server:
        argv = ["nice", "-n", str(SERVER_NICE), *argv]
    log = logs.open(name)
    return spec.topo.run(
        host, argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd
    )


def _start_clients(
    spec: RunSpec, logs: _Logs, name: str, argv_for: Callable[[Host, Path], list[str]]
) -> list[subprocess.Popen[bytes]]:
    """Start one process per client, ``argv_for(host, output_path)``, logging to
    ``<name>-<i>.log``."""
    return [
        _start(spec, logs, host, f"{name}-{i}", argv_for(host, out))
        for i, (host, out) in enumerate(zip(spec.topo.clients, spec.outputs, strict=True))
    ]


def _wait_all(procs: Sequence[subprocess.Popen[bytes]], deadline: float) -> float | None:
    """Wait until every process exited; return the monotonic time the last one did, or
    ``None`` if the deadline passed first."""
    pending = list(procs)
    last = time.monotonic()
    while pending:
        for proc in list(pending):
            if proc.poll() is not None:
                pending.remove(proc)
                last = time.monotonic()
        if not pending:
            break
        if time.monotonic() > deadline:
            return None
        time.sleep(0.005)
    return last


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=3)


def _wait_tcp(topo: Topology, host: Host, addr: str, port: int, timeout_s: float) -> bool:
    """Poll from ``host`` until ``addr:port`` accepts TCP connections."""
    code = (
        "import socket,sys,time\n"
        f"end=time.monotonic()+{timeout_s}\n"
        "while time.monotonic()<end:\n"
        "  try:\n"
        f"    socket.create_connection(({addr!r},{port}),timeout=1).close(); sys.exit(0)\n"
        "  except OSError: time.sleep(0.05)\n"
        "sys.exit(1)\n"
    )
    proc = subprocess.run(
        topo.ns_argv(host, [sys.executable, "-c", code]), timeout=timeout_s + 5, check=False
    )
    return proc.returncode == 0


def _failed_exits(names: Sequence[str], procs: Sequence[subprocess.Popen[bytes]]) -> str:
    bad = [f"{n}={p.returncode}" for n, p in zip(names, procs, strict=True) if p.returncode]
    return ("exit " + ",".join(bad)) if bad else ""


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
    logs = _Logs(spec.logdir)
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
        procs.append(_start(spec, logs, topo.server, "http-server", server_argv))
        if not _wait_tcp(topo, topo.clients[0], topo.server.addr, HTTP_PORT, 10.0):
            return Outcome(wall_s=None, note=f"{server_name} did not start")
        url = f"http://{topo.server.addr}:{HTTP_PORT}/{spec.src.name}"
        t0 = time.monotonic()
        max_time = f"{spec.timeout_s:.0f}"
        clients = _start_clients(
            spec,
            logs,
            "curl",
            lambda host, out: ["curl", "-sSf", "--max-time", max_time, "-o", str(out), url],
        )
        procs.extend(clients)
        end = _wait_all(clients, t0 + spec.timeout_s)
        if end is None:
            return Outcome(wall_s=None, note="timeout")
        note = _failed_exits([f"curl{i}" for i in range(len(clients))], clients)
        return Outcome(wall_s=end - t0, note=f"{server_name} {note}".strip())
    finally:
        _stop(procs)
        logs.close()


def run_udpcast(spec: RunSpec) -> Outcome:
    topo = spec.topo
    n = len(topo.clients)
    logs = _Logs(spec.logdir)
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
        sender = _start(spec, logs, topo.server, "udp-sender", sender_argv)
        procs.append(sender)

        def receiver_argv(host: Host, out: Path) -> list[str]:
            return [
                "udp-receiver", "--file", str(out), "--interface", host.veth,
                "--portbase", str(UDPCAST_PORTBASE), "--nokbd", "--start-timeout", start_timeout,
            ]  # fmt: skip

        receivers = _start_clients(spec, logs, "udp-receiver", receiver_argv)
        procs.extend(receivers)
        end = _wait_all([sender], t0 + spec.timeout_s)
        if end is None:
            return Outcome(wall_s=None, note="timeout: " + logs.tail("udp-sender", 1))
        # The receivers linger for --exit-wait (500 ms) after the final ack; the data is
        # complete when the sender exits, so they only have to exit before verification.
        if _wait_all(receivers, time.monotonic() + 10.0) is None:
            return Outcome(wall_s=None, note="receivers did not exit")
        note = _failed_exits(["sender", *(f"rx{i}" for i in range(n))], [sender, *receivers])
        return Outcome(wall_s=end - t0, note=note)
    finally:
        _stop(procs)
        logs.close()


def _uftp_id(addr: str) -> str:
    a, b, c, d = (int(x) for x in addr.split("."))
    return f"0x{a:02x}{b:02x}{c:02x}{d:02x}"


def run_uftp(spec: RunSpec) -> Outcome:
    topo = spec.topo
    logs = _Logs(spec.logdir)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        daemons = []
        for i, (host, out) in enumerate(zip(topo.clients, spec.outputs, strict=True)):
            argv = [
                "uftpd", "-d", "-q", "-x", "1", "-D", str(out.parent),
                "-U", _uftp_id(host.addr), "-I", host.veth,
                "-B", "8388608",
            ]  # fmt: skip
            daemons.append(_start(spec, logs, host, f"uftpd-{i}", argv))
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
        server = _start(spec, logs, topo.server, "uftp", server_argv)
        procs.append(server)
        end = _wait_all([server], t0 + spec.timeout_s)
        if end is None:
            return Outcome(wall_s=None, note="timeout")
        note = f"uftp exit {server.returncode}" if server.returncode else ""
        return Outcome(wall_s=end - t0, note=note)
    finally:
        _stop(procs)
        logs.close()


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
    logs = _Logs(spec.logdir)
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
        procs.append(_start(spec, logs, topo.server, "bootcast-serve", server_argv))
        if not _wait_tcp(topo, topo.clients[0], topo.server.addr, BOOTCAST_PORT, 15.0):
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

        clients = _start_clients(spec, logs, "bootcast-fetch", fetch_argv)
        procs.extend(clients)
        end = _wait_all(clients, t0 + spec.timeout_s)
        if end is None:
            return Outcome(wall_s=None, note="timeout")
        note = _failed_exits([f"fetch{i}" for i in range(len(clients))], clients)
        if note:
            note += ": " + logs.tail("bootcast-fetch-0", 1)
        return Outcome(wall_s=end - t0, note=note)
    finally:
        _stop(procs)
        logs.close()


PEERS: dict[str, Callable[[RunSpec], Outcome]] = {
    "http": run_http,
    "udpcast": run_udpcast,
    "uftp": run_uftp,
    "bootcast": run_bootcast,
}
TOOLS: dict[str, tuple[str, ...]] = {
    "http": ("curl",),
    "udpcast": ("udp-sender", "udp-receiver"),
    "uftp": ("uftp", "uftpd"),
    "bootcast": (),
}
