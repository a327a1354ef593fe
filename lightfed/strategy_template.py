"""``lightfed new-strategy NAME [--dir PATH]``: write a strategy plugin package that works as written.

The package has the entry point that makes lightfed find the strategy by name, one linear strategy (a
FedAvg with a server learning rate, to be changed into yours), and a test that runs lightfed's conformance
harness (:func:`lightfed.testing.check_strategy`) on it::

    lightfed new-strategy GeoMed --dir ~/src
    cd ~/src/lightfed-geomed && pip install -e . && python -m pytest
    lightfed strategies                      # GeoMed ... [lightfed-geomed (entry point geomed)]

Imports nothing heavy: it only writes text files.
"""

from __future__ import annotations

import argparse
import keyword
import re
from pathlib import Path

PYPROJECT = '''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "{name}: a lightfed aggregation strategy"
requires-python = ">=3.10"
dependencies = ["lightfed"]

[project.optional-dependencies]
test = ["pytest>=8"]

# The line that makes lightfed find the strategy: an entry point in the group `lightfed.strategies` whose
# value is a module; importing it runs the @STRATEGIES.register decorator inside.
[project.entry-points."lightfed.strategies"]
{entry} = "{package}.strategies"

[tool.setuptools]
packages = ["{package}"]
'''

STRATEGY = '''"""{name}: a lightfed aggregation strategy (see lightfed's docs/plugins.md for the contract)."""

from __future__ import annotations

from torch import Tensor

from lightfed import STRATEGIES, RoundAggregate, Strategy


@STRATEGIES.register("{name}")
class {name}(Strategy):
    """{name}: FedAvg with a server learning rate -- replace with one line saying what yours does.

    ``w <- w + server_lr * sum_k w_k delta_k / sum_k w_k``, with ``w_k = n_k`` (``weighted``) or 1.
    State the update, cite the paper, and say where you depart from it.

    Args:
        server_lr: Server learning rate (> 0).
        weighted: Weight client ``k`` by its number of examples ``n_k`` (``False``: uniform).
    """

    def __init__(self, server_lr: float = 1.0, weighted: bool = True) -> None:
        if not server_lr > 0:
            raise ValueError(f"{name} server_lr must be > 0, got {{server_lr}} (`strategy.init_args.server_lr`).")
        self.server_lr = float(server_lr)
        self.weighted = weighted

    def aggregate(self, global_params: Tensor, aggregate: RoundAggregate, round_idx: int) -> Tensor:
        return global_params + self.server_lr * aggregate.mean_delta()
'''

TEST = '''"""{name} against lightfed's conformance harness, plus the tests only you can write."""

from lightfed.registry import STRATEGIES
from lightfed.testing import check_strategy

from {package}.strategies import {name}


def test_{snake}_passes_the_lightfed_conformance_harness():
    check_strategy({name})


def test_{snake}_is_registered_by_name():
    assert STRATEGIES.get("{name}") is {name}
'''

README = '''# {dist}

The `{name}` strategy for lightfed.

    pip install -e .                # in this folder, with lightfed installed
    python -m pytest                # lightfed's conformance harness on {name}
    lightfed strategies             # lists {name}
    lightfed fit --config <a lightfed config> --strategy {name}
'''


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def write_package(name: str, directory: str | Path = ".") -> Path:
    """Write the plugin package of strategy ``name`` under ``directory``; return its folder.

    Raises:
        ValueError: if ``name`` is not a Python class name, ``directory`` is not a folder, or the package
            folder already exists.
    """
    if not name.isidentifier() or keyword.iskeyword(name) or not name[0].isupper():
        raise ValueError(
            f"new-strategy NAME must be a Python class name starting with a capital letter (e.g. GeoMed), got {name!r}."
        )
    snake = _snake(name)
    package, dist = f"lightfed_{snake}", f"lightfed-{snake.replace('_', '-')}"
    root = Path(directory) / dist
    if not Path(directory).is_dir():
        raise ValueError(
            f"--dir {str(directory)!r} is not an existing folder; create it first (mkdir -p) or fix the path."
        )
    if root.exists():
        raise ValueError(f"{root} already exists; choose another --dir or remove it.")
    fields = {"name": name, "snake": snake, "package": package, "dist": dist, "entry": snake}
    files = {
        root / "pyproject.toml": PYPROJECT,
        root / "README.md": README,
        root / package / "__init__.py": '"""The {name} strategy for lightfed (registered by {package}.strategies)."""\n',
        root / package / "strategies.py": STRATEGY,
        root / "tests" / f"test_{snake}.py": TEST,
    }
    for path, template in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**fields))
    return root


def main(args: list[str]) -> None:
    """``lightfed new-strategy NAME [--dir PATH]``."""
    parser = argparse.ArgumentParser(prog="lightfed new-strategy", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="the strategy's class name, e.g. GeoMed")
    parser.add_argument("--dir", default=".", help="where to create the package folder (default: here)")
    options = parser.parse_args(args)
    root = write_package(options.name, options.dir)
    print(f"wrote {root}/ (pyproject.toml with the lightfed.strategies entry point, "
          f"{root.name.replace('-', '_')}/strategies.py, tests/)")
    print(f"next: cd {root} && pip install -e . && python -m pytest && lightfed strategies")


__all__ = ["main", "write_package"]
