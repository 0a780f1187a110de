"""The ``boomscooter`` command (the log arrives with later issues)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="boomscooter",
        description="Replicated append-only log over multicast. Not yet implemented: "
        "this release ships the bootcast transport (see `bootcast --help`).",
    )
    parser.parse_args(argv)
    print("boomscooter: the log is not implemented yet; see `bootcast --help`", file=sys.stderr)
    return 1
