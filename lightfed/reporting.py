"""The built-in callback that reports a run: TensorBoard, the progress bar and a summary.

The round history is the trainer's (``trainer.history``, appended after every round's callbacks).
"""

from __future__ import annotations

import inspect
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lightfed.callbacks import Callback
from lightfed.evaluation import higher_is_better
from lightfed.messages import RoundResult

if TYPE_CHECKING:
    from lightfed.trainer import FederatedTrainer

#: The metrics whose last value the summary keeps as ``final/<name>``.
_FINAL = ("central/", "federated/", "privacy/epsilon", "audit/epsilon", "round/bytes_", "secagg/bytes_")
_CONFIG_HEADER = "# lightfed: resolved config of this run (use it with --config)\n"


class Reporting(Callback):
    """TensorBoard scalars (step = round), config and privacy plan as text, hparams with the final
    metrics (the HParams tab compares runs), a progress bar that keeps the last evaluation, a summary."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.start = 0.0
        self.shown: dict[str, float] = {}

    def on_fit_start(self, trainer: FederatedTrainer) -> None:
        self.start = time.perf_counter()
        if not trainer.is_global_zero:
            return
        write_config(trainer)
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_text"):
            if trainer.config_yaml:
                experiment.add_text("config", _as_markdown(trainer.config_yaml), global_step=trainer.round_idx)
            plan = getattr(trainer.privacy, "plan", None)
            if callable(plan):
                experiment.add_text("privacy/plan", _as_markdown(plan()), global_step=trainer.round_idx)
            if trainer.round_idx == 0 and trainer.datamodule is not None:  # the partition beside the curves
                from lightfed.data.stats import log_partition

                log_partition(trainer.logger, trainer.datamodule)
        if trainer.enable_progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=trainer.rounds, initial=trainer.round_idx, desc="rounds", unit="round", dynamic_ncols=True)

    def on_round_end(self, trainer: FederatedTrainer, result: RoundResult) -> None:
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics(result.metrics, step=result.round_idx)
        if self.bar is not None:
            self.shown.update({k.split("/", 1)[-1]: v for k, v in result.metrics.items() if k.startswith("central/")})
            if "privacy/epsilon" in result.metrics:
                self.shown["epsilon"] = result.metrics["privacy/epsilon"]
            shown = {**dict(list(self.shown.items())[:3]), "loss": result.metrics.get("client/loss_mean", math.nan)}
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_fit_end(self, trainer: FederatedTrainer) -> None:
        self.close()
        if not trainer.is_global_zero:
            return
        final = summary_metrics(trainer.history)
        if trainer.logger is not None:
            log_summary(trainer.logger, _hparams(trainer), final, step=max(trainer.round_idx - 1, 0))
        if trainer.enable_progress_bar:
            print(format_summary(trainer, final, time.perf_counter() - self.start), flush=True)


def summary_metrics(history: list[dict[str, float]]) -> dict[str, float]:
    """Final and best central metrics, the last worst-10% client metric, epsilon, bytes per client (the
    payload's ``round/bytes_*``; under secure aggregation also ``secagg/bytes_*``, with the key material)."""
    out: dict[str, float] = {}
    for row in history:
        for k, v in row.items():
            if k.startswith(_FINAL):
                out[f"final/{k}"] = v
    for k in {k for row in history for k in row if k.startswith("central/")}:
        values = [row[k] for row in history if k in row and math.isfinite(row[k])]
        if values:
            out[f"best/{k}"] = (max if higher_is_better(k) else min)(values)  # min for loss and perplexity
    return out


def format_summary(
    trainer: FederatedTrainer, final: dict[str, float], seconds: float, run_dir: Path | None = None
) -> str:
    """A few lines that say how the run ended and where its files are (``run_dir``: ``trainer.log_dir``)."""
    lines = [f"lightfed: {len(trainer.history)} rounds in {seconds:.1f} s"]
    for k in sorted(k for k in final if k.startswith("final/central/")):
        name = k.split("/", 1)[1]
        best = final.get(f"best/{name}")
        lines.append(f"  {name}: final {final[k]:.4f}" + (f", best {best:.4f}" if best is not None else ""))
    for k in sorted(k for k in final if k.startswith("final/federated/") and k.endswith("worst10")):
        higher = final.get("final/federated/higher_is_better")  # which end of the clients is the worst
        which = "" if higher is None else ", lowest values" if higher == 1.0 else ", highest values"
        lines.append(f"  {k.split('/', 1)[1]} (worst-10% clients{which}): {final[k]:.4f}")
    if "final/privacy/epsilon" in final:
        lines.append(f"  privacy: epsilon {final['final/privacy/epsilon']:.4g} at delta {trainer.history[-1].get('privacy/delta', math.nan):.3g}")
    audit = {k.split("/", 2)[2]: v for k, v in final.items() if k.startswith("final/audit/epsilon")}
    if audit:
        lines.append("  audit (empirical epsilon): " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(audit.items())))
    up, down = final.get("final/round/bytes_up_per_client"), final.get("final/round/bytes_down_per_client")
    sec_up = final.get("final/secagg/bytes_up_per_client")
    sec_down = final.get("final/secagg/bytes_down_per_client")
    if up is not None and down is not None and sec_up is not None and sec_down is not None:
        # SecAgg's upload is the whole masked message; its download counts the protocol's messages only
        lines.append(
            f"  bytes per client per round: up {sec_up:,.0f} (payload {up:,.0f} + key material and shares), "
            f"down {down + sec_down:,.0f} (model {down:,.0f} + keys and shares {sec_down:,.0f})"
        )
    elif up is not None and down is not None:
        lines.append(f"  bytes per client per round: up {up:,.0f}, down {down:,.0f}")
    lines.append(f"  global model: {trainer.exported_model}")
    lines.append(f"  checkpoint:   {trainer.last_checkpoint}")
    lines.append(f"  logs:         {run_dir or trainer.log_dir}")
    return "\n".join(lines)


