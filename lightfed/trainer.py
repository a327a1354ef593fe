"""The federated round loop: sample, train the cohort, hand it to the server side, run the callbacks.

:class:`FederatedTrainer` plays the role ``lightning.Trainer`` plays for centralised training, and is
what ``lightfed fit`` builds from the ``trainer:`` section of a config. A round is:

1. sample a cohort (the strategy may override the sampler), deterministically from (seed, round);
2. ``on_round_start`` callbacks;
3. each process's shard of the cohort trains (the executor; no Trainer per client) while the server takes
   the updates: :meth:`lightfed.server.RoundServer.run` collects, all-reduces (:mod:`lightfed.distributed`),
   releases, steps the strategy and accounts for privacy, in one call;
4. ``on_round_end`` callbacks: evaluation (:mod:`lightfed.evaluation`), the user's ``trainer.callbacks``,
   reporting (:mod:`lightfed.reporting`); then checkpoints (:mod:`lightfed.resume`).
"""

from __future__ import annotations

import itertools
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import Tensor, nn

from lightfed import checkpoint as ckpt_io
from lightfed import resume
from lightfed.aggregation import ShardResult
from lightfed.callbacks import Callback
from lightfed.checks import require
from lightfed.client import LocalTrainer
from lightfed.client_table import ClientTable
from lightfed.data.datamodule import FederatedDataModule, check_model_classes
from lightfed.distributed import merge_round, shard_cohort
from lightfed.evaluation import Evaluation, evaluate_central
from lightfed.executors.base import Executor, resolve_executor
from lightfed.messages import RoundResult, RunInfo
from lightfed.noise_hint import NoiseHint
from lightfed.params import ParamSpec
from lightfed.privacy.base import PrivacyMechanism
from lightfed.reporting import Reporting, format_summary, summary_metrics
from lightfed.sampling import ClientSampler, UniformSampler
from lightfed.secagg.base import SecureAggregation
from lightfed.server import Reduce, RoundServer, check_processes
from lightfed.simtime.engine import RoundClock
from lightfed.strategy import Strategy, resolve_strategy

log = logging.getLogger("lightfed")


