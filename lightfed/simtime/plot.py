"""Metrics against virtual time in TensorBoard: scalars with the virtual second as step, and one figure.

TensorBoard's x axis is an integer step. Every round's scalars are logged with the round as step (as
always, by :class:`~lightfed.reporting.Reporting`, ``time/virtual_seconds`` among them); this callback also
logs each evaluated ``central/*`` metric as ``time/<metric>`` with step ``int(virtual seconds)``, so the
"Scalars" tab shows accuracy against virtual time, and at the end draws ``time/curve`` (matplotlib): every
central metric against virtual hours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightfed.callbacks import Callback
from lightfed.messages import RoundResult

if TYPE_CHECKING:
    from lightfed.trainer import FederatedTrainer


class VirtualTimePlot(Callback):
    """Log ``central/*`` against ``time/virtual_seconds`` (added by every ``trainer.clock``)."""

    def __init__(self) -> None:
        self.points: list[tuple[float, dict[str, float]]] = []

    def on_round_end(self, trainer: FederatedTrainer, result: RoundResult) -> None:
        seconds = result.metrics.get("time/virtual_seconds")
        central = {k.split("/", 1)[1]: v for k, v in result.metrics.items() if k.startswith("central/")}
        if seconds is None or not central:
            return
        self.points.append((float(seconds), central))
        experiment = getattr(trainer.logger, "experiment", None)
        if trainer.is_global_zero and experiment is not None and hasattr(experiment, "add_scalar"):
            for name, value in central.items():
                experiment.add_scalar(f"time/{name}", value, global_step=int(seconds))

    def on_fit_end(self, trainer: FederatedTrainer) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if not self.points or not trainer.is_global_zero or not hasattr(experiment, "add_figure"):
            return
        experiment.add_figure("time/curve", self.figure(), global_step=trainer.round_idx)

    def state_dict(self) -> dict[str, Any]:
        """The points so far (a resumed run's figure starts at virtual time 0, not at the resume)."""
        return {"points": [[t, dict(m)] for t, m in self.points]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.points = [(float(t), {k: float(v) for k, v in m.items()}) for t, m in state.get("points", [])]

    def figure(self):  # noqa: ANN201 - a matplotlib Figure (matplotlib is imported only here)
        """Every central metric against virtual hours."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = sorted({k for _, m in self.points for k in m})
        fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.2), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            xs = [t / 3600 for t, m in self.points if name in m]
            ax.plot(xs, [m[name] for _, m in self.points if name in m], marker=".")
            ax.set_xlabel("virtual time (hours)")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        return fig


__all__ = ["VirtualTimePlot"]