def log_summary(logger: Any, params: dict[str, Any], final: dict[str, float], step: int) -> None:
    """The hparams with the ``final/*`` and ``best/*`` metrics, the scalars at ``step`` (the last round's
    0-based index), so a resumed run's summary lands after its curves, not a second time at step 0."""
    try:
        accepts_step = "step" in inspect.signature(logger.log_hyperparams).parameters
    except (TypeError, ValueError):
        accepts_step = False
    if accepts_step:
        logger.log_hyperparams(params, final, step=step)
    else:  # a logger whose log_hyperparams takes no step: it places the metrics itself
        logger.log_hyperparams(params, final)


def write_config(trainer: FederatedTrainer) -> None:
    """Save the resolved config next to the logs (usable as ``--config``); never overwrite a user's file."""
    if not trainer.config_yaml:
        return
    trainer.log_dir.mkdir(parents=True, exist_ok=True)
    target = trainer.log_dir / "config.yaml"
    if target.exists() and not target.read_text().startswith(_CONFIG_HEADER):
        target = trainer.log_dir / "lightfed_config.yaml"
    target.write_text(_CONFIG_HEADER + trainer.config_yaml)


def _hparams(trainer: FederatedTrainer) -> dict[str, Any]:
    if not trainer.config_yaml:
        return {"rounds": trainer.rounds, "strategy": type(trainer.strategy).__name__}
    flat: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(obj, list):
            flat[prefix[:-1]] = str(obj)
        else:
            flat[prefix[:-1]] = obj if isinstance(obj, (int, float, str, bool)) else str(obj)

    walk(yaml.safe_load(trainer.config_yaml) or {}, "")
    return flat


def _as_markdown(text: str) -> str:
    return "    " + text.replace("\n", "\n    ")  # TensorBoard renders text as markdown: keep it verbatim


__all__ = ["Reporting", "format_summary", "log_summary", "summary_metrics", "write_config"]
