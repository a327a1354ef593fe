"""The three ways a strategy reaches lightfed, each selected from a YAML config; and `lightfed strategies`.

1. ``@STRATEGIES.register`` in an imported module;
2. an entry point (group ``lightfed.strategies``) of a separately installed package -- the example plugin
   in ``tests/example_plugin``, "installed" by writing its ``*.dist-info`` (from its own ``pyproject.toml``)
   into a directory on ``sys.path``;
3. a dotted ``class_path`` to a class no registry knows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import tomllib
import torch

from lightfed import Strategy
from lightfed.cli import LightFedCLI, main
from lightfed.registry import STRATEGIES
from tests.plugins.zoo_testing import UnregisteredStrategy

EXAMPLE = Path(__file__).resolve().parents[1] / "example_plugin"
ZOO = ["FedAvgM", "FedProx", "FedAdagrad", "FedAdam", "FedYogi", "FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum",
       "Bulyan", "SCAFFOLD", "FedNova", "QFedAvg", "Ditto"]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI(args=...) warns when pytest's own arguments are on sys.argv."""
    monkeypatch.setattr(sys, "argv", ["lightfed"])


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch):
    """The strategy registry, restored to its previous entries after the test."""
    monkeypatch.setattr(STRATEGIES, "_entries", dict(STRATEGIES._entries))
    return STRATEGIES


def write_config(tmp_path: Path, strategy_yaml: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"""seed_everything: 0
model:
  class_path: lightfed.models.MLPClassifier
  init_args: {{hidden: [16], lr: 0.3}}
data:
  class_path: lightfed.data.datasets.DigitsDataModule
  init_args:
    partitioner: {{class_path: lightfed.data.partition.IID, init_args: {{num_clients: 8}}}}
trainer:
  rounds: 2
  clients_per_round: 7
  local_steps: 2
  batch_size: 32
  fed_eval_fraction: 0.0
  checkpoint_every: 0
  logger: false
  enable_progress_bar: false
  default_root_dir: {tmp_path / "run"}
{strategy_yaml}
"""
    )
    return str(path)


def strategy_from_config(tmp_path: Path, strategy_yaml: str) -> Strategy:
    cli = LightFedCLI(args=["--config", write_config(tmp_path, strategy_yaml)], run=False)
    return cli.trainer.strategy


# ---------------------------------------------------------------------------------------- the zoo itself
def test_zoo_arrives_through_the_entry_point_declared_in_pyproject():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"]["lightfed.strategies"] == {"zoo": "lightfed_zoo.strategies"}
    for entry in STRATEGIES.entries():
        if entry.name in ZOO:
            assert entry.origin == "lightfed (entry point zoo)", entry
    assert set(ZOO) <= set(STRATEGIES.names())


@pytest.mark.parametrize(
    ("strategy_yaml", "cls", "attrs"),
    [
        ("strategy: FedProx", "FedProx", {"mu": 0.01}),
        ("strategy: fedprox", "FedProx", {"mu": 0.01}),  # names are case-insensitive
        ("strategy:\n  class_path: FedProx\n  init_args: {mu: 0.5}", "FedProx", {"mu": 0.5}),
        ("strategy:\n  class_path: lightfed_zoo.strategies.krum.MultiKrum\n  init_args: {f: 2, m: 3}", "MultiKrum", {"f": 2, "m": 3}),
    ],
)
def test_zoo_strategy_by_name_or_class_path_with_init_args(tmp_path, strategy_yaml, cls, attrs):
    strategy = strategy_from_config(tmp_path, strategy_yaml)
    assert type(strategy).__name__ == cls
    assert {k: getattr(strategy, k) for k in attrs} == attrs


@pytest.mark.parametrize(
    ("strategy_yaml", "message"),
    [
        ("strategy:\n  class_path: FedProx\n  init_args: {mu: -1.0}", "mu must be >= 0"),
        ("strategy:\n  class_path: FedProx\n  init_args: {mu: not-a-number}", "mu"),  # type hint: float
        ("strategy:\n  class_path: FedTrimmedAvg\n  init_args: {beta: 0.5}", "beta must be in"),
        ("strategy:\n  class_path: Krum\n  init_args: {f: 1.5}", "f"),
        ("strategy: NoSuchStrategy", "unknown strategy 'NoSuchStrategy'"),
    ],
)
def test_bad_strategy_config_fails_with_the_field(tmp_path, capsys, strategy_yaml, message):
    with pytest.raises((ValueError, SystemExit)) as err:
        strategy_from_config(tmp_path, strategy_yaml)
    assert message in str(err.value) + capsys.readouterr().err


