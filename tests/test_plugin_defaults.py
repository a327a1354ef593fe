"""Every registered plugin, named in a YAML config without ``init_args``, gets its own ``__init__`` defaults.

jsonargparse carries the ``init_args`` of a section's default into any other class given later that has
arguments of the same names (jsonargparse issue #460). With a FedAvg default for ``strategy``, a third-party
``GeoMed(weighted=False)`` ran weighted. The harness below is parametrised over everything registered, so
each new plugin, and each new plugin section default, is checked for free.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import lightfed.executors  # noqa: F401 - registers the vmap executor
import lightfed.privacy  # noqa: F401 - registers the privacy mechanisms
import lightfed.sampling
import lightfed.secagg  # noqa: F401 - registers the secure aggregation protocols
from lightfed.cli import LightFedCLI
from lightfed.messages import RoundAggregate
from lightfed.registry import EXECUTORS, PRIVACY, SECURE_AGGREGATION, STRATEGIES, load_all_plugins
from lightfed.strategy import Strategy

load_all_plugins()

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")

BASE = {
    "model": {"class_path": "lightfed.models.MLPClassifier", "init_args": {"in_features": 64, "hidden": [16]}},
    "data": {
        "class_path": "lightfed.data.datasets.DigitsDataModule",
        "init_args": {"partitioner": {"class_path": "lightfed.data.partition.IID", "init_args": {"num_clients": 20}}},
    },
    "trainer": {"rounds": 1, "clients_per_round": 4, "logger": False, "enable_progress_bar": False},
}

SAMPLERS = [
    cls for cls in vars(lightfed.sampling).values()
    if inspect.isclass(cls) and issubclass(cls, lightfed.sampling.ClientSampler) and cls is not lightfed.sampling.ClientSampler
]

#: (config key, class): where each registered plugin goes in a config.
PLUGINS = [
    *(("strategy", e.cls) for e in STRATEGIES.entries()),
    *(("privacy", e.cls) for e in PRIVACY.entries()),
    *(("secure_aggregation", e.cls) for e in SECURE_AGGREGATION.entries()),
    *(("trainer.executor", e.cls) for e in EXECUTORS.entries()),
    *(("trainer.sampler", cls) for cls in SAMPLERS),
]


class ParseOnlyCLI(LightFedCLI):
    """The ``lightfed`` parser without instantiating anything: what a config resolves to."""

    def instantiate_classes(self) -> None:
        pass


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def write_config(tmp_path: Path, key: str, value: Any) -> str:
    cfg = yaml.safe_load(yaml.safe_dump(BASE))
    *parents, leaf = key.split(".")
    section = cfg
    for parent in parents:
        section = section.setdefault(parent, {})
    section[leaf] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def own_defaults(cls: type) -> dict[str, Any]:
    params = inspect.signature(cls).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def resolved_init_args(tmp_path: Path, key: str, cls: type) -> dict[str, Any]:
    cli = ParseOnlyCLI(args=["--config", write_config(tmp_path, key, {"class_path": class_path(cls)})], run=False)
    value = cli.config[key]
    assert value.class_path == class_path(cls)
    return value.get("init_args").as_dict() if value.get("init_args") is not None else {}


@pytest.mark.parametrize(("key", "cls"), PLUGINS, ids=[f"{key}={cls.__name__}" for key, cls in PLUGINS])
def test_class_path_without_init_args_resolves_to_the_class_defaults(tmp_path, key, cls):
    # Prepare: a config that names the class and nothing else
    # Execute
    resolved = resolved_init_args(tmp_path, key, cls)
    # Assert: exactly the class's own defaults, nothing carried over from another class
    assert resolved == own_defaults(cls)


def test_the_plugin_sections_default_to_none(tmp_path):
    cli = ParseOnlyCLI(args=["--config", write_config(tmp_path, "seed_everything", 0)], run=False)
    for key in ("strategy", "privacy", "secure_aggregation", "trainer.sampler"):
        assert cli.config[key] is None, key


class GeoMed(Strategy):
    """A third-party robust aggregator, written as docs/plugins.md says: unweighted by design.

    Args:
        weighted: Weight clients by their claimed example counts (a robust rule must not).
        server_lr: Server learning rate.
    """

    def __init__(self, weighted: bool = False, server_lr: float = 0.5) -> None:
        self.weighted = weighted
        self.server_lr = server_lr

    def aggregate(self, global_params: torch.Tensor, aggregate: RoundAggregate, round_idx: int) -> torch.Tensor:
        return global_params + self.server_lr * aggregate.mean_delta()


@pytest.fixture
def geomed_registered():
    STRATEGIES.add(GeoMed, name="GeoMed", origin="a third-party package")
    yield
    STRATEGIES.remove("GeoMed")


@pytest.mark.parametrize(
    ("config_value", "override"),
    [
        ({"class_path": class_path(GeoMed)}, []),  # a dotted class_path in the YAML
        ("GeoMed", []),  # the registered name in the YAML
        (None, ["--strategy", class_path(GeoMed)]),  # on the command line, with no strategy in the YAML
        (None, ["--strategy", "GeoMed"]),
    ],
    ids=["yaml-class-path", "yaml-name", "cli-class-path", "cli-name"],
)
def test_third_party_strategy_keeps_its_own_defaults(tmp_path, geomed_registered, config_value, override):
    # Prepare (no strategy key at all in the YAML for the command-line cases: the section's default applies)
    cfg = write_config(tmp_path, "strategy", config_value) if config_value else write_config(tmp_path, "seed_everything", 0)
    # Execute
    cli = LightFedCLI(args=["--config", cfg, "--trainer.default_root_dir", str(tmp_path), *override], run=False)
    # Assert: GeoMed stays unweighted with its own server_lr (FedAvg's weighted=True / server_lr=1.0 leaked before)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, GeoMed)
    assert strategy.weighted is False and strategy.server_lr == 0.5


def test_geomed_registration_is_cleaned_up():
    assert "GeoMed" not in STRATEGIES


def test_no_strategy_gives_fedavg(tmp_path):
    cli = LightFedCLI(args=["--config", write_config(tmp_path, "trainer.default_root_dir", str(tmp_path))], run=False)
    assert type(cli.trainer.strategy).__name__ == "FedAvg"
    assert cli.trainer.strategy.weighted is True and cli.trainer.strategy.server_lr == 1.0
