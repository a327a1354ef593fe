"""The package's import graph: no cycles, no two-way imports (even inside functions), no arrow up the layers.

Type-only imports (under ``if TYPE_CHECKING:``) are not imports at run time and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

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


def _all_imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """Every ``lightfed`` module ``path`` imports at run time, in functions too (type-only ones aside)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    guards = [n for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]
    type_only = {id(sub) for node in guards for sub in ast.walk(node)}
    out: set[str] = set()
    for sub in ast.walk(tree):
        if id(sub) in type_only:
            continue
        if isinstance(sub, ast.Import):
            out |= {a.name for a in sub.names}
        elif isinstance(sub, ast.ImportFrom):
            mod = sub.module or ""
            if sub.level:
                base = package.split(".")[: len(package.split(".")) - sub.level + 1]
                mod = ".".join([*base, mod] if mod else base)
            out |= {f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in sub.names}
    return {m for m in out if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    return {m: _all_imports(p, m, set(modules)) for m, p in modules.items()}


#: The layers of the package, lowest first: a module imports its own layer and those below, never one above.
#: A name covers the module and, for a package, everything under it; the longest matching name wins.
LAYERS: list[tuple[str, ...]] = [
    # 0. foundations: messages, flat parameters, seeds, registries, files, exact sums, the hook contracts
    ("lightfed._lazy", "lightfed.seeding", "lightfed.checks", "lightfed.registry", "lightfed.messages",
     "lightfed.params", "lightfed.lean_optim", "lightfed.assets", "lightfed.checkpoint", "lightfed.integrity",
     "lightfed.exact_sum", "lightfed.lightning_hooks", "lightfed.callbacks"),
    # 1. data, models, sampling, the sums and what a LightningModule sees of a client (context, stand-in)
    ("lightfed.data", "lightfed.models", "lightfed.sampling", "lightfed.aggregation", "lightfed.context",
     "lightfed.lightning_compat"),
    # 2. the client side: strategy contract, the local loop, executors
    ("lightfed.strategy", "lightfed.client", "lightfed.executors"),
    # 3. privacy and secure aggregation (post-processing around the sum)
    ("lightfed.privacy", "lightfed.secagg"),
    # 4. the server side of a round and the trainer's parts
    ("lightfed.server", "lightfed.distributed", "lightfed.evaluation", "lightfed.reporting", "lightfed.resume",
     "lightfed.simtime", "lightfed.noise_hint", "lightfed.client_table"),
    # 5. the loop, and what runs on top of it (the plugin kit, the centralised baseline, audits)
    ("lightfed.trainer", "lightfed.testing", "lightfed.baseline", "lightfed.audit"),
    # 6. entry points
    ("lightfed", "lightfed.cli", "lightfed.cli_lightning", "lightfed.strategy_template", "lightfed.audit.cli",
     "lightfed.audit.dpsgd_audit"),
]


def _layer(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (length of the matching name, layer)
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and (best is None or len(n) > best[0]):
                best = (len(n), i)
    return None if best is None else best[1]


def test_every_module_has_a_layer():
    missing = sorted(m for m in _graph() if _layer(m) is None)
    assert not missing, f"modules in no layer of LAYERS (add each to the layer it belongs to): {missing}"


def test_no_arrow_runs_back_up_the_layers():
    graph = _graph()
    up = [
        f"{m} (layer {_layer(m)}) -> {n} (layer {_layer(n)})" for m in sorted(graph) for n in sorted(graph[m])
        if _layer(m) is not None and _layer(n) is not None and _layer(n) > _layer(m)
    ]
    assert not up, "imports that climb the layers (move the shared piece down instead):\n" + "\n".join(up)


def test_no_two_modules_import_each_other_even_inside_functions():
    graph = _graph()
    # a package's __init__ importing its submodules is how packages work; the way back is a two-way import
    pairs = [f"{a} <-> {b}" for a in sorted(graph) for b in sorted(graph[a]) if a < b and a in graph[b]]
    assert not pairs, "two-way imports:\n" + "\n".join(pairs)


def test_the_layout_checks_can_fail(tmp_path, monkeypatch):
    """The checks above see a function-local import and a climbing one (a planted pair of modules)."""
    pkg = tmp_path / "lightfed"
    (pkg / "privacy").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "privacy" / "__init__.py").write_text("")
    (pkg / "messages.py").write_text("def f():\n    from lightfed import server\n")
    (pkg / "server.py").write_text("from lightfed.messages import f\n")
    monkeypatch.setitem(globals(), "PKG", pkg)
    graph = _graph()
    assert graph["lightfed.messages"] == {"lightfed.server"}
    assert graph["lightfed.server"] == {"lightfed.messages"}
    with pytest.raises(AssertionError, match="lightfed.messages <-> lightfed.server"):
        test_no_two_modules_import_each_other_even_inside_functions()
    with pytest.raises(AssertionError, match=r"lightfed.messages \(layer 0\) -> lightfed.server \(layer 4\)"):
        test_no_arrow_runs_back_up_the_layers()


def test_every_package_is_installed_and_the_zoo_has_a_distinctive_import_name():
    """pyproject lists packages explicitly (the zoo lives in plugins/lightfed_zoo: folder name = import name): keep the list complete."""
    import tomllib

    config = tomllib.loads((PKG.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {_module_name(p.parent / "__init__.py") for p in PKG.rglob("__init__.py")}
    zoo = {".".join(["lightfed_zoo", *p.parent.relative_to(PKG.parent / "plugins" / "lightfed_zoo").parts])
           for p in (PKG.parent / "plugins" / "lightfed_zoo").rglob("__init__.py")}
    assert set(config["packages"]) == found | zoo
    assert config["package-dir"] == {"lightfed_zoo": "plugins/lightfed_zoo"}
    import importlib

    assert importlib.import_module("lightfed_zoo.strategies").__file__.startswith(str(PKG.parent / "plugins" / "lightfed_zoo"))
