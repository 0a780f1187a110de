"""File-distribution benchmark: bootcast against HTTP, udpcast and UFTP.

Run as root::

    python -m bench.files_bench [--clients 1,4,8] [--loss 0,5,20] [--size-mib 64]
                                [--peers http,udpcast,uftp,bootcast] [--quick] [--json OUT]

For every client count N a :class:`bench.netns.Topology` is built: one server and N
clients on a bridge, the server's egress limited by ``tbf`` to ``--link-mbit`` (100).
For every loss rate and peer, one run measures the wall time until every client holds a
copy of a random file, and then verifies each copy against the source's SHA-256. The ideal
time is what one copy takes over the bottleneck, ``size * 8 / link``: a perfect multicast
sender delivers all N copies in that time, a unicast server needs N times as long.

Loss is injected with nftables on every client's input hook. For the multicast peers only
UDP to multicast groups is dropped (their unicast control traffic — HTTP joins, NAKs,
ACKs — is left alone). For HTTP, by default (``--http-loss tcp``) the same rate is applied
to *every* packet the clients receive, TCP included, because HTTP has no multicast to drop;
``--http-loss skip`` runs HTTP only at 0 % instead.

Where the clock starts and stops, per peer (servers are started and made ready first):

* http: from launching the N ``curl`` downloads until all have exited;
* udpcast: from launching ``udp-sender`` (receivers are started right after) until the
  sender exits, which it does once every receiver acknowledged the last slice;
* uftp: ``uftpd`` daemons are started first; from launching ``uftp`` until it exits after
  every client reported completion (closed group, ``-H`` lists all clients);
* bootcast: from launching the N ``bootcast fetch`` until all have exited.

Peer configurations (tuned on this topology; see the comments at each command line):

* http: nginx (``sendfile``, one worker) or ``python -m http.server``; ``curl -sSf``;
* udpcast: ``udp-sender --nopointopoint --full-duplex --max-bitrate 95m
  --rexmit-hello-interval 50 --fec 8x4 --min-receivers N --nokbd``,
  ``udp-receiver --nokbd --file F``;
* uftp: ``uftpd -d -D DIR -U <id> -I eth0 -B 8M``,
  ``uftp -R 95000 -M 230.4.4.1 -P 230.5.5.1 -H <ids of all clients> -B 8M``;
* bootcast: ``bootcast serve --rate <link rate>`` (it counts wire bytes),
  ``bootcast fetch --quiet``.

A run that exceeds ``--timeout-factor`` × ideal (× N for HTTP, which must push N copies;
at least ``--min-timeout-s``) is killed and recorded as failed. Logs of every process are
kept in the work directory when ``--keep`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

from bench.netns import Host, Topology, cleanup_stale, netns_available

PREFIX = "bcb"
FILE_NAME = "file.bin"
HTTP_PORT = 8080
BOOTCAST_PORT = 8765
# Every host here shares the machine's cores; a real server has its own. Each peer's server
# (nginx, udp-sender, uftp, bootcast serve) runs at this niceness so that N busy clients do
# not starve it of the CPU its own machine would give it. The same for every peer.
SERVER_NICE = -5
UDPCAST_PORTBASE = 9000
ALL_PEERS = ("http", "udpcast", "uftp", "bootcast")


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """One measured row of the table."""

    peer: str
    n_clients: int
    loss_pct: int
    size_bytes: int
    ideal_s: float
    wall_s: float | None
    verified: int
    """How many clients hold a copy whose SHA-256 matches the source."""
    dropped_pkts: int
    """Packets the injected-loss rules dropped, summed over the clients."""
    ok: bool
    skipped: bool
    """The peer's tools are not installed; the row carries no measurement."""
    note: str

    @property
    def ratio(self) -> float | None:
        return None if self.wall_s is None else self.wall_s / self.ideal_s


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


# -- peers ---------------------------------------------------------------------------------


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


def run_bootcast(spec: RunSpec) -> Outcome:
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


# -- driver --------------------------------------------------------------------------------


