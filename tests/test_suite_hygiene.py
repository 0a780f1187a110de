"""A guard against tests that fail by chance: no short deadlines, no sleeps used to wait for
something to happen (see ``tests/support/waiting.py`` for how the tests wait instead).

Every test module is parsed, and three kinds of call are flagged:

- a deadline under ``MIN_DEADLINE_S`` written as a number: ``asyncio.wait_for(x, 0.5)``,
  ``asyncio.timeout(1)``, ``asyncio.wait(..., timeout=0.3)``, or any ``timeout=`` /
  ``timeout_s=`` keyword (a gRPC deadline, a helper's bound). On a loaded two-core host a
  second is not a safe bound for anything;
- a sleep (``asyncio.sleep``, ``time.sleep``) outside ``tests/support/waiting.py``, unless the
  function it is in stands in ``ALLOWED_SLEEPS`` with the reason it is not a wait for
  something else to happen (pacing a sender, a window a negative check watches, a delay
  that is itself under test). An entry whose function no longer sleeps fails too, so the
  list stays the reviewed truth;
- ``preexec_fn=``: Python code run in a child forked from this threaded process can
  deadlock on a lock another thread held at the fork (seen: a fetch that never started).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent
MIN_DEADLINE_S = 2.0
POLLING = "a polling loop bounded by waiting.PATIENCE_S"

# (file, function) -> why its sleeps are not synchronisation.
ALLOWED_SLEEPS: dict[tuple[str, str], str] = {
    ("support/process.py", "NodeProcess.wait_for"): POLLING + " (blocking: no event loop)",
    ("support/netns_cluster.py", "wait_status"): POLLING + " (each poll runs the CLI)",
    ("support/replication.py", "status"): POLLING + " (retried while unreachable)",
    ("support/replication.py", "wait_status"): POLLING + " (an async Status per poll)",
    ("support/replication.py", "ProducerRun.run"): "pacing a producer, and its pause gate",
    ("test_log_restart.py", "ProducerRun.run"): "pacing a producer",
    ("test_log_acceptance.py", "produce"): "pacing a producer: a stream, not one burst",
    ("test_fetch.py", "fetch_from_fake_cast.carousel"): "pacing a fake sender's carousel",
    ("test_fetch.py", "test_garbage_and_foreign_datagrams_are_dropped_and_counted.noise"): (
        "pacing a noise sender"
    ),
    (
        "test_log_restart.py",
        "test_leader_restart_keeps_every_acked_record_and_subscribers_continue",
    ): ("the leader's downtime (the producer queues meanwhile): the scenario, not a wait"),
    ("test_log_restart.py", "test_stream_sender_close_always_returns"): (
        "varied delays before close(), 0-14 ms: the close must return after any of them"
    ),
    ("test_replication.py", "test_replica_crashes_under_load_lose_nothing"): (
        "a random downtime of the crashed replica: the scenario, not a wait"
    ),
    ("test_server_http.py", "test_spec_client_that_binds_after_a_round_trip_still_gets_the_file"): (
        "the simulated round trip before binding: the delay under test"
    ),
    ("test_watchdog.py", "block_the_loop"): (
        "a synchronous call blocking the event loop: the stall the watchdog must report"
    ),
    ("test_server_http.py", "test_no_datagram_after_the_last_leave"): (
        "the window the negative check watches, after the positive control was awaited"
    ),
    ("test_server_input.py", "_paused_nack_cast"): (
        "time itself passing (the first pass's suppression window): it can only run long"
    ),
    ("test_server_input.py", "test_nack_resends_the_page_marked_as_repair"): (
        "the window the negative check watches, after the resend was awaited"
    ),
    ("test_server_input.py", "test_fifty_nacks_for_one_page_cause_one_resend"): (
        "the window the negative check watches, after the resend was awaited"
    ),
    ("test_server_input.py", "test_idle_link_repeats_recent_repairs_briefly"): (
        "the window the negative check watches, after the repeat was awaited"
    ),
    ("test_storage_crash.py", "test_sigkill_never_loses_an_acknowledged_append"): (
        "random kill timing in a child process: the scenario, not a wait"
    ),
}


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    function: str
    what: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} ({self.function}): {self.what}"


def _name(node: ast.expr) -> str:
    """``asyncio.wait_for`` for ``asyncio.wait_for``, ``sleep`` for a bare ``sleep``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    return ""


def _number(node: ast.expr | None) -> float | None:
    if node is None:
        return None
    try:
        value = ast.literal_eval(node)
    except ValueError:
        return None
    return float(value) if isinstance(value, int | float) else None


