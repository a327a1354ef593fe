"""The centralised baseline, ``lightfed central``: the same model and data trained by ``lightning.Trainer``.

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

**A federated config works as it is** (``lightfed central fit --config experiments/digits_fedavg.yaml``):
:func:`federated_to_central` translates it into the baseline of that run --

* ``model``, ``data`` and ``seed_everything`` are kept; ``data.batch_size``, if the config leaves it unset,
  becomes the clients' ``trainer.batch_size`` (the baseline takes the same steps the clients take);
* ``strategy``, ``privacy``, ``secure_aggregation``, ``audit``, ``ckpt_path`` and ``trainer.callbacks`` are ignored
  (a baseline has no server, no clients to protect, no federated checkpoint);
* ``trainer.init_checkpoint`` / ``init_ignore`` / ``trainable`` become the top-level options of the same
  names; ``accelerator``, ``devices``, ``precision``, ``num_nodes``, ``enable_progress_bar`` and
  ``default_root_dir`` are kept; the other federated trainer options are dropped;
* **rounds become work**: the baseline trains on the pooled data until it has processed as many examples
  as the federated run's clients do in ``trainer.rounds`` rounds (expected cohort x ``local_epochs`` x mean
  client size, or x ``local_steps`` x ``batch_size``). :class:`RoundClock` counts that work in rounds and
  every ``trainer.eval_every`` rounds logs the test set as ``central/test_<metric>`` at step
  ``round - 1``: the tags and steps of the federated run, so TensorBoard overlays the two curves;
* the TensorBoard run is ``<default_root_dir>/<name>_central`` next to the federated ``<name>`` (``name``:
  ``trainer.name``, else the config file's stem), so ``tensorboard --logdir <default_root_dir>`` shows both.
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightfed import checkpoint as ckpt_io
from lightfed.client import LogCapture
from lightfed.data.datamodule import FederatedDataModule
from lightfed.params import ParamSpec
from lightfed.sampling import ClientSampler, UniformSampler

__all__ = ["CentralCLI", "RoundClock", "federated_to_central", "main"]

#: Sections of a federated config that a centralised baseline has no use for.
FEDERATED_ONLY = ("strategy", "privacy", "secure_aggregation", "audit", "ckpt_path")
#: Federated trainer options that define the amount of work per round (read by :class:`RoundClock`).
SCHEDULE = ("rounds", "clients_per_round", "sampler", "local_epochs", "local_steps", "batch_size", "eval_every",
            "eval_batch_size")
#: Federated trainer options that mean the same for the baseline, as top-level ``central`` options.
TOP_LEVEL = ("init_checkpoint", "init_ignore", "trainable")
#: Federated trainer options that ``lightning.Trainer`` takes under the same name.
KEPT = ("accelerator", "devices", "precision", "num_nodes", "enable_progress_bar", "default_root_dir")


class RoundClock(L.Callback):
    """Counts a centralised run's work in rounds of the federated run it is the baseline of.

    One round is the examples the federated run's clients process in a round: the expected cohort
    (``sampler.expected_cohort``) times a client's local work, ``local_epochs`` x its training examples,
    or ``local_steps`` x ``min(batch_size, its examples)``, averaged over the population. Every
    ``eval_every`` rounds (and after the last) the model is evaluated on the central test set with its
    ``test_step`` and logged as ``central/<metric>`` at step ``round - 1``, as the federated trainer does;
    training stops after ``rounds`` rounds of work.

    Args:
        rounds: The federated run's ``trainer.rounds``.
        sampler: Its ``trainer.sampler`` (class_path / init_args, or an instance); ``None``: uniform
            ``clients_per_round``.
        clients_per_round: Its ``trainer.clients_per_round``.
        local_epochs: Its ``trainer.local_epochs``.
        local_steps: Its ``trainer.local_steps``.
        batch_size: Its ``trainer.batch_size``.
        eval_every: Its ``trainer.eval_every``.
        eval_batch_size: Its ``trainer.eval_batch_size``.
        name: Its run name; the baseline logs to TensorBoard as ``<name>_central`` (see :class:`CentralCLI`).
    """

    def __init__(
        self,
        rounds: int = 10,
        sampler: dict[str, Any] | ClientSampler | None = None,
        clients_per_round: int | float = 10,
        local_epochs: int = 1,
        local_steps: int | None = None,
        batch_size: int = 16,
        eval_every: int = 1,
        eval_batch_size: int = 512,
        name: str | None = None,
    ) -> None:
        self.name = name
        self.rounds, self.local_epochs, self.local_steps = rounds, local_epochs, local_steps
        self.batch_size, self.eval_every, self.eval_batch_size = batch_size, eval_every, eval_batch_size
        self.sampler = _build(sampler) if sampler is not None else UniformSampler(clients_per_round)
        self.examples_per_round = 0.0
        self.seen = 0
        self.done = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        assert isinstance(dm, FederatedDataModule) and dm.train_part is not None
        sizes = dm.train_part.sizes().double().cpu()
        if self.local_steps is not None:
            work = self.local_steps * sizes.clamp(max=self.batch_size)
        else:
            work = self.local_epochs * sizes
        self.examples_per_round = float(work.mean()) * self.sampler.expected_cohort(len(sizes))
        total = self.rounds * self.examples_per_round
        if trainer.fit_loop.max_epochs in (None, -1):
            trainer.fit_loop.max_epochs = max(1, math.ceil(total / max(1.0, float(sizes.sum())))) + 1
        if trainer.is_global_zero:
            print(f"baseline: {self.rounds} rounds of the federated run = {total:,.0f} training examples "
                  f"({total / float(sizes.sum()):.1f} passes over the pooled data)")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.seen += len(batch[0]) * trainer.world_size
        while self.done < self.rounds and self.seen >= (self.done + 1) * self.examples_per_round:
            self.done += 1
            if self.done % self.eval_every == 0 or self.done == self.rounds:
                self.evaluate(trainer, pl_module, step=self.done - 1)
        if self.done >= self.rounds:
            trainer.should_stop = True

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> dict[str, float]:
        """The module's ``test_step`` over the central test set, logged as ``central/<metric>`` at ``step``."""
        dm = trainer.datamodule
        assert isinstance(dm, FederatedDataModule)
        capture = LogCapture()
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad(), capture.attach(pl_module):
            for i, batch in enumerate(dm.test_data().batches(self.eval_batch_size)):
                capture.batch_size = len(batch[0])
                pl_module.test_step([t.to(pl_module.device) for t in batch], i)
        pl_module.train(was_training)
        metrics = {f"central/{k}": v for k, v in capture.results().items()}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "done": self.done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seen, self.done = int(state_dict["seen"]), int(state_dict["done"])


def _build(spec: dict[str, Any] | Any) -> Any:
    """An instance from ``{"class_path": ..., "init_args": ...}`` (or ``spec`` itself if it is one)."""
    if not isinstance(spec, dict):
        return spec
    module, _, name = str(spec["class_path"]).rpartition(".")
    return getattr(importlib.import_module(module or "lightfed"), name)(**(spec.get("init_args") or {}))


def is_federated(config: dict[str, Any]) -> bool:
    """Whether ``config`` is a ``lightfed fit`` config (it has federated sections or trainer options)."""
    trainer = config.get("trainer") or {}
    return any(k in config for k in FEDERATED_ONLY[:3]) or any(k in trainer for k in (*SCHEDULE[:4], *TOP_LEVEL))


def federated_to_central(config: dict[str, Any], source: str = "config") -> tuple[dict[str, Any], list[str]]:
    """The centralised baseline of a federated config (the mapping is in this module's docstring).

    Args:
        config: A ``lightfed fit`` config, as loaded from YAML.
        source: The config's file name (its stem names the TensorBoard run if ``trainer.name`` is unset).

    Returns:
        The ``lightfed central`` config, and the federated keys it ignored (to tell the user).
    """
    fed = dict(config.get("trainer") or {})
    out: dict[str, Any] = {k: v for k, v in config.items() if k not in (*FEDERATED_ONLY, "trainer")}
    ignored = [k for k in FEDERATED_ONLY if config.get(k) is not None]
    trainer = {k: fed[k] for k in KEPT if k in fed}
    trainer["max_epochs"] = -1  # RoundClock sets the epochs the rounds' work needs
    if fed.get("logger", True) is not True:
        trainer["logger"] = fed["logger"]
    out["trainer"] = trainer
    out.update({k: fed[k] for k in TOP_LEVEL if fed.get(k) is not None})
    out["federated"] = {k: fed[k] for k in SCHEDULE if k in fed}
    out["federated"]["name"] = fed.get("name") or Path(source).stem
    ignored += [f"trainer.{k}" for k in fed if k not in (*KEPT, *TOP_LEVEL, *SCHEDULE, "logger", "name")]
    data = out.get("data")
    if isinstance(data, dict) and "class_path" in data:
        init = dict(data.get("init_args") or {})
        if "batch_size" not in init and "batch_size" in _init_arguments(data["class_path"]):
            init["batch_size"] = fed.get("batch_size", 16)
            out["data"] = {**data, "init_args": init}
    return out, ignored


def _init_arguments(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        return list(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
    except (ImportError, AttributeError, ValueError, TypeError):
        return []


def translate_args(args: list[str]) -> list[str]:
    """Replace every ``--config`` file that is a federated config by its baseline (as YAML text)."""
    out = list(args)
    for i, arg in enumerate(out):
        path = out[i + 1] if arg in ("-c", "--config") and i + 1 < len(out) else None
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if path is None or not Path(path).is_file():
            continue
        config = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(config, dict) or not is_federated(config):
            continue
        central, ignored = federated_to_central(config, path)
        print(f"lightfed central: {path} is a federated config; training its centralised baseline"
              + (f" (ignored: {', '.join(ignored)})" if ignored else ""), file=sys.stderr)
        text = yaml.safe_dump(central, sort_keys=False)
        if arg.startswith("--config="):
            out[i] = f"--config={text}"
        else:
            out[i + 1] = text
    return out


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
            "--federated", type=dict[str, Any] | None, default=None,
            help="The federated run this is the baseline of (its trainer's rounds, clients_per_round, sampler, "
                 "local_epochs, local_steps, batch_size, eval_every): train for as many examples as its clients "
                 "process and log central/test_* at its round steps. Filled in from a federated --config.",
        )
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

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The baseline of a federated config logs to TensorBoard as ``<default_root_dir>/<name>_central``."""
        federated = self._option("federated")
        trainer = self._option("trainer")
        if federated is not None and federated.get("name") and trainer.get("logger") in (None, True):
            from lightning.pytorch.loggers import TensorBoardLogger

            kwargs["logger"] = TensorBoardLogger(save_dir=trainer.get("default_root_dir") or ".", name=f"{federated['name']}_central")
        return super().instantiate_trainer(**kwargs)

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
        federated = self._option("federated")
        if federated is not None:
            self.trainer.callbacks.append(RoundClock(**dict(federated)))
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
        args = sys.argv[1:]
    args = translate_args(args)
    argv, sys.argv = sys.argv, sys.argv[:1]  # `args` already holds the command line; keep Lightning from warning
    try:
        CentralCLI(args=args, **cli_kwargs)
    finally:
        sys.argv = argv
