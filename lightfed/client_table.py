"""The built-in per-client table: ``clients.csv`` in the run's log dir and a ``client/loss`` histogram.

One row per client update the server saw in a round (:attr:`~lightfed.messages.RoundResult.clients`):
``round`` (0-based, the TensorBoard step), ``client``, ``examples``, ``steps``, ``accepted``, then the
client's training metrics (``loss`` first), then, on rounds with federated evaluation, each evaluated
client's validation metrics (``val_acc``, ...: on its training row, or on a row of its own, with
``examples``, ``steps`` and ``accepted`` empty, for a client evaluated but not trained that round). Under
secure aggregation or distributed noise the server learns only sums, so nothing is written.

Resume-safe without state of its own: at the start of a fit the table keeps only the rows of the rounds
before the checkpoint's (``round < trainer.round_idx``), so rounds played after the checkpoint by a run
that then died are not written twice; the resumed run appends from there.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightfed.callbacks import Callback
from lightfed.messages import ClientRecord, RoundResult

if TYPE_CHECKING:
    from lightfed.trainer import FederatedTrainer

FIXED = ["round", "client", "examples", "steps", "accepted"]


class ClientTable(Callback):
    """Per-client training metrics of every round: a CSV table and a TensorBoard histogram (rank 0 writes).

    Off with ``trainer.client_table: false``.
    """

    file_name = "clients.csv"

    def __init__(self) -> None:
        self.path: Path | None = None
        self.columns: list[str] = []

    def on_fit_start(self, trainer: FederatedTrainer) -> None:
        if not trainer.is_global_zero:
            return
        self.path = trainer.log_dir / self.file_name
        self.columns = []
        if self.path.exists():
            header, rows = _read(self.path)
            kept = [r for r in rows if _round_of(r) < trainer.round_idx]  # rounds the checkpoint holds
            self.columns = header if kept else []
            if len(kept) != len(rows):
                _write(self.path, self.columns, kept)

    def on_round_end(self, trainer: FederatedTrainer, result: RoundResult) -> None:
        if not trainer.is_global_zero or not result.clients or self.path is None:
            return
        rows = [_row(result.round_idx, c) for c in result.clients]
        by_client = {row["client"]: row for row in rows}
        for cid, metrics in sorted(result.client_eval.items()):
            row = by_client.get(cid)
            if row is None:  # evaluated, not trained this round
                row = by_client[cid] = {"round": result.round_idx, "client": cid}
                rows.append(row)
            row.update({k: repr(float(v)) for k, v in metrics.items()})
        trained = sorted({k for c in result.clients for k in c.metrics}, key=lambda k: (k != "loss", k))
        evaluated = sorted({k for m in result.client_eval.values() for k in m} - set(trained))
        names = trained + evaluated
        new = [k for k in names if k not in self.columns[len(FIXED):]]
        if not self.columns or new:  # the first round, or a metric that appears later: widen the table
            _, old = _read(self.path) if self.path.exists() else ([], [])
            self.columns = (self.columns or list(FIXED)) + new
            _write(self.path, self.columns, old + rows)
        else:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, self.columns, restval="").writerows(rows)
        losses = [c.metrics["loss"] for c in result.clients if math.isfinite(c.metrics.get("loss", math.nan))]
        experiment = getattr(trainer.logger, "experiment", None)
        if losses and experiment is not None and hasattr(experiment, "add_histogram"):
            import numpy as np

            experiment.add_histogram("client/loss", np.asarray(losses), global_step=result.round_idx)


def _row(round_idx: int, record: ClientRecord) -> dict[str, Any]:
    row: dict[str, Any] = {"round": round_idx, "client": record.client_id, "examples": record.num_examples,
                           "steps": record.num_steps, "accepted": int(record.accepted)}
    row.update({k: repr(float(v)) for k, v in record.metrics.items()})
    return row


def _round_of(row: dict[str, str]) -> int:
    try:
        return int(row["round"])
    except (KeyError, TypeError, ValueError):
        return sys.maxsize  # a damaged line: dropped with the rounds after the checkpoint


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _write(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """Rewrite the whole table atomically (a crash leaves the old table or the new one, never half)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, restval="", extrasaction="ignore")
        if columns:
            writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


__all__ = ["ClientTable"]