def _sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def make_source(path: Path, size_bytes: int) -> str:
    """Write ``size_bytes`` of random data to ``path`` and return its SHA-256."""
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        left = size_bytes
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            fh.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def _one_run(
    *,
    peer: str,
    topo: Topology,
    loss_pct: int,
    src: Path,
    src_sha: str,
    work: Path,
    ideal_s: float,
    args: argparse.Namespace,
) -> Result:
    n = len(topo.clients)

    def result(
        *, wall_s: float | None, verified: int, dropped: int, note: str, skipped: bool = False
    ) -> Result:
        return Result(
            peer=peer,
            n_clients=n,
            loss_pct=loss_pct,
            size_bytes=src.stat().st_size,
            ideal_s=ideal_s,
            wall_s=wall_s,
            verified=verified,
            dropped_pkts=dropped,
            ok=wall_s is not None and verified == n,
            skipped=skipped,
            note=note,
        )

    missing = [tool for tool in TOOLS[peer] if shutil.which(tool) is None]
    if peer == "bootcast" and find_bootcast() is None:
        return result(
            wall_s=None, verified=0, dropped=0, note="bootcast: not installed", skipped=True
        )
    if missing:
        note = f"{peer}: not installed ({', '.join(missing)})"
        return result(wall_s=None, verified=0, dropped=0, note=note, skipped=True)
    run_dir = work / f"{peer}-n{n}-l{loss_pct}"
    shutil.rmtree(run_dir, ignore_errors=True)
    outputs = []
    for i in range(n):
        d = run_dir / f"c{i}"
        d.mkdir(parents=True)
        outputs.append(d / src.name)
    topo.set_all_loss(loss_pct, only_multicast=peer != "http")
    spec = RunSpec(
        topo=topo,
        src=src,
        outputs=outputs,
        logdir=run_dir,
        # Unicast needs N copies through the bottleneck; give it the same slack per copy.
        timeout_s=max(
            args.min_timeout_s, args.timeout_factor * ideal_s * (n if peer == "http" else 1)
        ),
        send_rate_mbit=args.send_rate_mbit,
        link_mbit=args.link_mbit,
        udpcast_fec=args.udpcast_fec,
    )
    try:
        outcome = PEERS[peer](spec)
    finally:
        dropped = sum(topo.loss_counters(c) for c in topo.clients)
        topo.set_all_loss(0)
    verified = sum(1 for out in outputs if _sha256(out) == src_sha)
    if outcome.wall_s is not None and verified != n:
        note = f"{outcome.note} only {verified}/{n} verified".strip()
    else:
        note = outcome.note
    if not args.keep:
        for out in outputs:
            with contextlib.suppress(OSError):
                out.unlink()
    return result(wall_s=outcome.wall_s, verified=verified, dropped=dropped, note=note)


def format_row(r: Result) -> str:
    wall = "-" if r.wall_s is None else f"{r.wall_s:8.2f}"
    ratio = "-" if r.ratio is None else f"{r.ratio:6.2f}"
    return (
        f"{r.peer:<9} {r.n_clients:>3} {r.loss_pct:>5} {wall:>8} {ratio:>6} "
        f"{'-' if r.skipped else 'yes' if r.ok else 'no':>8} {r.dropped_pkts:>8}  {r.note}"
    )


HEADER = (
    f"{'peer':<9} {'N':>3} {'loss%':>5} {'wall s':>8} {'ratio':>6} {'verified':>8} "
    f"{'dropped':>8}  note"
)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(tok) for tok in text.split(",") if tok.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return values


