#!/usr/bin/env python3
"""Generate the Python code of boomscooter's gRPC API: the one pinned generator.

    .venv/bin/python scripts/gen_proto.py            # regenerate into the repository
    .venv/bin/python scripts/gen_proto.py --out DIR  # into DIR/boomscooter/v1/ (drift test)

Runs ``python -m grpc_tools.protoc -Iproto`` on every ``proto/**/*.proto`` with
``--python_out`` (messages), ``--grpc_python_out`` (stubs and servicers), and mypy-protobuf's
``--mypy_out``/``--mypy_grpc_out`` for the typed ``.pyi`` stubs of both modules (they carry
the .proto comments as docstrings and type ``HasField``/``WhichOneof``, which protoc's own
``--pyi_out`` does not; the two would write the same ``boomscooter_pb2.pyi``, so only
mypy-protobuf's is used). The ``.proto`` files live under ``proto/boomscooter/v1/`` so the
generated imports match the package path (``from boomscooter.v1 import boomscooter_pb2``).

The output depends on the generator versions, so they are pinned here and in
``pyproject.toml`` (dev extra); the script refuses to run with any other installed version,
and ``tests/test_proto.py`` regenerates into a temporary directory and fails on drift. To
move to a new grpcio-tools: bump both pins, raise the runtime floors of ``grpcio*`` and
``protobuf`` in ``pyproject.toml`` to what the new generator's code requires, re-run this
script and commit its output.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Keep in step with pyproject.toml's dev extra.
PINNED_VERSIONS = {"grpcio-tools": "1.85.1", "mypy-protobuf": "5.1.0"}

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
PLUGINS = ("protoc-gen-mypy", "protoc-gen-mypy_grpc")


class GenerationError(Exception):
    """The generator cannot run as pinned, or protoc failed."""


def check_versions() -> None:
    """Fail unless exactly the pinned generator versions are installed."""
    problems = []
    for dist, pinned in PINNED_VERSIONS.items():
        try:
            installed = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            installed = "not installed"
        if installed != pinned:
            problems.append(f"{dist}=={pinned} is pinned but {installed} is installed")
    if problems:
        raise GenerationError(
            "; ".join(problems)
            + f" (in {sys.executable}). Install the pins with "
            + "`pip install '.[dev]'` (or `make venv`), or bump PINNED_VERSIONS in "
            + "scripts/gen_proto.py together with pyproject.toml."
        )


def _plugin(name: str) -> str:
    """The mypy-protobuf plugin executable next to this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise GenerationError(f"{name} (from mypy-protobuf) not found beside {sys.executable}")
    return found


def proto_files() -> list[Path]:
    """Every .proto source, relative to proto/, in a stable order."""
    return sorted(p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.rglob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Generate into ``out_root`` (package paths below it); returns the files written."""
    check_versions()
    import grpc_tools  # type: ignore[import-untyped]  # only after the version check

    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    sources = proto_files()
    if not sources:
        raise GenerationError(f"no .proto files under {PROTO_ROOT}")
    out_root.mkdir(parents=True, exist_ok=True)
    for source in sources:
        (out_root / source.parent).mkdir(parents=True, exist_ok=True)
    out = str(out_root)
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        *(f"--plugin={name}={_plugin(name)}" for name in PLUGINS),
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        # Concrete servicer methods, as at run time (an RPC not overridden answers
        # UNIMPLEMENTED), so a servicer implementing a subset type-checks.
        f"--mypy_grpc_out=generate_concrete_servicer_stubs:{out}",
        *(str(s) for s in sources),
    ]
    result = subprocess.run(command, cwd=PROTO_ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise GenerationError(f"protoc failed ({result.returncode}):\n{result.stderr}")
    written = []
    for source in sources:
        stem = out_root / source.with_suffix("")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            path = stem.with_name(stem.name + suffix)
            if not path.is_file():
                raise GenerationError(f"protoc did not write {path}")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT,
        help="output root; files go to OUT/boomscooter/v1/ (default: the repository root)",
    )
    args = parser.parse_args(argv)
    try:
        written = generate(args.out.resolve())
    except GenerationError as exc:
        print(f"gen_proto: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
