"""The ``lightfed`` command: LightningCLI for federated runs, plus ``strategies`` and ``data``.

``lightfed fit --config experiments/digits_fedavg.yaml`` parses a YAML with the usual LightningCLI
sections -- ``model`` and ``data`` (``class_path`` / ``init_args``), ``trainer`` (the
:class:`~lightfed.trainer.FederatedTrainer`'s arguments) -- plus top-level ``strategy``, ``privacy`` and
``secure_aggregation`` sections, each a registered plugin name or a ``class_path`` with ``init_args``
validated from the class's type hints. ``--print_config``, ``--help`` and ``--trainer.rounds 20`` work as
in Lightning.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightfed.data.datamodule import FederatedDataModule
from lightfed.privacy.base import PrivacyMechanism
from lightfed.registry import EXECUTORS, PRIVACY, SECURE_AGGREGATION, STRATEGIES, load_all_plugins
from lightfed.secagg.base import SecureAggregation
from lightfed.strategy import FedAvg, Strategy
from lightfed.trainer import FederatedTrainer

_PLUGIN_SECTIONS = ("strategy", "privacy", "secure_aggregation")


class LightFedCLI(LightningCLI):
    """LightningCLI whose trainer is a :class:`FederatedTrainer` and whose data is federated."""

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
            skip={*_PLUGIN_SECTIONS, "seed"},
        )
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=True)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=True)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--strategy", type=Strategy | str, default=lazy_instance(FedAvg),
            help="Aggregation strategy: a registered name (see `lightfed strategies`) or class_path/init_args.",
        )
        parser.add_argument(
            "--privacy", type=PrivacyMechanism | None, default=None,
            help="Differential privacy mechanism (class_path/init_args), or null.",
        )
        parser.add_argument(
            "--secure_aggregation", type=SecureAggregation | None, default=None,
            help="Secure aggregation protocol (class_path/init_args), or null.",
        )

    def instantiate_trainer(self, **kwargs: Any) -> FederatedTrainer:
        init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        config = self.config[self.subcommand] if self.subcommand else self.config
        extra = {key: init.get(key) for key in _PLUGIN_SECTIONS}
        trainer = super().instantiate_trainer(**extra, seed=int(config.get("seed_everything") or 0), **kwargs)
        trainer.config_yaml = self._parser(self.subcommand).dump(config)
        return trainer

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> FederatedTrainer:  # type: ignore[override]
        return FederatedTrainer(**config)


def print_plugins() -> None:
    """``lightfed strategies``: every registered plugin, its description and where it came from."""
    load_all_plugins()
    for registry in (STRATEGIES, PRIVACY, SECURE_AGGREGATION, EXECUTORS):
        entries = registry.entries()
        print(f"{registry.group}:")
        if not entries:
            print("  (none installed)")
        width = max((len(e.name) for e in entries), default=0)
        for e in entries:
            print(f"  {e.name:<{width}}  {e.description}  [{e.origin}]")
        print()


def data_command(args: list[str]) -> None:
    """``lightfed data --config X.yaml``: print the partition's statistics and plot its label histogram."""
    from lightfed.data.stats import format_statistics, partition_statistics, plot_label_distribution

    cli = LightFedCLI(args=args, run=False)
    dm = cli.datamodule
    stats = partition_statistics(dm)
    print(format_statistics(stats))
    out = Path(cli.trainer.default_root_dir) / "partition.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = plot_label_distribution(dm, str(out))
    print(f"label distribution plot: {out}")
    if cli.trainer.logger is not None and hasattr(cli.trainer.logger, "experiment"):
        cli.trainer.logger.experiment.add_figure("data/label_distribution", fig, global_step=0)
        cli.trainer.logger.experiment.flush()
        print(f"and in TensorBoard under {cli.trainer.log_dir} (tag data/label_distribution)")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lightfed`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    # sub-commands of our own hand LightningCLI a slice of sys.argv on purpose
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    if args and args[0] in ("strategies", "plugins"):
        print_plugins()
        return
    if args and args[0] == "data":
        data_command(args[1:])
        return
    if args and args[0] == "central":
        from lightfed.central import main as central_main

        central_main(args[1:])
        return
    LightFedCLI(args=argv)


if __name__ == "__main__":
    main()
