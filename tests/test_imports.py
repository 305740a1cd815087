"""The package's rooms (docs/design.md, "Architecture"): no import cycles, no upward imports, and imports inside
functions only where they defer a heavy dependency. Read from the source with ``ast``, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sisa"
FOUNDATION = {"sisa.exceptions", "sisa.config", "sisa.sharding", "sisa.costs"}
# what each room may import from sisa (besides itself and the foundation)
ALLOWED = {
    "foundation": set(),
    "store": set(),
    "tables": set(),
    "train": {"store"},
    "lifecycle": {"store", "tables", "train", "lifecycle"},
    "serving": {"store", "tables", "train", "lifecycle"},
    "evidence": {"store", "tables", "train", "lifecycle"},
    "cli": {"store", "tables", "train", "lifecycle", "serving", "evidence"},
    "face": {"lifecycle"},  # sisa/__init__.py
}
# third-party modules that may be imported inside a function: each costs seconds or is optional
HEAVY = {"torch", "pandas", "uvicorn", "fastapi", "distributed", "dask", "joblib", "tqdm", "matplotlib"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def room(module: str) -> str:
    if module == "sisa":
        return "face"
    if module in FOUNDATION:
        return "foundation"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (PACKAGE / parts[1]).is_dir() else "lifecycle"


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text())
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = ".".join(package[: len(package) - child.level + 1])
                    target = f"{base}.{child.module}" if child.module else base
                else:
                    target = child.module or ""
                for a in child.names:  # `from . import x` may name a module
                    sub = f"{target}.{a.name}"
                    is_module = (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").is_file()
                    found.append((sub if is_module else target, in_function, child.lineno))
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            visit(child, nested)

    visit(tree, False)
    return found


FILES = sorted(PACKAGE.rglob("*.py"))
GRAPH = {module_name(f): {m for m, _, _ in imports(f) if m.startswith("sisa")} for f in FILES}


def test_the_package_is_read_whole():
    assert len(FILES) > 30 and "sisa.store.rundir" in GRAPH and "sisa.train.shard" in GRAPH


def test_no_import_cycles():
    cycles, state = [], {}

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt not in GRAPH:
                continue
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                dfs(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(GRAPH):
        if node not in state:
            dfs(node, [node])
    assert cycles == []


def test_no_upward_imports():
    wrong = []
    for module, targets in GRAPH.items():
        mine = room(module)
        for target in targets:
            theirs = room(target)
            if target in GRAPH and theirs not in {mine, "foundation", *ALLOWED[mine]}:
                wrong.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert wrong == []


def test_storage_never_imports_training():
    assert not {
        t for m, ts in GRAPH.items() if m.startswith("sisa.store") for t in ts if t.startswith("sisa.train")
    }


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_inside_functions_only_defer_heavy_dependencies(path):
    """The CLI and the package face defer sisa modules too (they pull in torch: ``sisa --help`` stays fast)."""
    deferring = module_name(path) == "sisa" or module_name(path).startswith("sisa.cli")
    bad = [
        f"line {line}: {target}"
        for target, inside, line in imports(path)
        if inside and target.split(".")[0] not in HEAVY and not (deferring and target.startswith("sisa"))
    ]
    assert bad == []


def test_the_checker_sees_a_cycle(tmp_path):
    """The cycle detector is real: a two-module loop in a scratch graph is found."""
    saved = dict(GRAPH)
    try:
        GRAPH.clear()
        GRAPH.update({"sisa.a": {"sisa.b"}, "sisa.b": {"sisa.a"}})
        with pytest.raises(AssertionError):
            test_no_import_cycles()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)
