"""The Byzantine behaviours of plugins/attacks.py beside SignFlipAttack: hand-computed crafted updates
(Prepare / Execute / Assert), the same Byzantine clients for every attack, data poisoning end to end, and
clear errors for models an attack cannot handle."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lightfed import FedAvg, FederatedTrainer, FullParticipation, ParamSpec
from lightfed.data.partition import IID
from lightfed.models import MLPClassifier
from lightfed_zoo.attacks import (
    ALIEAttack,
    BackdoorAccuracy,
    BackdoorAttack,
    GaussianAttack,
    LabelFlipAttack,
    MinMaxAttack,
    SignFlipAttack,
)
from lightfed_zoo.strategies import Krum
from tests.conftest import BoringFederatedData
from tests.plugins.zoo_testing import update


def setup(strategy, num_clients: int = 10, dim: int = 2):
    strategy.setup(ParamSpec(("w",), (torch.Size([dim]),), (False,)), num_clients, torch.zeros(dim))
    return strategy


def test_every_attack_picks_the_same_byzantine_clients():
    chosen = {type(a).__name__: setup(a).byzantine for a in (
        SignFlipAttack(fraction=0.3, seed=4), GaussianAttack(fraction=0.3, seed=4), ALIEAttack(fraction=0.3, seed=4),
        MinMaxAttack(fraction=0.3, seed=4), LabelFlipAttack(fraction=0.3, seed=4), BackdoorAttack(fraction=0.3, seed=4),
    )}
    assert len(set(chosen.values())) == 1 and len(next(iter(chosen.values()))) == 3


def test_gaussian_byzantine_clients_send_seeded_noise():
    a = setup(GaussianAttack(fraction=0.2, std=2.0, seed=1), dim=1000)
    bad, good = min(a.byzantine), min(set(range(10)) - a.byzantine)
    ctx = type("Ctx", (), {"round_idx": 3})()
    noisy = a.on_client_end(ctx, update(bad, [1.0] * 1000)).delta
    assert noisy.std().item() == pytest.approx(2.0, rel=0.1) and abs(noisy.mean().item()) < 0.2
    torch.testing.assert_close(noisy, a.on_client_end(ctx, update(bad, [5.0] * 1000)).delta)  # seeded, not honest
    torch.testing.assert_close(a.on_client_end(ctx, update(good, [1.0] * 1000)).delta, torch.ones(1000))


def _round(attack, honest: list[list[float]]):
    """Updates of clients 0..n-1 where the attack's Byzantine clients come last with a placeholder delta."""
    byz = sorted(attack.byzantine)
    ids = [c for c in range(10) if c not in attack.byzantine][: len(honest)] + byz
    deltas = honest + [[100.0, 100.0]] * len(byz)
    return [update(c, d) for c, d in zip(ids, deltas)]


def test_alie_sends_mean_minus_z_std_with_the_papers_z():
    # Prepare: 3 honest updates, 2 Byzantine -> n = 5, f = 2, s = floor(5/2 + 1) - 2 = 1, z = Phi^-1(4/5)
    attack = setup(ALIEAttack(FedAvg(weighted=False), fraction=0.2, seed=0))
    updates = _round(attack, [[0.0, 0.0], [2.0, 2.0], [4.0, 4.0]])
    # Execute
    new = attack.aggregate_updates(torch.zeros(2), updates, [1.0] * 5, 0)
    # Assert: mean over 3 honest (2) and 2 crafted (2 - z * sqrt(8/3))
    z = 0.8416212335729143
    crafted = 2 - z * math.sqrt(8 / 3)
    torch.testing.assert_close(new, torch.full((2,), (6 + 2 * crafted) / 5))
    assert attack.needs_all_updates and not ALIEAttack(Krum(f=1)).client_hooks