def _short_deadline(call: ast.Call, name: str) -> float | None:
    """The deadline ``call`` writes as a number below MIN_DEADLINE_S, if any."""
    candidates: list[ast.expr | None] = [
        k.value for k in call.keywords if k.arg in ("timeout", "timeout_s")
    ]
    if name in ("asyncio.wait_for", "wait_for") and len(call.args) >= 2:
        candidates.append(call.args[1])
    if name == "asyncio.timeout" and call.args:
        candidates.append(call.args[0])
    for candidate in candidates:
        value = _number(candidate)
        if value is not None and value < MIN_DEADLINE_S:
            return value
    return None


class _Scanner(ast.NodeVisitor):
    def __init__(self, file: str) -> None:
        self.file = file
        self.scope: list[str] = []
        self.sleeps: list[Finding] = []
        self.deadlines: list[Finding] = []
        self.forks: list[Finding] = []

    def _enter(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _enter

    def visit_Call(self, node: ast.Call) -> None:
        name = _name(node.func)
        where = ".".join(self.scope) or "<module>"
        if name in ("asyncio.sleep", "time.sleep", "sleep"):
            self.sleeps.append(Finding(self.file, node.lineno, where, name))
        if any(k.arg == "preexec_fn" for k in node.keywords):
            self.forks.append(Finding(self.file, node.lineno, where, "preexec_fn"))
        deadline = _short_deadline(node, name)
        if deadline is not None:
            what = f"{name or 'call'}(…) with a {deadline} s deadline"
            self.deadlines.append(Finding(self.file, node.lineno, where, what))
        self.generic_visit(node)


def scan(path: Path, name: str | None = None) -> _Scanner:
    scanner = _Scanner(name or path.name)
    scanner.visit(ast.parse(path.read_text(), filename=str(path)))
    return scanner


def scan_all() -> list[_Scanner]:
    """Every test module and support module (``support/…``), the waiting helpers aside."""
    paths = sorted(TESTS.rglob("*.py"))
    found = [scan(p, p.relative_to(TESTS).as_posix()) for p in paths]
    return [s for s in found if s.file != "support/waiting.py"]


def test_no_deadline_under_two_seconds() -> None:
    found = [str(f) for s in scan_all() for f in s.deadlines]
    assert not found, "short deadlines (use waiting.within/eventually):\n" + "\n".join(found)


def test_no_python_code_in_forked_children() -> None:
    found = [str(f) for s in scan_all() for f in s.forks]
    assert not found, "preexec_fn (exec a wrapper instead):\n" + "\n".join(found)


def test_no_sleep_outside_the_reviewed_list() -> None:
    found = [
        str(f) for s in scan_all() for f in s.sleeps if (f.file, f.function) not in ALLOWED_SLEEPS
    ]
    assert not found, (
        "sleeps used to wait (wait on a condition: waiting.eventually), or add the function "
        "to ALLOWED_SLEEPS with the reason it is not a wait:\n" + "\n".join(found)
    )


def test_every_allowed_sleep_is_still_there() -> None:
    present = {(f.file, f.function) for s in scan_all() for f in s.sleeps}
    stale = sorted(set(ALLOWED_SLEEPS) - present)
    assert not stale, f"ALLOWED_SLEEPS entries with no sleep left: {stale}"


def test_the_guard_finds_what_it_must(tmp_path: Path) -> None:
    """The scanner itself: each kind of flagged call is found, generous ones are not."""
    source = tmp_path / "sample.py"
    source.write_text(
        "import asyncio, time\n"
        "async def f(call, stub):\n"
        "    await asyncio.wait_for(call.read(), 1.0)\n"
        "    await asyncio.wait_for(call.read(), 30)\n"
        "    async with asyncio.timeout(0.5):\n"
        "        pass\n"
        "    await stub.Status(request, timeout=1)\n"
        "    await asyncio.sleep(0.2)\n"
        "    time.sleep(1)\n"
        "class C:\n"
        "    def g(self):\n"
        "        eventually(lambda: True, 'x', timeout_s=0.3)\n"
        "        subprocess.Popen(['x'], preexec_fn=os.setsid)\n"
    )
    scanner = scan(source)
    assert [(f.line, f.function) for f in scanner.deadlines] == [
        (3, "f"),
        (5, "f"),
        (7, "f"),
        (12, "C.g"),
    ]
    assert [(f.line, f.what) for f in scanner.sleeps] == [(8, "asyncio.sleep"), (9, "time.sleep")]
    assert [(f.line, f.function) for f in scanner.forks] == [(13, "C.g")]
