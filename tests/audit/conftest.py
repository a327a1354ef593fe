"""Fixtures of the audit tests: a federated task with enough clients and parameters for canaries, and two
deliberately broken privacy mechanisms (kept here, never shipped) that an audit must catch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from lightfed import FederatedTrainer, PoissonSampler
from lightfed.data.partition import IID
from lightfed.messages import ClientUpdate, RoundAggregate
from lightfed.models import MLPClassifier
from lightfed.privacy import DPFixedClipping
from lightfed.strategy import FedAvg
from tests.conftest import BoringFederatedData


class QuarterNoise(DPFixedClipping):
    """BROKEN on purpose: claims (and accounts for) noise multiplier ``z`` but adds ``z / 4``."""

    def process_aggregate(self, aggregate: RoundAggregate, round_idx: int) -> RoundAggregate:
        claimed = self.update_noise_multiplier
        self.update_noise_multiplier = claimed / 4
        try:
            return super().process_aggregate(aggregate, round_idx)
        finally:
            self.update_noise_multiplier = claimed


class ForgetsToClip(DPFixedClipping):
    """BROKEN on purpose: accounts for clip ``C`` but never clips (server side)."""

    def server_update(self, update: ClientUpdate, round_idx: int) -> ClientUpdate:
        return update


def dp(cls: type[DPFixedClipping] = DPFixedClipping, z: float = 1.0, clip: float = 0.5) -> DPFixedClipping:
    """Client-level DP with multiplier ``z``; a coarse PLD grid per round (fast, still an upper bound)."""
    return cls(clip_norm=clip, noise_multiplier=z, pld_discretization=1e-2, verbose=False)


def run(
    root: Path, callbacks: list[Any], privacy: DPFixedClipping | None = None, rounds: int = 20, rate: float = 0.1,
    num_clients: int = 200, ckpt_path: str | None = None, lr: float = 0.1, **kw: Any,
) -> FederatedTrainer:
    """200 clients of 10 Gaussian-blob examples, an MLP of 771 parameters, Poisson sampling, uniform FedAvg."""
    trainer = FederatedTrainer(
        rounds=rounds, sampler=PoissonSampler(rate), strategy=FedAvg(weighted=False), privacy=privacy,
        local_steps=1, batch_size=8, logger=False, enable_progress_bar=False, default_root_dir=str(root),
        fed_eval_fraction=0.0, eval_every=rounds, callbacks=callbacks, **{"checkpoint_every": 0, **kw},
    )
    L.seed_everything(0, verbose=False)
    model = MLPClassifier(in_features=8, hidden=[64], num_classes=3, lr=lr)
    data = BoringFederatedData(IID(num_clients=num_clients), n=10 * num_clients, val_fraction=0.0)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer
