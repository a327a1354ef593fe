"""``LightFedCLI``: the LightningCLI behind ``lightfed fit``, ``lightfed test`` and ``lightfed data``.

It lives apart from :mod:`lightfed.cli` so that the commands that need no model -- ``lightfed --help``,
``lightfed strategies``, ``lightfed new-strategy`` -- do not import Lightning.
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightfed.callbacks import Callback
from lightfed.cli_errors import unreadable_checkpoint, watch_run
from lightfed.data.datamodule import FederatedDataModule
from lightfed.privacy.base import PrivacyMechanism
from lightfed.registry import PLUGIN_SECTIONS, load_all_plugins
from lightfed.secagg.base import SecureAggregation
from lightfed.strategy import Strategy
from lightfed.trainer import FederatedTrainer

#: The most rounds a run with a privacy mechanism may ask for: its accountant composes every round, and
#: far beyond any real run (a million rounds) only exhausts memory (1e9 rounds asked numpy for 53 GiB).
MAX_PRIVATE_ROUNDS = 1_000_000

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

    A run without ``trainer.name`` is named after its (first) config file (``--config experiments/X.yaml``
    logs to ``<trainer.default_root_dir>/X/version_N``), so runs of different configs are told apart in
    TensorBoard.
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

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads ``--ckpt_path`` for a LightningModule's hyperparameters before lightfed sees it:
        a truncated or foreign file is refused here in one line, not by torch's zip reader in 30."""
        try:
            super()._parse_ckpt_path()
        except SystemExit:
            raise
        except Exception as err:  # noqa: BLE001 - whatever torch.load says, the file is not a checkpoint
            ckpt = self.config[self.config.subcommand].get("ckpt_path")
            raise ValueError(unreadable_checkpoint(str(ckpt), err)) from None

    def before_instantiate_classes(self) -> None:
        """Name the run after its config file when ``trainer.name`` is not set; refuse, before any model is
        built, what would fail late: a run folder that cannot be written, a DP run of absurdly many rounds."""
        config = self._config()
        files = [f for f in (config.get("config") or []) if f is not None and str(f).endswith((".yaml", ".yml", ".json"))]
        if config.get("trainer") is not None and config.trainer.get("name") is None and files:
            config.trainer.name = Path(str(files[0])).stem  # the experiment; later files overlay it
        trainer = config.get("trainer")
        if trainer is None:
            return
        rounds = trainer.get("rounds")
        if config.get("privacy") is not None and isinstance(rounds, int) and rounds > MAX_PRIVATE_ROUNDS:
            raise ValueError(
                f"trainer.rounds={rounds} with a privacy mechanism: its accountant composes every round, and "
                f"more than {MAX_PRIVATE_ROUNDS:,} rounds only exhausts memory. Lower trainer.rounds."
            )
        if self.subcommand in ("fit", None):
            check_writable(str(trainer.get("default_root_dir") or "."))

    def instantiate_trainer(self, **kwargs: Any) -> FederatedTrainer:
        init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        config = self._config()
        extra = {key: init.get(key) for key in PLUGIN_SECTIONS}
        trainer = super().instantiate_trainer(**extra, seed=int(config.get("seed_everything") or 0), **kwargs)
        trainer.add_callbacks(list(init.get("audit") or []))
        trainer.config_yaml = _without_ckpt_path(self._parser(self.subcommand).dump(config))
        if self.subcommand == "fit" and config.get("ckpt_path"):
            continue_in_run_folder(trainer, str(config.ckpt_path))
        watch_run(trainer)  # a Ctrl-C now says the round it stopped at and how to resume
        return trainer

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> FederatedTrainer:  # type: ignore[override]
        return FederatedTrainer(**config)


def config_from_checkpoint(path: str) -> str:
    """The resolved config (YAML) that a lightfed checkpoint was written with.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file cannot be read (truncated, not a torch file), or holds no config (not a lightfed
            checkpoint, or written by the Python API).
    """
    import torch

    if not Path(path).is_file():
        raise FileNotFoundError(f"--ckpt_path {path!r} does not exist; point it at a lightfed checkpoint (.../checkpoints/last.ckpt).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, garbage, or a pickle torch refuses to load
        raise ValueError(unreadable_checkpoint(path, err)) from None
    progress = state.get("progress", {}) if isinstance(state, dict) else {}
    config = (progress.get("config") if isinstance(progress, dict) else None) or (
        state.get("config") if isinstance(state, dict) else None
    )
    if not config:
        raise ValueError(
            f"checkpoint {path!r} holds no config (not written by `lightfed fit`); give the run's config too: "
            f"lightfed test --config X.yaml --ckpt_path {path}"
        )
    return str(config)


def continue_in_run_folder(trainer: FederatedTrainer, ckpt_path: str) -> None:
    """A resume logs into the run's own ``version_N`` (TensorBoard's curves continue) instead of a new one.

    Only when the checkpoint lies in ``<default_root_dir>/<name>/version_N/checkpoints/`` of this run's
    TensorBoard logger; a checkpoint from elsewhere (another name, a copied file) starts a new version.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = trainer.logger
    if type(logger) is not TensorBoardLogger:
        return
    ckpt = Path(ckpt_path).absolute()
    version = ckpt.parent.parent
    if ckpt.parent.name != "checkpoints" or not version.name.startswith("version_"):
        return
    if version.parent.resolve() != (Path(logger.root_dir)).resolve():
        return
    trainer.logger = TensorBoardLogger(save_dir=logger.save_dir, name=logger.name, version=version.name)


def _without_ckpt_path(config_yaml: str) -> str:
    """The run's config without ``ckpt_path``: where a run resumed from is not part of what it is (a resume or
    ``lightfed test`` would otherwise report it as a changed setting)."""
    data = yaml.safe_load(config_yaml) or {}
    if not isinstance(data, dict) or data.pop("ckpt_path", None) is None:
        return config_yaml
    return yaml.safe_dump(data, sort_keys=False)


def check_writable(directory: str) -> None:
    """Refuse a ``trainer.default_root_dir`` that cannot be written (read-only, or a file), before the run.

    Raises:
        ValueError: naming the folder and the fix.
    """
    path = Path(directory).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise ValueError(f"trainer.default_root_dir {directory!r}: {str(existing)!r} is a file, not a "
                         f"folder; point trainer.default_root_dir at a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"trainer.default_root_dir {directory!r} cannot be written ({str(existing)!r} is "
                         f"read-only); point trainer.default_root_dir at a writable folder.")


class DataOnlyCLI(LightFedCLI):
    """``lightfed data``: builds the datamodule and the trainer's logger, never the model (no weights loaded)."""

    def instantiate_classes(self) -> None:
        config = self._config().clone()
        config.model = None  # the model section is parsed (a config error is still reported) but never built
        self.config_init = self.parser.instantiate_classes(config)
        self.datamodule = self._get(self.config_init, "data")
        self.model = None
        self.trainer = self.instantiate_trainer()


__all__ = ["DataOnlyCLI", "LightFedCLI", "MAX_PRIVATE_ROUNDS", "PLUGIN_SECTIONS", "builtin_classes",
           "check_writable", "config_from_checkpoint", "continue_in_run_folder"]
