"""The shape of the code, checked: import layers and no cycles (import-linter, the contracts
in pyproject.toml), no private name used outside the module that defines it, no function
over ~70 lines in the node, client and stream packages, and no function-local import in
the node to dodge a cycle (docs/architecture.md says where things go)."""

from __future__ import annotations

import ast
from pathlib import Path

from importlinter.cli import lint_imports

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("boomscooter", "bootcast")
MAX_FUNCTION_LINES = 70
# Underscore names that are public API by design (namedtuple's, os._exit, typing-only).
PUBLIC_UNDERSCORE = {"_replace", "_make", "_asdict", "_fields", "_exit", "_Hash"}


def sources(*packages: str) -> list[Path]:
    return sorted(
        p for package in packages for p in (REPO / package).rglob("*.py") if "_pb2" not in p.name
    )


def test_import_contracts_are_kept() -> None:
    assert lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True) == 0


def _defined_private(tree: ast.Module) -> set[str]:
    """The ``_names`` a module defines: functions, classes, attributes it assigns."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def private_reach_ins(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    own = _defined_private(tree) | PUBLIC_UNDERSCORE
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found += [
                f"{path.relative_to(REPO)}:{node.lineno} imports {node.module}.{a.name}"
                for a in node.names
                if a.name.startswith("_") and not a.name.startswith("__")
            ]
        elif (
            isinstance(node, ast.Attribute)
            and node.attr not in own
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{path.relative_to(REPO)}:{node.lineno} uses {ast.unparse(node)}")
    return found


def test_no_private_name_is_used_outside_its_module() -> None:
    found = [line for path in sources(*PACKAGES, "bench") for line in private_reach_ins(path)]
    assert not found, "\n".join(found)


def test_the_guard_sees_a_reach_in(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from x import _hidden\n"
        "class A:\n"
        "    def _mine(self): return self._mine\n"
        "def f(node): return node._theirs, node._mine, p._replace(a=1)\n"
    )
    found = [line.split(" ", 1)[1] for line in private_reach_ins_at(sample)]
    assert found == ["imports x._hidden", "uses node._theirs"]


def private_reach_ins_at(path: Path) -> list[str]:
    """:func:`private_reach_ins` for a file outside the repository."""
    global REPO
    saved, REPO = REPO, path.parent
    try:
        return private_reach_ins(path)
    finally:
        REPO = saved


def test_functions_are_short_in_the_node_client_and_stream() -> None:
    long = []
    for path in sources("boomscooter/node", "boomscooter/client", "boomscooter/stream"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines})")
    assert not long, "\n".join(long)


def test_the_node_imports_at_the_top() -> None:
    """A function-local import in the node is a cycle dodged (TYPE_CHECKING ones aside)."""
    local = []
    for path in sources("boomscooter/node"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                local += [
                    f"{path.relative_to(REPO)}:{inner.lineno}"
                    for inner in ast.walk(node)
                    if isinstance(inner, ast.Import | ast.ImportFrom)
                ]
    assert not local, "\n".join(local)
