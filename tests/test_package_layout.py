"""The package's import graph has no cycles (imports at module level, as Python runs them)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lightfed"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _runtime_imports(path: Path, name: str) -> set[str]:
    """``lightfed`` modules imported at module level (not under ``if TYPE_CHECKING``, not inside functions)."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) else []:
            if isinstance(sub, ast.Import):
                out |= {a.name for a in sub.names if a.name.startswith("lightfed")}
            elif isinstance(sub, ast.ImportFrom):
                mod = sub.module or ""
                if sub.level:
                    base = package.split(".")[: len(package.split(".")) - sub.level + 1]
                    mod = ".".join([*base, mod] if mod else base)
                if mod.startswith("lightfed"):
                    out.add(mod)
                    out |= {f"{mod}.{a.name}" for a in sub.names}  # `from lightfed import checkpoint`
    return out


def test_no_import_cycles_in_the_package():
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {m: {i for i in _runtime_imports(p, m) if i in modules and i != m} for m, p in modules.items()}
    # a package's __init__ importing its submodules is how Python packages work; edges into a package
    # __init__ from its own submodules would be a cycle, and so would any other loop
    cycles = []
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                loop = stack[stack.index(n):] + [n]
                if not all(x == n or x.startswith(n + ".") or n.startswith(x + ".") for x in loop):
                    cycles.append(" -> ".join(loop))
            elif n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_package_is_installed_and_the_zoo_has_a_distinctive_import_name():
    """pyproject lists packages explicitly (the folder plugins/ installs as lightfed_zoo): keep the list complete."""
    import tomllib

    config = tomllib.loads((PKG.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {_module_name(p.parent / "__init__.py") for p in PKG.rglob("__init__.py")}
    zoo = {".".join(["lightfed_zoo", *p.parent.relative_to(PKG.parent / "plugins").parts])
           for p in (PKG.parent / "plugins").rglob("__init__.py")}
    assert set(config["packages"]) == found | zoo
    assert config["package-dir"] == {"lightfed_zoo": "plugins"}
    import importlib

    assert importlib.import_module("lightfed_zoo.strategies").__file__.startswith(str(PKG.parent / "plugins"))