def _peer_list(text: str) -> list[str]:
    peers = [tok.strip() for tok in text.split(",") if tok.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown or not peers:
        raise argparse.ArgumentTypeError(f"unknown peers {unknown}; choose from {ALL_PEERS}")
    return peers


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.files_bench",
        description="Time distributing one file to N clients over a shaped namespace LAN.",
    )
    p.add_argument("--clients", type=_int_list, default=None, help="client counts (1,4,8)")
    p.add_argument("--loss", type=_int_list, default=None, help="loss percentages (0,5,20)")
    p.add_argument("--size-mib", type=int, default=None, help="file size in MiB (64)")
    p.add_argument("--peers", type=_peer_list, default=list(ALL_PEERS), help="peers to run")
    p.add_argument("--quick", action="store_true", help="8 MiB file, N=1,4")
    p.add_argument("--link-mbit", type=float, default=100.0, help="server link rate (tbf)")
    p.add_argument(
        "--send-rate-mbit", type=float, default=95.0, help="rate given to the multicast senders"
    )
    p.add_argument(
        "--http-loss",
        choices=("tcp", "skip"),
        default="tcp",
        help="tcp: drop the same share of all packets clients receive; "
        "skip: run HTTP at 0%% loss only",
    )
    p.add_argument(
        "--udpcast-fec",
        default="8x4",
        help="udp-sender --fec INTERLEAVExREDUNDANCY[/STRIPESIZE]; '' for none",
    )
    p.add_argument("--timeout-factor", type=float, default=40.0)
    p.add_argument("--min-timeout-s", type=float, default=30.0)
    p.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the work directory")
    p.add_argument("--keep", action="store_true", help="keep received files and logs")
    args = p.parse_args(argv)
    if args.clients is None:
        args.clients = [1, 4] if args.quick else [1, 4, 8]
    if args.loss is None:
        args.loss = [0, 5, 20]
    if args.size_mib is None:
        args.size_mib = 8 if args.quick else 64
    if any(n < 1 for n in args.clients) or any(not 0 <= x < 100 for x in args.loss):
        p.error("client counts must be >= 1 and loss in 0..99")
    return args


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    available, reason = netns_available()
    if not available:
        print(f"files_bench: cannot run: {reason}", file=sys.stderr)
        return 2
    cleanup_stale(PREFIX)
    # SIGTERM (e.g. from `timeout` or make) becomes SystemExit, so the Topology context
    # managers still delete their namespaces and stop their processes.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    size_bytes = args.size_mib * 1024 * 1024
    ideal_s = size_bytes * 8 / (args.link_mbit * 1e6)
    work = Path(tempfile.mkdtemp(prefix="bcb-bench-", dir=args.workdir))
    results: list[Result] = []
    try:
        src_dir = work / "src"
        src_dir.mkdir()
        src = src_dir / FILE_NAME
        src_sha = make_source(src, size_bytes)
        print(
            f"file {args.size_mib} MiB, link {args.link_mbit:g} Mbit/s (tbf on the server), "
            f"senders at {args.send_rate_mbit:g} Mbit/s, ideal {ideal_s:.2f} s; "
            f"loss: multicast UDP only, HTTP: "
            f"{'all packets incl. TCP' if args.http_loss == 'tcp' else 'not applied'}; "
            f"servers at nice {SERVER_NICE} (all hosts share {os.cpu_count()} cores)"
        )
        print(f"work dir {work}")
        print(HEADER, flush=True)
        for n in args.clients:
            with Topology(n_clients=n, server_rate_mbit=args.link_mbit, prefix=PREFIX) as topo:
                for loss in args.loss:
                    for peer in args.peers:
                        if peer == "http" and loss and args.http_loss == "skip":
                            continue
                        result = _one_run(
                            peer=peer, topo=topo, loss_pct=loss, src=src, src_sha=src_sha,
                            work=work, ideal_s=ideal_s, args=args,
                        )  # fmt: skip
                        results.append(result)
                        print(format_row(result), flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if args.json is not None:
            payload: dict[str, Any] = {
                "size_bytes": size_bytes,
                "link_mbit": args.link_mbit,
                "send_rate_mbit": args.send_rate_mbit,
                "ideal_s": ideal_s,
                "http_loss": args.http_loss,
                "results": [asdict(r) | {"ratio": r.ratio} for r in results],
            }
            args.json.write_text(json.dumps(payload, indent=2) + "\n")
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    # Missing tools are reported in the table but do not fail the benchmark.
    return 0 if all(r.ok or r.skipped for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
