"""What the log and replication benches print and write: percentiles, table cells and rows,
goal verdicts, and the parts of their JSON reports they share (the configuration, the host,
the file itself).

Nothing here measures; every function takes figures the benches computed and formats them,
so the benches' tables and JSON keep one shape (the README's figures are read off them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

Column = tuple[str, str, str]
"""``(field, header, format)`` of one table column."""


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of an ascending sequence."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def cell(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def print_table(
    title: str,
    rows: Mapping[str, Any],
    columns: Sequence[Column],
    *,
    key_width: int,
    cell_width: int,
) -> None:
    """A titled table: one row per ``rows`` item (its key, then each column's field of the
    value formatted into ``cell_width`` characters, then the value's ``note``)."""
    print(f"\n{title}")
    print(
        f"{'system':<{key_width}}" + "".join(f"{h:>{cell_width}}" for _, h, _ in columns) + "  note"
    )
    for key, m in rows.items():
        cells = "".join(f"{cell(getattr(m, n), fmt):>{cell_width}}" for n, _, fmt in columns)
        print(f"{key:<{key_width}}{cells}  {m.note}", flush=True)


def print_goals(results: Iterable[tuple[str, bool | None]]) -> None:
    """One line per goal: ``MET``, ``MISS`` or ``n/a`` (no figure to judge), then the goal."""
    for text, ok in results:
        print(f"  {'n/a ' if ok is None else 'MET ' if ok else 'MISS'} {text}")


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed command line as JSON values (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def host_of(loadavg_start: float) -> dict[str, Any]:
    """The host a run measured on: cores, platform, and its load at the start and now."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_1min_start": loadavg_start,
        "loadavg_1min_end": os.getloadavg()[0],
    }


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")