# ---------------------------------------------------------------------------------------- route 1: decorator
def test_decorator_registration(registry, tmp_path):
    @registry.register("HalfStep", description="FedAvg with half the step.")
    class HalfStep(Strategy):
        def aggregate(self, global_params, aggregate, round_idx):
            return global_params + 0.5 * aggregate.mean_delta()

    assert "HalfStep" in registry.names() and "halfstep" in registry
    entry = next(e for e in registry.entries() if e.name == "HalfStep")
    assert (entry.cls, entry.description, entry.origin) == (HalfStep, "FedAvg with half the step.", __name__)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("halfstep")(type("Other", (Strategy,), {}))
    assert isinstance(strategy_from_config(tmp_path, "strategy: halfstep"), HalfStep)
    assert registry.remove("HalfStep").cls is HalfStep and "HalfStep" not in registry.names()


# ---------------------------------------------------------------------------------------- route 2: entry point
def install_example_plugin(site: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """What ``pip install tests/example_plugin`` leaves behind: the package importable and its dist-info."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    dist = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    lines = []
    for group, eps in project["entry-points"].items():
        lines += [f"[{group}]", *(f"{k} = {v}" for k, v in eps.items())]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(site))
    for mod in [m for m in sys.modules if m == "lightfed_example" or m.startswith("lightfed_example.")]:
        monkeypatch.delitem(sys.modules, mod)  # forget any earlier import: the entry point must do it
    return project["name"]


def test_entry_point_plugin_is_found_by_name_from_yaml(registry, tmp_path, monkeypatch, capsys):
    if "FedMeanClip" in registry:
        registry.remove("FedMeanClip")
    dist_name = install_example_plugin(tmp_path / "site", monkeypatch)
    registry.load_entry_points()  # already ran in this process: a plain call does not rescan
    assert "FedMeanClip" not in registry.names()
    registry.load_entry_points(force=True)
    entry = next(e for e in registry.entries() if e.name == "FedMeanClip")
    assert entry.origin == f"{dist_name} (entry point example)"
    assert entry.description.startswith("FedMeanClip: FedAvg whose mean update is scaled down")

    strategy = strategy_from_config(tmp_path, "strategy: FedMeanClip")
    assert type(strategy) is entry.cls and strategy.max_norm == 1.0
    cfg = write_config(tmp_path, "strategy:\n  class_path: FedMeanClip\n  init_args: {max_norm: 0.01}")
    main(["fit", "--config", cfg])
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["strategy"] == {"name": "FedMeanClip", "state": {"clipped_rounds": 2}}
    assert [round(row["round/update_norm"], 6) for row in ckpt["progress"]["history"]] == [0.01, 0.01]

    capsys.readouterr()
    main(["strategies"])
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("FedMeanClip "))
    assert "scaled down to at most max_norm" in line and line.endswith(f"[{dist_name} (entry point example)]")


# ---------------------------------------------------------------------------------------- route 3: class path
def test_unregistered_class_by_dotted_class_path(tmp_path):
    assert not any(e.cls is UnregisteredStrategy for e in STRATEGIES.entries())
    strategy = strategy_from_config(tmp_path, "strategy:\n  class_path: tests.plugins.zoo_testing.UnregisteredStrategy\n  init_args: {scale: 0.5}")
    assert type(strategy) is UnregisteredStrategy and strategy.scale == 0.5
    with pytest.raises((ValueError, SystemExit)):
        strategy_from_config(tmp_path, "strategy:\n  class_path: tests.plugins.zoo_testing.UnregisteredStrategy\n  init_args: {scale: -1}")


# ---------------------------------------------------------------------------------------- listing
def test_lightfed_strategies_lists_names_descriptions_and_origins(capsys):
    main(["strategies"])
    out = capsys.readouterr().out
    lines = {x.split()[0]: x for x in out.splitlines() if x.startswith("  ") and x.strip()}
    for name in ZOO:
        entry = next(e for e in STRATEGIES.entries() if e.name == name)
        assert entry.description in lines[name] and lines[name].endswith("[lightfed (entry point zoo)]"), lines[name]
    assert lines["FedAvg"].endswith("[lightfed.strategy]")