def test_minmax_goes_as_far_as_the_honest_spread_allows():
    attack = setup(MinMaxAttack(fraction=0.2, perturbation="unit"))
    honest = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])]
    bad = attack.craft(honest, 0)
    stack = torch.stack(honest)
    bound = torch.cdist(stack, stack).max()
    assert torch.cdist(bad[None], stack).max() <= bound + 1e-6  # never an outlier ...
    assert torch.cdist(bad[None], stack).max() >= bound - 1e-4  # ... but at the edge
    mu = stack.mean(0)
    assert torch.dot(bad - mu, mu) < 0  # pushed against the honest mean


def test_colluding_attacks_under_krum_and_fedavg_keep_the_wrapped_aggregation():
    """With no Byzantine client in the round, the wrapper returns exactly what the strategy would."""
    for inner in (FedAvg(weighted=False), Krum(f=1)):
        attack = setup(ALIEAttack(inner, fraction=0.0))
        ups = [update(0, [1.0, 2.0]), update(1, [3.0, 4.0]), update(2, [5.0, 0.0]), update(3, [3.0, 2.0])]
        expected = (inner.aggregate_updates(torch.zeros(2), ups, [1.0] * 4, 0) if inner.needs_all_updates
                    else torch.tensor([3.0, 2.0]))
        torch.testing.assert_close(attack.aggregate_updates(torch.zeros(2), ups, [1.0] * 4, 0), expected)


def _fit(tmp_path, strategy, callbacks=(), rounds: int = 6):
    L.seed_everything(0, verbose=False)
    trainer = FederatedTrainer(
        rounds=rounds, sampler=FullParticipation(), strategy=strategy, local_steps=4, batch_size=8, logger=False,
        enable_progress_bar=False, default_root_dir=str(tmp_path), fed_eval_fraction=0.0, eval_every=rounds,
        checkpoint_every=0, callbacks=list(callbacks),
    )
    trainer.fit(MLPClassifier(in_features=8, hidden=[16], num_classes=3, lr=0.1), BoringFederatedData(IID(num_clients=10), n=400))
    return trainer


def test_backdoor_with_model_replacement_succeeds_under_fedavg(tmp_path):
    attack = BackdoorAttack(FedAvg(), fraction=0.2, target_label=0, trigger_size=2, trigger_value=12.0, boost=5.0)
    trainer = _fit(tmp_path / "fedavg", attack, [BackdoorAccuracy()])
    last = trainer.history[-1]
    assert last["attack/backdoor_acc"] > 0.9 and last["central/test_acc"] > 0.6
    honest = _fit(tmp_path / "honest", FedAvg(), [])
    assert honest.history[-1]["central/test_acc"] >= last["central/test_acc"]


def test_label_flipping_hurts_fedavg(tmp_path):
    flipped = _fit(tmp_path / "flip", LabelFlipAttack(FedAvg(), fraction=0.4, num_classes=3))
    honest = _fit(tmp_path / "honest", FedAvg())
    assert flipped.history[-1]["central/test_loss"] > honest.history[-1]["central/test_loss"]


def test_attacks_refuse_models_they_cannot_handle(tmp_path):
    with pytest.raises(TypeError, match="cannot attack this model"):
        LabelFlipAttack(num_classes=3).poison(torch.zeros(4, 3), torch.zeros(4))  # float targets: regression
    with pytest.raises(TypeError, match="floating inputs"):
        BackdoorAttack().apply_trigger(torch.zeros(4, 16, dtype=torch.long))  # token ids
    with pytest.raises(ValueError, match="BackdoorAccuracy measures a BackdoorAttack"):
        _fit(tmp_path, FedAvg(), [BackdoorAccuracy()], rounds=1)


@pytest.mark.parametrize(
    ("make", "match"),
    [(lambda: GaussianAttack(std=0), "std"), (lambda: MinMaxAttack(perturbation="x"), "perturbation"),
     (lambda: LabelFlipAttack(num_classes=1), "num_classes"), (lambda: BackdoorAttack(boost=0), "boost"),
     (lambda: ALIEAttack(fraction=1.0), "fraction")],
)
def test_bad_arguments_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()