class FederatedTrainer:
    """Runs federated rounds of a LightningModule over a :class:`FederatedDataModule`.

    Args:
        rounds: Number of federated rounds (total, including rounds done before a resume).
        clients_per_round: Cohort size (``int``) or fraction (``float``) for the default uniform sampler.
        sampler: A :class:`ClientSampler` (``PoissonSampler`` for DP); overrides ``clients_per_round``.
        strategy: Aggregation strategy (instance, or registered name such as ``"FedProx"``).
        privacy: A :class:`PrivacyMechanism` (client-level DP, DP-SGD), or ``None``.
        secure_aggregation: A :class:`SecureAggregation` protocol, or ``None``.
        local_epochs: Local epochs per client visit.
        local_steps: If set, exactly this many local optimizer steps per visit (overrides epochs).
        batch_size: Local batch size.
        gradient_clip_val: Clip the gradients before every local optimizer step at this value (``None``/0: off).
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        accumulate_grad_batches: Accumulate gradients over this many batches per optimizer step. These three
            are ``lightning.Trainer``'s flags with its meaning; see docs/lightning_contract.md.
        trainable: ``fnmatch`` patterns of the parameters to train and send; others are frozen.
        aggregate_buffers: Send floating buffers (BatchNorm statistics) with the parameters.
        init_checkpoint: Start the global model from this ``.ckpt`` / state dict / ``.safetensors``.
        init_ignore: Key patterns of ``init_checkpoint`` to skip (a new head).
        eval_every: Evaluate every this many rounds (and after the last).
        eval_batch_size: Batch size of evaluation.
        fed_eval_fraction: Fraction of clients whose own validation split is evaluated (0 disables).
        fed_eval_metric: Logged metric (or its suffix, e.g. ``acc`` matches ``val_acc``) used for the
            federated evaluation mean and worst-10% figure.
        fed_eval_higher_is_better: Whether larger values of ``fed_eval_metric`` are better, which decides the
            worst 10% (the lowest or the highest values); ``None``: lower is better for names holding
            ``loss``, ``ppl`` or ``perplexity``, higher otherwise (``lightfed.evaluation.higher_is_better``).
        checkpoint_every: Save a checkpoint every this many rounds (and after the last); 0: only last.
        keep_checkpoints: Keep only the newest this many ``round-*.ckpt`` files (default 3; ``None``: all).
            ``last.ckpt`` is a link to the newest, not a copy.
        default_root_dir: Where logs, checkpoints and the exported model go.
        logger: ``True`` for TensorBoard under ``default_root_dir/<name>/version_N``, ``False`` for none
            (files go to ``default_root_dir``, which one run at a time may use), or any Lightning logger.
        name: The run's name: TensorBoard's folder under ``default_root_dir`` (``lightfed fit --config
            X.yaml`` names it after the config file).
        enable_progress_bar: A progress bar over rounds.
        accelerator: Lightning accelerator (``cpu``, ``gpu``, ``auto``).
        devices: Lightning devices.
        precision: Lightning precision (``32-true``, ``bf16-mixed``, ``16-mixed``, ...).
        num_nodes: Number of nodes for multi-process runs.
        fabric_strategy: Lightning Fabric strategy for multi-process runs (``auto``, ``ddp``).
        executor: How a process trains its clients (``sequential`` or an :class:`Executor`).
        seed: Seed of every random choice of the run (sampling, batch order, dropout, noise).
        stop_on_failed_round: Stop with an error (after a checkpoint) as soon as a round releases no update.
        max_failed_rounds: Stop with an error (after a checkpoint) after this many consecutive rounds that
            released no client update (every update NaN/Inf, or secure aggregation failed closed). A run in
            which every round failed always ends with an error, never with an exported model.
        callbacks: :class:`~lightfed.callbacks.Callback` objects run around the loop (audits, early stopping).
        clock: A virtual clock that decides who trains when (``lightfed.simtime.SyncRounds``: deadlines and
            stragglers; ``lightfed.simtime.BufferedAsync``: FedBuff / FedAsync); each round is then one of its
            server calls (a round or a buffer flush). ``None``: untimed rounds. See docs/time.md.
        client_table: Write each round's per-client training metrics to ``clients.csv`` in the log dir and
            a ``client/loss`` histogram (:class:`~lightfed.client_table.ClientTable`; nothing under secure
            aggregation or distributed noise, where the server learns only sums).
        num_threads: ``torch.set_num_threads`` for the run. Small clients run fastest on one thread per
            process (measured: a tiny client visit took 58 ms with the default threads on a busy 2-core
            machine, 2.8 ms with one); ``None`` leaves torch's default.
    """

    def __init__(
        self,
        rounds: int = 10,
        clients_per_round: int | float = 10,
        sampler: ClientSampler | None = None,
        strategy: Strategy | str | None = None,
        privacy: PrivacyMechanism | None = None,
        secure_aggregation: SecureAggregation | None = None,
        local_epochs: int = 1,
        local_steps: int | None = None,
        batch_size: int = 16,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        accumulate_grad_batches: int = 1,
        trainable: list[str] | None = None,
        aggregate_buffers: bool = True,
        init_checkpoint: str | None = None,
        init_ignore: list[str] | None = None,
        eval_every: int = 1,
        eval_batch_size: int = 512,
        fed_eval_fraction: float = 0.2,
        fed_eval_metric: str = "acc",
        fed_eval_higher_is_better: bool | None = None,
        checkpoint_every: int = 5,
        keep_checkpoints: int | None = 3,
        default_root_dir: str = ".",
        logger: Logger | bool = True,
        name: str | None = None,
        enable_progress_bar: bool = True,
        accelerator: str = "auto",
        devices: int | str | list[int] = 1,
        precision: str | int = "32-true",
        num_nodes: int = 1,
        fabric_strategy: str = "auto",
        executor: Executor | str = "sequential",
        seed: int = 0,
        stop_on_failed_round: bool = False,
        max_failed_rounds: int = 5,
        num_threads: int | None = None,
        callbacks: list[Callback] | None = None,
        clock: RoundClock | None = None,
        client_table: bool = True,
    ) -> None:
        require(rounds >= 1, f"trainer.rounds must be >= 1, got {rounds}.")
        require(local_epochs >= 1, f"trainer.local_epochs must be >= 1, got {local_epochs}.")
        require(local_steps is None or local_steps >= 1, f"trainer.local_steps must be >= 1 or null, got {local_steps}.")
        require(batch_size >= 1, f"trainer.batch_size must be >= 1, got {batch_size}.")
        require(gradient_clip_val is None or gradient_clip_val >= 0, f"trainer.gradient_clip_val must be >= 0 or null, got {gradient_clip_val}.")
        require(gradient_clip_algorithm in ("norm", "value"), f"trainer.gradient_clip_algorithm must be 'norm' or 'value', got {gradient_clip_algorithm!r}.")
        require(accumulate_grad_batches >= 1, f"trainer.accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}.")
        self.loop_flags = {"gradient_clip_val": gradient_clip_val, "gradient_clip_algorithm": gradient_clip_algorithm,
                           "accumulate_grad_batches": accumulate_grad_batches}
        require(eval_every >= 1, f"trainer.eval_every must be >= 1, got {eval_every}.")
        require(checkpoint_every >= 0, f"trainer.checkpoint_every must be >= 0, got {checkpoint_every}.")
        require(0 <= fed_eval_fraction <= 1, f"trainer.fed_eval_fraction must be in [0, 1], got {fed_eval_fraction}.")
        require(fed_eval_higher_is_better is None or isinstance(fed_eval_higher_is_better, bool),
                f"trainer.fed_eval_higher_is_better must be null, true or false, got {fed_eval_higher_is_better!r}.")
        self.rounds = rounds
        self.sampler = sampler if sampler is not None else UniformSampler(clients_per_round)
        self.strategy = resolve_strategy(strategy)
        self.privacy = privacy
        self.secure_aggregation = secure_aggregation
        self.local_epochs = local_epochs
        self.local_steps = local_steps
        self.batch_size = batch_size
        self.trainable = trainable
        self.aggregate_buffers = aggregate_buffers
        self.init_checkpoint = init_checkpoint
        self.init_ignore = list(init_ignore or [])
        self.eval_every = eval_every
        self.eval_batch_size = eval_batch_size
        self.fed_eval_fraction = fed_eval_fraction
        self.fed_eval_metric = fed_eval_metric
        self.fed_eval_higher_is_better = fed_eval_higher_is_better
        self.checkpoint_every = checkpoint_every
        require(keep_checkpoints is None or keep_checkpoints >= 1, f"trainer.keep_checkpoints must be >= 1 or null, got {keep_checkpoints}.")
        self.keep_checkpoints = keep_checkpoints
        self.default_root_dir = default_root_dir
        self.enable_progress_bar = enable_progress_bar
        self.seed = seed
        self.stop_on_failed_round = stop_on_failed_round
        require(max_failed_rounds >= 1, f"trainer.max_failed_rounds must be >= 1, got {max_failed_rounds}.")
        self.max_failed_rounds = max_failed_rounds
        require(num_threads is None or num_threads >= 1, f"trainer.num_threads must be >= 1 or null, got {num_threads}.")
        self.num_threads = num_threads
        self.callbacks: list[Callback] = list(callbacks or [])
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"trainer.callbacks must hold lightfed Callbacks, got {type(cb).__name__}.")
        self.executor = resolve_executor(executor)
        self.clock = clock
        self.fabric = Fabric(
            accelerator=accelerator, devices=devices, precision=precision, num_nodes=num_nodes,
            strategy=fabric_strategy,
        )
        if logger is True:
            logger = TensorBoardLogger(save_dir=default_root_dir, name=name or "lightning_logs")
        self.logger: Logger | None = logger or None
        #: The resolved config of a CLI run; saved in checkpoints and next to the logs.
        self.config_yaml: str | None = None
        self.history: list[dict[str, float]] = []
        self.round_idx = 0
        self.global_params: Tensor | None = None
        self.server: RoundServer | None = None
        self.spec: ParamSpec | None = None
        self.module: nn.Module | None = None
        self.datamodule: FederatedDataModule | None = None
        self.last_checkpoint: Path | None = None
        self.exported_model: Path | None = None
        self.exported_peft: dict[str, Path] | None = None
        #: SHA-256 of the frozen parameters (resume.frozen_fingerprint hashes them once, at the first use).
        self.frozen_fingerprint: str | None = None
        #: The built-in callbacks: evaluation (replace it with a subclass to change what a round evaluates)
        #: and reporting (TensorBoard, progress bar, summary).
        self.evaluation: Evaluation = Evaluation()
        self.reporting = Reporting()
        self.client_table: ClientTable | None = ClientTable() if client_table else None
        #: Before a DP run's first round: one line on how loud the noise is against the mean update.
        self.noise_hint = NoiseHint()
        self._lock: Path | None = None

    def add_callbacks(self, callbacks: list[Callback]) -> None:
        """Append callbacks (the config's ``audit:`` section) after ``trainer.callbacks``, before reporting."""
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"expected lightfed Callbacks (audits), got {type(cb).__name__}.")
        self.callbacks += list(callbacks)

    @property
    def all_callbacks(self) -> list[Callback]:
        """Every callback in the order hooks run: noise hint, evaluation, the user's, client table, reporting."""
        table = [self.client_table] if self.client_table is not None else []
        return [self.noise_hint, self.evaluation, *self.callbacks, *table, self.reporting]

    # ------------------------------------------------------------------ set-up
    @property
    def log_dir(self) -> Path:
        if self.logger is not None and getattr(self.logger, "log_dir", None):
            return Path(self.logger.log_dir)
        return Path(self.default_root_dir)

    @property
    def is_global_zero(self) -> bool:
        return self.fabric.is_global_zero

    def _setup(self, model: nn.Module, datamodule: FederatedDataModule) -> None:
        check_processes(self.secure_aggregation, self.fabric.world_size)  # refused before any process starts
        self.fabric.launch()
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        if not isinstance(datamodule, FederatedDataModule):
            raise TypeError(f"data must be a lightfed FederatedDataModule, got {type(datamodule).__name__}.")
        datamodule.setup("fit")
        check_model_classes(model, datamodule)
        num_clients = datamodule.num_clients
        self.sampler.validate(num_clients)
        self._client_sizes = datamodule.client_num_examples()
        if self.init_checkpoint:
            state = ckpt_io.load_state_dict_file(self.init_checkpoint)
            ckpt_io.load_into(model, state, self.init_ignore, source=f"init_checkpoint {self.init_checkpoint!r}")
        self.spec = ParamSpec.from_module(model, self.trainable, self.aggregate_buffers)
        device = self.fabric.device
        model = self.fabric.strategy.precision.convert_module(model).to(device)
        datamodule.to(device)
        self.module, self.datamodule = model, datamodule
        self.global_params = self.spec.flatten(self.spec.tensors(model)).to(device)
        self.num_clients = num_clients
        self.server = RoundServer(self.strategy, self.privacy, self.secure_aggregation, self.spec.numel)
        sizes = self._client_sizes.tolist()
        info = RunInfo(num_clients=len(sizes), sampler=self.sampler, rounds=self.rounds,
                       strategy=self.strategy,
                       seed=self.seed, client_num_examples=sizes)
        self.server.setup(self.spec, self.global_params, info)
        self.local = LocalTrainer(
            model, self.spec, self.strategy, self.fabric.strategy.precision, self.local_epochs,
            self.local_steps, self.batch_size, self.seed, **self.loop_flags,
        )
        if self.privacy is not None:
            self.local = self.privacy.wrap_local_trainer(self.local)
        self.executor.setup(self.local)
        for cb in self.all_callbacks:
            cb.setup(self)
        if self.clock is not None:
            self.clock.setup(self)

    # ------------------------------------------------------------------ public entry points
    def fit(self, model: nn.Module, datamodule: FederatedDataModule, ckpt_path: str | None = None) -> list[dict[str, float]]:
        """Run the federated rounds; resume from ``ckpt_path`` if given.

        Returns:
            The per-round metrics (also written to the logger).

        Raises:
            RunFailedError: the rounds released no client update (see ``max_failed_rounds``).
        """
        self._setup(model, datamodule)
        if ckpt_path:
            resume.restore(self, ckpt_path)
        self._claim_log_dir(resumed=bool(ckpt_path))
        if ckpt_path and self.round_idx == self.rounds:
            return self._complete_finished_run(Path(ckpt_path))
        if self.round_idx > self.rounds:
            self._release_log_dir()
            raise ValueError(
                f"the checkpoint is at round {self.round_idx} but trainer.rounds={self.rounds}: nothing to train. "
                f"Raise trainer.rounds above {self.round_idx} to continue, or use `lightfed test` to evaluate it."
            )
        for cb in self.all_callbacks:
            cb.on_fit_start(self)
        failed, streak, result = 0, 0, None
        while self.round_idx < self.rounds:
            r = self.round_idx
            if not self.server.can_run_round(r):
                log.warning("round %d would exceed the privacy budget: stopping before it.", r)
                break
            result = self.run_round(r)
            self.round_idx = r + 1
            for cb in self.all_callbacks:
                cb.on_round_end(self, result)
            self.history.append({"round": float(result.round_idx), **result.metrics})
            if self.checkpoint_every and self.round_idx % self.checkpoint_every == 0 and self.round_idx != self.rounds:
                self.save_checkpoint()
            round_failed = result.skipped or (result.num_updates == 0 and bool(result.rejected))
            streak, failed = (streak + 1, failed + 1) if round_failed else (0, failed)
            if round_failed and (self.stop_on_failed_round or streak >= self.max_failed_rounds):
                why = "stop_on_failed_round is set" if self.stop_on_failed_round else f"max_failed_rounds={self.max_failed_rounds}"
                self._fail(f"{streak} consecutive round(s) ending with round {r} released no client update "
                           f"({_why_failed(result)}); trainer.{why}")
        if result is not None and failed == len(self.history):
            self._fail(f"every round ({failed}) released no client update ({_why_failed(result)})")
        self.save_checkpoint()
        self._write_outputs(self.log_dir)
        for cb in self.all_callbacks:
            cb.on_fit_end(self)
        if self.logger is not None:
            self.logger.finalize("success")
        self._release_log_dir()
        return self.history

    def _write_outputs(self, run_dir: Path) -> None:
        """The run's exports: ``global_model.safetensors`` and, for a LoRA model, ``peft/`` (adapter, merged).

        Both are functions of the global model alone, so writing them again (a resumed finished run) gives the
        same files and repairs a missing or truncated one.
        """
        self.exported_model = self.export(run_dir / "global_model.safetensors")
        self.exported_peft = self._export_adapters(run_dir / "peft")

    def _complete_finished_run(self, ckpt_path: Path) -> list[dict[str, float]]:
        """Resume a run whose checkpoint is at ``trainer.rounds``: train nothing, write its exports again next
        to the checkpoint's run (an export killed by a signal or a full disk is then complete) and print the
        summary."""
        try:
            _check_history_released(self.history, self.max_failed_rounds, self.stop_on_failed_round)
            where = ckpt_path.resolve().parent
            run_dir = where.parent if where.name == "checkpoints" else self.log_dir
            self.last_checkpoint = ckpt_path
            self._write_outputs(run_dir)
        finally:
            self._release_log_dir()
        log.warning("the checkpoint is at trainer.rounds=%d: nothing to train; the run's exports are in %s.",
                    self.rounds, run_dir)
        if self.is_global_zero and self.enable_progress_bar:
            print(format_summary(self, summary_metrics(self.history), 0.0, run_dir), flush=True)
        return self.history

    def _fail(self, why: str) -> None:
        """Stop the run with a checkpoint of where it is and an error (non-zero exit): never a silent result."""
        self.reporting.close()
        path = self.save_checkpoint()
        self._release_log_dir()
        raise RunFailedError(
            f"{why}. The global model was not exported; the checkpoint {path} holds the run so far. Check the "
            f"client training (a NaN loss, NaN data, a learning rate too high) or secure aggregation's dropouts."
        )

    def test(self, model: nn.Module, datamodule: FederatedDataModule, ckpt_path: str | None = None) -> dict[str, float]:
        """Evaluate the global model (from ``ckpt_path`` if given) on the central test set."""
        self._setup(model, datamodule)
        if ckpt_path:
            resume.restore(self, ckpt_path)
        metrics = evaluate_central(self)
        for k, v in metrics.items():
            print(f"{k}: {v:.4f}")
        return metrics

    # ------------------------------------------------------------------ one round
    def sample(self, round_idx: int) -> list[int]:
        cohort = self.strategy.sample_clients(round_idx, self.num_clients, self.seed)
        return cohort if cohort is not None else self.sampler.sample(round_idx, self.num_clients, self.seed)

    def run_round(self, round_idx: int) -> RoundResult:
        """Sample, announce, train this process's shard of the cohort and hand it to the server (one call)."""
        if self.clock is not None:  # a timed run: the clock decides who trains when (lightfed.simtime)
            return self.clock.run_round(self, round_idx)
        cohort = self.sample(round_idx)
        for cb in self.all_callbacks:
            cb.on_round_start(self, round_idx, cohort)
        rank, world_size = self.fabric.global_rank, self.fabric.world_size
        reduce = self._all_reduce if world_size > 1 else None
        return self.play_round(round_idx, cohort, rank, world_size, reduce)

    def play_round(
        self, round_idx: int, cohort: list[int], rank: int, world_size: int, reduce: Reduce | None
    ) -> RoundResult:
        """Rank ``rank`` of ``world_size``: its clients train (the executor) while the server sums them."""
        assert self.global_params is not None and self.datamodule is not None
        mine = shard_cohort(cohort, self._client_sizes, world_size, rank)
        updates = self.executor.run(round_idx, mine, self.datamodule.client_train, self.global_params,
                                    self.server.payload(round_idx), self.server.client_state)
        extra = itertools.chain(*(cb.extra_updates(self, round_idx, cohort) for cb in self.callbacks)) if rank == 0 else ()
        outcome = self.server.run(round_idx, cohort, updates, self.global_params, extra=extra, reduce=reduce)
        self.global_params = outcome.global_params
        return outcome.result

    def _all_reduce(self, shard: ShardResult) -> ShardResult:
        assert self.spec is not None and self.global_params is not None
        return merge_round(shard, self.spec.numel, self.global_params.device)

    @property
    def client_states(self) -> dict[int, dict[str, Tensor]]:
        """Each client's persistent state (stateful strategies); the server keeps it."""
        return self.server.client_states if self.server is not None else {}

    @client_states.setter
    def client_states(self, states: dict[int, dict[str, Tensor]]) -> None:
        assert self.server is not None, "the trainer is not set up"
        self.server.client_states = states

    # ------------------------------------------------------------------ checkpoints and files
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly where it stopped (see :mod:`lightfed.resume`)."""
        return resume.collect(self)

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Write a checkpoint atomically; ``last.ckpt`` links to the newest; prune to ``keep_checkpoints``."""
        target = Path(path) if path is not None else self.log_dir / "checkpoints" / f"round-{self.round_idx:05d}.ckpt"
        if self.is_global_zero:
            ckpt_io.write_checkpoint(self.state_dict(), target, rotate=path is None, keep=self.keep_checkpoints)
        self.last_checkpoint = target
        return target

    def _claim_log_dir(self, resumed: bool) -> None:
        """Without a versioned logger, one run at a time owns ``default_root_dir``: never overwrite another's files."""
        if self.logger is None and self.is_global_zero:
            self._lock = ckpt_io.claim_directory(self.log_dir, resumed)

    def _release_log_dir(self) -> None:
        if self._lock is not None:
            self._lock.unlink(missing_ok=True)
            self._lock = None

    def _export_adapters(self, directory: Path) -> dict[str, Path] | None:
        """A LoRA run also writes ``directory/adapter`` (peft's format) and ``directory/merged`` (plain)."""
        if not self.is_global_zero or self.module is None or "lightfed.models.hf" not in sys.modules:
            return None
        from lightfed.models.hf import export_peft, has_lora

        if not has_lora(self.module):
            return None
        return export_peft(self.module, directory, self.global_params, self.spec)

    def export(self, path: str | Path) -> Path:
        """Write the global model as a plain state dict (``.safetensors``, or torch for other suffixes)."""
        assert self.module is not None and self.global_params is not None
        self.local.spec.assign(self.local.tensors, self.global_params)
        if not self.is_global_zero:
            return Path(path)
        return ckpt_io.export_state_dict(self.module, path)


# ---------------------------------------------------------------------- helpers
class RunFailedError(RuntimeError):
    """The run could not produce a trained model (its rounds released no client update)."""


def _check_history_released(history: list[dict[str, float]], max_failed: int, stop_on_failed: bool) -> None:
    """Refuse to export a run whose last rounds released no update (it stopped with an error).

    Raises:
        RunFailedError: every round, or the final streak that stopped the run, released nothing.
    """
    streak = 0
    for row in reversed(history):
        if row.get("round/updates", 1.0) > 0:
            break
        streak += 1
    if history and (streak == len(history) or streak >= max_failed or (stop_on_failed and streak > 0)):
        raise RunFailedError(
            f"the checkpoint's last {streak} round(s) released no client update: the run failed and its "
            f"model is not exported. Start the run again (check the client training or secure "
            f"aggregation's dropouts)."
        )


def _why_failed(result: RoundResult) -> str:
    if result.rejected and result.num_updates == 0:
        return f"all {len(result.rejected)} updates of round {result.round_idx} had NaN/Inf"
    return f"round {result.round_idx} produced no aggregate (no update arrived, or secure aggregation failed closed)"
