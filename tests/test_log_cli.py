"""The ``boomscooter`` command line, run as real processes (``python -m boomscooter.cli``).

One leader process (``--listen 127.0.0.1:0``, ``--fsync always``) serves the module: the
fixture feeds it awkward stdin through ``produce`` (an empty line, CRLF, bytes that are not
UTF-8, a last line without newline) and a few records on channels, and the tests read them
back with ``subscribe`` in every mode, with and without ``--json``, and ask ``status``.
Usage errors, dead servers and the demo are checked too.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from boomscooter import cli
from boomscooter.v1 import boomscooter_pb2 as pb
from boomscooter.v1 import boomscooter_pb2_grpc as pb_grpc

from support.net import free_port
from support.process import Node
from support.waiting import PATIENCE_S, eventually_blocking

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "boomscooter.cli"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
SUBCOMMANDS = ["leader", "replica", "promote", "produce", "subscribe", "status", "demo"]

# What the fixture produces: (stdin, --channel) per `produce` run.
PRODUCE_RUNS: list[tuple[bytes, str | None]] = [
    (b"alpha\n\nbeta\r\ngamma\xff\xfe\n\xc3\xa9t\xc3\xa9\nlast-no-newline", None),
    (b"o1\no2\n", "orders.eu"),
    (b"o3\n", "orders.us"),
    (b"m1\n", "metrics"),
]
# The records those runs must leave in the log, in order: (channel, payload).
EXPECTED: list[tuple[str | None, bytes]] = [
    (None, b"alpha"),
    (None, b""),
    (None, b"beta"),  # CRLF: the \r goes with the newline
    (None, b"gamma\xff\xfe"),  # not UTF-8
    (None, "été".encode()),
    (None, b"last-no-newline"),  # no final newline: still a record
    ("orders.eu", b"o1"),
    ("orders.eu", b"o2"),
    ("orders.us", b"o3"),
    ("metrics", b"m1"),
]
TOTAL = len(EXPECTED)


def run_cli(
    *args: str, stdin: bytes = b"", timeout_s: float = 60.0
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*CLI, *args],
        input=stdin,
        capture_output=True,
        timeout=timeout_s,
        env=ENV,
        cwd=REPO,
        check=False,
    )


def run_concurrently(
    argvs: list[list[str]], timeout_s: float = 60.0
) -> list[subprocess.CompletedProcess[bytes]]:
    """Run CLI invocations side by side (interpreter start-up dominates each one)."""
    procs = [
        subprocess.Popen([*CLI, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=ENV, cwd=REPO)
        for argv in argvs
    ]  # fmt: skip
    results = []
    try:
        for proc, argv in zip(procs, argvs, strict=True):
            out, err = proc.communicate(timeout=timeout_s)
            results.append(subprocess.CompletedProcess(argv, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


@dataclass(eq=False)
class LeaderProcess(Node):
    """``boomscooter leader --listen 127.0.0.1:0``: the port it bound is in ``leader.started``."""

    port: int = 0
    produce_results: list[subprocess.CompletedProcess[bytes]] = field(default_factory=list)

    @property
    def server(self) -> str:
        return self.process.address


def start_leader_process(data_dir: Path, *extra: str) -> LeaderProcess:
    """A leader of the CLI on any port; returns once it logged ``leader.started``."""
    leader = LeaderProcess("leader", data_dir, "leader", list(extra))
    leader.process.start()
    return leader


def last_seqno(leader: LeaderProcess) -> int:
    with grpc.insecure_channel(leader.server) as channel:
        status = pb_grpc.BoomscooterStub(channel).Status(pb.StatusRequest(), timeout=PATIENCE_S)
    return int(status.last_seqno)


def stop_leader_process(leader: LeaderProcess) -> int | None:
    return leader.process.stop()


@pytest.fixture(scope="module")
def leader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LeaderProcess]:
    data_dir = tmp_path_factory.mktemp("cli") / "log"
    node = start_leader_process(data_dir, "--fsync", "always")
    try:
        for stdin, channel in PRODUCE_RUNS:
            extra = ["--channel", channel] if channel else []
            node.produce_results.append(
                run_cli("--log-json", "produce", "--server", node.server, *extra, stdin=stdin)
            )
        yield node
    finally:
        stop_leader_process(node)


def json_lines(out: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.decode("utf-8").splitlines()]


def log_events(err: bytes, name: str) -> list[dict[str, Any]]:
    """The ``--log-json`` lines of ``err`` with event ``name``."""
    events = []
    for line in err.decode("utf-8", "replace").splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == name:
                events.append(event)
    return events


def subscribe_argv(leader: LeaderProcess, *args: str) -> list[str]:
    return ["--log-json", "subscribe", "--server", leader.server, "--interface", "127.0.0.1",
            "--timeout", "10", *args]  # fmt: skip


def subscribe_many(
    leader: LeaderProcess, runs: list[list[str]]
) -> list[subprocess.CompletedProcess[bytes]]:
    results = run_concurrently([subscribe_argv(leader, *args) for args in runs])
    for result in results:
        assert result.returncode == 0, (result.args, result.stderr.decode(errors="replace"))
    return results


def subscribe(leader: LeaderProcess, *args: str) -> subprocess.CompletedProcess[bytes]:
    (result,) = subscribe_many(leader, [list(args)])
    return result


# -- help and usage errors ------------------------------------------------------------------


def test_top_level_help_exits_0_and_lists_every_subcommand() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert text.startswith("usage: boomscooter")
    for name in SUBCOMMANDS:
        assert name in text


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help_exits_0(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: boomscooter {command}")
    assert "--log-json" in out


def test_subcommand_help_in_a_process() -> None:
    result = run_cli("subscribe", "--help")
    assert result.returncode == 0
    assert b"--mode" in result.stdout and b"--json" in result.stdout


BAD_LEADER_FLAGS = [
    (["--fsync", "sometimes"], "fsync"),
    (["--page-size", "10"], "--page-size"),
    (["--group", "nonsense"], "--group"),
    (["--heartbeat-ms", "1"], "--heartbeat-ms"),
    (["--ttl", "1", "--rate", "-1"], "--rate"),
]


def test_bad_leader_flags_exit_2_with_one_line(tmp_path: Path) -> None:
    dirs = [tmp_path / f"never-created-{i}" for i in range(len(BAD_LEADER_FLAGS))]
    results = run_concurrently(
        [
            ["leader", "--data-dir", str(d), "--listen", "127.0.0.1:0", *flags]
            for d, (flags, _) in zip(dirs, BAD_LEADER_FLAGS, strict=True)
        ]
    )
    for data_dir, (flags, reason), result in zip(dirs, BAD_LEADER_FLAGS, results, strict=True):
        assert result.returncode == 2, (flags, result.stderr)
        lines = result.stderr.decode().splitlines()
        assert len(lines) == 1, (flags, lines)
        assert lines[0].startswith("boomscooter leader: ") and reason in lines[0], lines
        assert result.stdout == b""
        assert not data_dir.exists(), f"{flags}: a refused configuration created the data dir"


def test_bad_listen_address_is_a_usage_error(tmp_path: Path) -> None:
    data_dir = tmp_path / "never-created"
    result = run_cli("leader", "--data-dir", str(data_dir), "--listen", "127.0.0.1:notaport")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("boomscooter leader: "), lines
    assert not data_dir.exists()


def test_a_cast_group_that_is_not_multicast_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli(
        "--log-level", "error", "leader", "--data-dir", str(tmp_path / "log"), "--listen",
        "127.0.0.1:0", "--cast-listen", "127.0.0.1:0", "--cast-group", "10.0.0.1",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.decode().splitlines()
    assert lines == ["boomscooter leader: segment casts: --cast-group 10.0.0.1 is not a "
                     "multicast address"], lines  # fmt: skip


def test_leader_on_port_0_logs_the_bound_address(leader: LeaderProcess) -> None:
    assert leader.argv()[leader.argv().index("--listen") + 1] == "127.0.0.1:0"
    host, _, port = str(leader.process.started["listen"]).rpartition(":")
    assert host == "127.0.0.1" and int(port) != 0
    assert leader.process.started["fsync"] == "always"
    with socket.create_connection((host, int(port)), timeout=5):
        pass  # something really listens there


# -- produce ---------------------------------------------------------------------------------


def test_produce_reads_every_stdin_line(leader: LeaderProcess) -> None:
    first = 1
    for (stdin, _), result in zip(PRODUCE_RUNS, leader.produce_results, strict=True):
        assert result.returncode == 0, result.stderr
        assert result.stdout == b""
        (done,) = log_events(result.stderr, "produce.done")
        records = len(stdin.removesuffix(b"\n").split(b"\n"))
        assert done["records"] == records
        assert done["first_seqno"] == first
        assert done["last_seqno"] == first + records - 1
        assert done["acks"] == "leader"
        first += records
    assert first - 1 == TOTAL


def test_produce_of_empty_stdin_sends_nothing(leader: LeaderProcess) -> None:
    before = json.loads(run_cli("status", "--server", leader.server, "--json").stdout)
    result = run_cli("--log-json", "produce", "--server", leader.server, stdin=b"")
    assert result.returncode == 0, result.stderr
    (done,) = log_events(result.stderr, "produce.done")
    assert done["records"] == 0 and done["last_seqno"] is None
    after = json.loads(run_cli("status", "--server", leader.server, "--json").stdout)
    assert after["last_seqno"] == before["last_seqno"]


# -- subscribe -------------------------------------------------------------------------------


def check_json_records(lines: list[dict[str, Any]], seqnos: list[int]) -> None:
    assert [line["seqno"] for line in lines] == seqnos
    now_ms = time.time() * 1000
    for line in lines:
        channel, data = EXPECTED[line["seqno"] - 1]
        assert {"seqno", "timestamp", "channel", "payload", "payload_b64"} <= line.keys()
        assert base64.b64decode(line["payload_b64"], validate=True) == data
        try:
            text: str | None = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        assert line["payload"] == text
        assert line["channel"] == channel
        assert isinstance(line["timestamp"], int)
        assert now_ms - 600_000 < line["timestamp"] <= now_ms


MODES = ["multicast", "unicast", "notifications"]


def test_subscribe_json_from_earliest_in_every_mode(leader: LeaderProcess) -> None:
    runs = [["--from", "earliest", "--count", str(TOTAL), "--json", "--mode", m] for m in MODES]
    results = subscribe_many(leader, runs)
    for mode, result in zip(MODES, results, strict=True):
        check_json_records(json_lines(result.stdout), list(range(1, TOTAL + 1)))
        (done,) = log_events(result.stderr, "subscribe.done")
        assert done["records"] == TOTAL and done["mode"] == mode
    # Every mode prints the very same bytes.
    assert results[0].stdout == results[1].stdout == results[2].stdout


def test_subscribe_without_json_prints_raw_payload_lines(leader: LeaderProcess) -> None:
    result = subscribe(leader, "--from", "earliest", "--count", "6")
    assert result.stdout == b"".join(data + b"\n" for _, data in EXPECTED[:6])


CHANNEL_CASES = [("orders", [7, 8, 9]), ("orders.e", [7, 8]), ("metrics", [10]), ("x", [])]


def test_channel_prefix_filters(leader: LeaderProcess) -> None:
    runs = [
        ["--from", "earliest", "--until", str(TOTAL), "--json", "--channel", prefix, "--mode", m]
        for prefix, _ in CHANNEL_CASES
        for m in MODES
    ]
    results = iter(subscribe_many(leader, runs))
    for prefix, seqnos in CHANNEL_CASES:
        for mode in MODES:
            lines = json_lines(next(results).stdout)
            assert [line["seqno"] for line in lines] == seqnos, (prefix, mode)
            check_json_records(lines, seqnos)


def test_from_and_until_bound_the_range(leader: LeaderProcess) -> None:
    runs = [["--from", "3", "--until", "5", "--json", "--mode", m] for m in MODES]
    for mode, result in zip(MODES, subscribe_many(leader, runs), strict=True):
        lines = json_lines(result.stdout)
        assert [line["seqno"] for line in lines] == [3, 4, 5], mode
        check_json_records(lines, [3, 4, 5])


def test_count_counts_records_after_the_filter(leader: LeaderProcess) -> None:
    result = subscribe(leader, "--from", "earliest", "--count", "2", "--json",
                       "--channel", "orders")  # fmt: skip
    check_json_records(json_lines(result.stdout), [7, 8])


def test_count_and_until_are_exclusive(leader: LeaderProcess) -> None:
    result = run_cli("subscribe", "--server", leader.server, "--count", "1", "--until", "2")
    assert result.returncode == 2
    assert b"not allowed with" in result.stderr


def test_subscribe_from_latest_gets_only_new_records(tmp_path: Path) -> None:
    """``--from latest`` (the default) waits for the next record. (A leader of its own: the
    module's leader must keep exactly the fixture's records, whatever the test order.)"""
    leader = start_leader_process(tmp_path / "log", "--fsync", "always")
    try:
        assert run_cli("produce", "--server", leader.server, stdin=b"old\n").returncode == 0

        def handshakes() -> int:
            return sum(e.get("event") == "rpc.handshake" for e in list(leader.log))

        proc = subprocess.Popen(
            [*CLI, "subscribe", "--server", leader.server, "--interface", "127.0.0.1",
             "--count", "1", "--json", "--timeout", "30"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=REPO,
        )  # fmt: skip
        try:
            # The handshake's answer fixes the start (commit + 1): once the leader has logged
            # it (and answered in the same step), the next record is the one to get.
            eventually_blocking(lambda: handshakes() == 1, "the subscriber's handshake")
            produced = run_cli("produce", "--server", leader.server, stdin=b"fresh\n")
            assert produced.returncode == 0
            out, err = proc.communicate(timeout=PATIENCE_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    finally:
        stop_leader_process(leader)
    assert proc.returncode == 0, err
    (line,) = json_lines(out)
    assert line["seqno"] == 2 and line["payload"] == "fresh"


# -- status ----------------------------------------------------------------------------------


def test_status_json_fields(leader: LeaderProcess) -> None:
    result = run_cli("status", "--server", leader.server, "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    last = status["last_seqno"]
    assert last == TOTAL
    assert status["role"] == "leader"
    assert status["epoch"] == 1
    assert status["first_seqno"] == 1
    assert status["commit_seqno"] == last
    assert status["durable_seqno"] == last  # fsync=always
    assert status["leader_address"] == leader.server
    assert status["min_insync"] == 1
    assert status["segment_count"] == 1
    assert status["replicas"] == []
    segment_bytes = sum(p.stat().st_size for p in leader.data_dir.glob("*.log"))
    assert status["log_bytes"] == segment_bytes
    assert isinstance(status["node_id"], str) and status["node_id"]


def test_status_as_text(leader: LeaderProcess) -> None:
    result = run_cli("status", "--server", leader.server)
    assert result.returncode == 0
    rows = dict(line.split(None, 1) for line in result.stdout.decode().splitlines())
    assert rows["role"] == "leader"
    assert rows["replicas"] == "none"


def test_status_of_a_dead_port_exits_1_with_one_line() -> None:
    port = free_port()
    result = run_cli("status", "--server", f"127.0.0.1:{port}", timeout_s=30)
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("boomscooter status: ") and "UNAVAILABLE" in lines[0]
    assert result.stdout == b""


def test_subscribe_to_a_dead_server_exits_1_within_its_timeout() -> None:
    timeout_s = 2.0
    server = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    results = run_concurrently(
        [
            ["--log-level", "error", "subscribe", "--server", server, "--timeout",
             str(timeout_s), "--mode", mode]
            for mode in MODES
        ],
        timeout_s=30,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    for result in results:
        assert result.returncode == 1
        lines = result.stderr.decode().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("boomscooter subscribe: cannot reach"), lines
    # The timeout, plus interpreter start-up and a retry backoff step: however slow the
    # host, well below the 30 s default, so --timeout is what ended them.
    assert timeout_s <= elapsed < 20, elapsed


def test_sigterm_stops_the_leader_cleanly(tmp_path: Path) -> None:
    node = start_leader_process(tmp_path / "log")
    produced = run_cli("produce", "--server", node.server, stdin=b"a\nb\n")
    assert produced.returncode == 0
    assert stop_leader_process(node) == 0
    stopped = [e for e in node.log if e["event"] == "leader.stopped"]
    assert stopped and stopped[0]["last_seqno"] == 2


# -- demo ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_exits_0_and_says_exactly_once() -> None:
    result = run_cli("demo", "--records", "20000", timeout_s=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    out = result.stdout.decode()
    assert "exactly once" in out
    assert "20000 records" in out
    assert "the three logs are identical" in out
    assert out.count("@replica-") >= 4  # subscribers and file readers on both replicas


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_produce_waiting_on_an_idle_stdin_stops_on_a_signal(tmp_path: Path, signum: int) -> None:
    """stdin stays open and silent (a terminal, a pipe whose writer lives on): Ctrl-C or
    SIGTERM must still end `produce` at once, with exit 130 and one line."""
    leader = start_leader_process(tmp_path / "log")
    try:
        produce_and_interrupt(leader, signum)
    finally:
        stop_leader_process(leader)


def produce_and_interrupt(leader: LeaderProcess, signum: int) -> None:
    proc = subprocess.Popen(
        [*CLI, "produce", "--server", leader.server],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=REPO,
    )  # fmt: skip
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"one line\n")
        proc.stdin.flush()
        # Started (its signal handlers in place) and sent its line: now blocked on stdin.
        eventually_blocking(lambda: last_seqno(leader) == 1, "the line stored")
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=PATIENCE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert err.decode().strip().splitlines()[-1] == "boomscooter produce: interrupted"
