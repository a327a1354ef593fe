"""``LightFedCLI``: the LightningCLI behind ``lightfed fit``, ``lightfed test`` and ``lightfed data``.

It lives apart from :mod:`lightfed.cli` so that the commands that need no model -- ``lightfed --help``,
``lightfed strategies``, ``lightfed new-strategy`` -- do not import Lightning.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightfed.callbacks import Callback
from lightfed.data.datamodule import FederatedDataModule
from lightfed.privacy.base import PrivacyMechanism
from lightfed.registry import PLUGIN_SECTIONS, load_all_plugins
from lightfed.secagg.base import SecureAggregation
from lightfed.strategy import Strategy
from lightfed.trainer import FederatedTrainer

#: Modules whose public classes ``fit --help`` names as ready-made models and datamodules.
_MODEL_MODULES = ("lightfed.models.vision", "lightfed.models.charlm", "lightfed.models.hf")
_DATA_MODULES = ("lightfed.data.datasets", "lightfed.data.animal", "lightfed.data.text")


def builtin_classes(modules: tuple[str, ...], base: type) -> list[str]:
    """Dotted paths of the public subclasses of ``base`` defined in ``modules`` (those that import)."""
    found = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:  # an optional extra that is not installed: its classes are simply not listed
            continue
        found += [
            f"{name}.{attr}" for attr, obj in vars(module).items()
            if inspect.isclass(obj) and issubclass(obj, base) and obj.__module__ == name and not attr.startswith("_")
        ]
    return found


class LightFedCLI(LightningCLI):
    """LightningCLI whose trainer is a :class:`FederatedTrainer` and whose data is federated.

    A run without ``trainer.name`` is named after its config file (``--config experiments/X.yaml`` logs to
    ``<trainer.default_root_dir>/X/version_N``), so runs of different configs are told apart in TensorBoard.
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        load_all_plugins()
        kwargs.setdefault("seed_everything_default", 0)
        super().__init__(
            model_class=L.LightningModule,
            datamodule_class=FederatedDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_class=FederatedTrainer,  # type: ignore[arg-type]
            save_config_callback=None,
            args=args,
            run=run,
            **kwargs,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "datamodule"}, "test": {"model", "datamodule"}}

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(
            FederatedTrainer, "trainer", fail_untyped=False, instantiate=False, sub_configs=True,
            skip={*PLUGIN_SECTIONS, "seed"},
        )
        models = ", ".join(builtin_classes(_MODEL_MODULES, L.LightningModule))
        datamodules = ", ".join(builtin_classes(_DATA_MODULES, FederatedDataModule))
        parser.add_subclass_arguments(
            self._model_class, "model", fail_untyped=False, required=True,
            help=f"Any LightningModule (class_path / init_args). lightfed's own: {models}.",
        )
        parser.add_subclass_arguments(
            self._datamodule_class, "data", fail_untyped=False, required=True,
            help=f"A FederatedDataModule (class_path / init_args). lightfed's own: {datamodules}; "
                 f"partitioners in lightfed.data.partition (IID, Dirichlet, Shards, QuantitySkew, Natural).",
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Every plugin section defaults to None, never to an instance: jsonargparse carries a default's
        # init_args into any other class given later that has arguments of the same names (its issue #460),
        # so a default FedAvg would hand its weighted=True to a third-party GeoMed(weighted=False).
        parser.add_argument(
            "--strategy", type=Strategy | str | None, default=None,
            help="Aggregation strategy: a registered name (see `lightfed strategies`) or class_path/init_args; "
                 "null is FedAvg.",
        )
        parser.add_argument(
            "--privacy", type=PrivacyMechanism | None, default=None,
            help="Differential privacy mechanism (class_path/init_args), or null.",
        )
        parser.add_argument(
            "--secure_aggregation", type=SecureAggregation | None, default=None,
            help="Secure aggregation protocol (class_path/init_args), or null.",
        )
        parser.add_argument(
            "--audit", type=list[Callback] | None, default=None,
            help="Audits that run inside this fit (e.g. lightfed.audit.OneShotCanaryAudit; class_path/init_args "
                 "list; docs/auditing.md). They are trainer callbacks, run after trainer.callbacks.",
        )

    def _config(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        """Name the run after its config file when ``trainer.name`` is not set."""
        config = self._config()
        files = [f for f in (config.get("config") or []) if f is not None and str(f).endswith((".yaml", ".yml", ".json"))]
        if config.get("trainer") is not None and config.trainer.get("name") is None and files:
            config.trainer.name = Path(str(files[-1])).stem

    def instantiate_trainer(self, **kwargs: Any) -> FederatedTrainer:
        init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        config = self._config()
        extra = {key: init.get(key) for key in PLUGIN_SECTIONS}
        trainer = super().instantiate_trainer(**extra, seed=int(config.get("seed_everything") or 0), **kwargs)
        trainer.add_callbacks(init.get("audit") or [])
        trainer.config_yaml = self._parser(self.subcommand).dump(config)
        return trainer

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> FederatedTrainer:  # type: ignore[override]
        return FederatedTrainer(**config)


class DataOnlyCLI(LightFedCLI):
    """``lightfed data``: builds the datamodule and the trainer's logger, never the model (no weights loaded)."""

    def instantiate_classes(self) -> None:
        config = self._config().clone()
        config.model = None  # the model section is parsed (a config error is still reported) but never built
        self.config_init = self.parser.instantiate_classes(config)
        self.datamodule = self._get(self.config_init, "data")
        self.model = None
        self.trainer = self.instantiate_trainer()


__all__ = ["DataOnlyCLI", "LightFedCLI", "PLUGIN_SECTIONS", "builtin_classes"]
