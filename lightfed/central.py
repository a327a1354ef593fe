"""``lightfed central``: ordinary centralised training of the same model and data, with ``lightning.Trainer``.

Two jobs in a federated fine-tuning study:

* the **baseline** -- the model trained on the pooled training data of every client (the
  :class:`~lightfed.data.datamodule.FederatedDataModule`'s ``train_dataloader``; its ``val_dataloader``
  pools the clients' validation splits and ``test_dataloader`` is the central test set), which says
  what federation and privacy cost in accuracy;
* the **pretraining** step of pretrain-then-federate -- ``fit`` exports the trained weights to
  ``--export`` (default ``<trainer.default_root_dir>/model.safetensors``), which a federated config
  loads with ``trainer.init_checkpoint`` (plus ``trainer.init_ignore`` for a new head and
  ``trainer.trainable`` to fine-tune only the head or the adapters).

The YAML has the usual LightningCLI sections: ``model`` and ``data`` exactly as in ``lightfed fit``,
``trainer`` with ``lightning.Trainer``'s arguments (``max_epochs``, ``accelerator``, ...), and top-level
``init_checkpoint`` / ``init_ignore`` / ``trainable`` that mean what the federated ``trainer.*`` options of
the same names mean (so the baseline of a head-only or adapter-only federated run trains the same
parameters from the same start)::

    lightfed central fit --config experiments/pretrain_fashion.yaml
    lightfed central test --config experiments/pretrain_fashion.yaml --ckpt_path <path printed by fit>

After ``fit`` the final model is evaluated on the test set and the paths of the Lightning checkpoint
and of the exported weights are printed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightfed import checkpoint as ckpt_io
from lightfed.data.datamodule import FederatedDataModule
from lightfed.params import ParamSpec

__all__ = ["CentralCLI", "main"]


class CentralCLI(LightningCLI):
    """LightningCLI over any LightningModule and a :class:`FederatedDataModule`'s pooled dataloaders."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            model_class=L.LightningModule,
            datamodule_class=FederatedDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--export", type=str | None, default=None,
            help="Where `fit` writes the trained weights (.safetensors, or a torch file for another suffix) for a "
                 "federated run's trainer.init_checkpoint; default <trainer.default_root_dir>/model.safetensors.",
        )

        parser.add_argument(
            "--init_checkpoint", type=str | None, default=None,
            help="Start from these weights (.safetensors, state dict, Lightning or lightfed checkpoint), as the "
                 "federated trainer.init_checkpoint does.",
        )
        parser.add_argument(
            "--init_ignore", type=list[str] | None, default=None,
            help="Key patterns of init_checkpoint to skip (a new head), as trainer.init_ignore.",
        )
        parser.add_argument(
            "--trainable", type=list[str] | None, default=None,
            help="fnmatch patterns of the parameters to train (others are frozen), as trainer.trainable; the same "
                 "patterns make the baseline comparable with a head-only or adapter-only federated run.",
        )

    def _option(self, name: str) -> Any:
        config = self.config[self.subcommand] if self.subcommand else self.config
        return config.get(name)

    def _load_init_checkpoint(self) -> None:
        path = self._option("init_checkpoint")
        if path:
            state = ckpt_io.load_state_dict_file(path)
            ckpt_io.load_into(self.model, state, self._option("init_ignore") or (), source=f"init_checkpoint {path!r}")

    def before_fit(self) -> None:
        """Apply ``init_checkpoint`` / ``init_ignore`` / ``trainable`` before Lightning builds the optimizer."""
        self._load_init_checkpoint()
        spec = ParamSpec.from_module(self.model, self._option("trainable"), include_buffers=False)
        print(f"training {spec.numel:,} parameters ({len(spec.names)} tensors) of {type(self.model).__name__}")

    def before_validate(self) -> None:
        """Start from ``init_checkpoint`` (``--ckpt_path``, if given, is loaded by Lightning afterwards)."""
        self._load_init_checkpoint()

    def before_test(self) -> None:
        """Start from ``init_checkpoint`` (``--ckpt_path``, if given, is loaded by Lightning afterwards)."""
        self._load_init_checkpoint()

    def export_path(self) -> Path:
        """Where ``fit`` writes the model's weights."""
        given = self._option("export")
        return Path(given) if given else Path(self.trainer.default_root_dir) / "model.safetensors"

    def after_fit(self) -> None:
        """Export the weights, test the final model (the centralised baseline), print where everything is."""
        trainer = self.trainer
        final = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / "final.ckpt"
        trainer.save_checkpoint(final)  # collective calls first: every rank takes part
        results = trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        if not trainer.is_global_zero:
            return
        exported = ckpt_io.export_state_dict(self.model, self.export_path())
        metrics = results[0] if results else {}
        summary = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
        print(f"centralised baseline (test set, final model): {summary or 'no test metrics logged'}")
        print(f"Lightning checkpoint: {final}")
        callback = trainer.checkpoint_callback
        if getattr(callback, "monitor", None) is not None and getattr(callback, "best_model_path", ""):
            print(f"best checkpoint ({callback.monitor}): {callback.best_model_path}")
        print(f"model weights: {exported}  (use as trainer.init_checkpoint of a federated config)")


def main(args: list[str] | None = None, **cli_kwargs: Any) -> None:
    """Entry point of ``lightfed central <fit|validate|test> --config X.yaml`` (``args``: what follows ``central``).

    Args:
        args: The command line after ``central``; ``None`` reads ``sys.argv``.
        **cli_kwargs: Passed to :class:`CentralCLI` (``lightfed``'s ``main`` passes ``parser_kwargs``).
    """
    if args is None:
        CentralCLI(**cli_kwargs)
        return
    argv, sys.argv = sys.argv, sys.argv[:1]  # `args` already holds the command line; keep Lightning from warning
    try:
        CentralCLI(args=args, **cli_kwargs)
    finally:
        sys.argv = argv
