"""``benchmarks/strategy_table.py`` prints by default and rewrites docs/strategies.md only with ``--write``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def table(monkeypatch):
    spec = importlib.util.spec_from_file_location("strategy_table", ROOT / "benchmarks" / "strategy_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    row = {"name": "FedAvg", "dir0.1": 0.5, "dir1.0": 0.6, "flip1": 0.1, "flip4": 0.1, "fed_mean": 0.5, "fed_worst": 0.2}
    monkeypatch.setattr(module, "measure", lambda names, rounds, seed, root: [row])
    written: list[str] = []
    monkeypatch.setattr(module, "write_table", written.append)
    return module, written


def test_default_prints_and_leaves_the_doc_alone(table, capsys):
    module, written = table
    module.main(["--rounds", "1", "--strategies", "FedAvg"])
    assert written == [] and "| FedAvg |" in capsys.readouterr().out


def test_write_rewrites_the_doc(table):
    module, written = table
    module.main(["--rounds", "1", "--strategies", "FedAvg", "--write"])
    assert len(written) == 1 and "`.venv/bin/python benchmarks/strategy_table.py --write`" in written[0]
