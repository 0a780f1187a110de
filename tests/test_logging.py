"""The one logging entry point (``bootcast.logs.get_logger``) in its two modes, each in a
fresh interpreter (the test process's structlog state belongs to the other tests):

- a program that uses the SDK as a library keeps its own structlog configuration: the
  library's events reach it, and the global configuration is left as the program set it;
- a command-line tool's ``configure`` filters by level before structlog is imported and
  writes one JSON object per line to stderr.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

LIBRARY = """
import json, structlog
seen = []
def keep(logger, method, event):
    seen.append({"method": method, **event})
    raise structlog.DropEvent
structlog.configure(processors=[keep])
before = structlog.get_config()
from bootcast.logs import get_logger
from boomscooter.client.producer import Producer  # imports the SDK's loggers
get_logger("boomscooter.storage").bind(dir="d").info("storage.opened", segments=1)
get_logger("boomscooter.producer").debug("producer.detail")
assert structlog.get_config() == before, "the library changed structlog's configuration"
print(json.dumps(seen))
"""

TOOL = """
import sys
from bootcast import logs
logs.configure(json=True, level="warning")
log = logs.get_logger("bootcast.server")
log.info("cast.started", path="a")
assert "structlog" not in sys.modules, "an event below the level imported structlog"
log.bind(path="b").warning("cast.refused", reason="full")
"""


def run(code: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done


def test_a_program_using_the_sdk_keeps_its_structlog_configuration() -> None:
    seen = json.loads(run(LIBRARY).stdout)
    assert seen == [
        {"method": "info", "event": "storage.opened", "dir": "d", "segments": 1},
        {"method": "debug", "event": "producer.detail"},
    ]


def test_a_tool_filters_by_level_and_writes_json_lines_to_stderr() -> None:
    done = run(TOOL)
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    event = json.loads(line)
    assert {k: event[k] for k in ("event", "path", "reason", "level")} == {
        "event": "cast.refused",
        "path": "b",
        "reason": "full",
        "level": "warning",
    }
