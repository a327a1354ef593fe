"""Sample-level DP-SGD with Opacus inside the client loop."""

from __future__ import annotations

import dp_accounting as dpa
import lightning as L
import pytest
import torch
from dp_accounting import pld
from torch import nn

from lightfed import FederatedTrainer, FullParticipation, ParamSpec
from lightfed.client import LocalTrainer
from lightfed.data.client_data import ClientData
from lightfed.data.datasets import DigitsDataModule
from lightfed.data.partition import IID
from lightfed.messages import RunInfo
from lightfed.models import MLPClassifier
from lightfed.privacy import DPSGD
from lightfed.privacy.dpsgd import DPSGDLocalTrainer, _rate_grid, dpsgd_schedule
from lightfed.sampling import PoissonSampler
from lightfed.strategy import FedAvg, Strategy


def direct_eps(rate: float, z: float, steps: int, delta: float) -> float:
    acc = pld.PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(dpa.PoissonSampledDpEvent(rate, dpa.GaussianDpEvent(z)), steps)
    return acc.get_epsilon(delta)


def test_two_rounds_two_clients_revisited_end_to_end(tmp_path):
    """Both clients train in both rounds: re-wrapping the module must not hit "Trying to add hooks twice"."""
    L.seed_everything(0)
    mech = DPSGD(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-4, verbose=False)
    trainer = FederatedTrainer(
        rounds=2, sampler=FullParticipation(), privacy=mech, logger=False, enable_progress_bar=False,
        default_root_dir=str(tmp_path), fed_eval_fraction=0.0, batch_size=64, local_epochs=1, checkpoint_every=0,
    )
    dm = DigitsDataModule(IID(num_clients=2))
    history = trainer.fit(MLPClassifier(lr=0.5), dm)
    assert isinstance(trainer.local, DPSGDLocalTrainer)
    sizes = dm.client_num_examples().tolist()
    for cid, n in enumerate(sizes):
        rate, steps = dpsgd_schedule(n, 64, 1, None)
        assert mech.clients[cid] == [rate, 1.1, 2 * steps]  # both visits counted, nothing reset
        assert mech.client_epsilon(cid) == pytest.approx(direct_eps(rate, 1.1, 2 * steps, 1e-4), rel=1e-9)
    eps = [mech.client_epsilon(c) for c in (0, 1)]
    assert history[-1]["privacy/epsilon"] == pytest.approx(max(eps))
    assert history[-1]["privacy/epsilon_median"] == pytest.approx(sum(eps) / 2)
    assert history[0]["privacy/epsilon"] < history[1]["privacy/epsilon"]
    assert not any(hasattr(m, "autograd_grad_sample_hooks") for m in trainer.module.modules())
    assert history[-1]["central/test_acc"] > 0.3  # it learns despite the noise (10 classes: chance is 0.1)
    # the per-client accountants are in the checkpoint and come back
    state = torch.load(trainer.last_checkpoint, weights_only=True)["privacy"]
    again = DPSGD(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-4, verbose=False)
    again.load_state_dict(state)
    assert again.clients == mech.clients


def make_local(module: nn.Module, batch_size: int, mech: DPSGD) -> DPSGDLocalTrainer:
    spec = ParamSpec.from_module(module)
    return mech.wrap_local_trainer(LocalTrainer(module, spec, FedAvg(), None, 1, 1, batch_size, seed=0))


def test_per_example_clipping_bounds_the_step():
    """Full batch (p = 1), one SGD step with lr 1 and almost no noise: ||update|| <= C (mean of clipped grads)."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 64) * 5, torch.randint(0, 10, (32,))
    data = ClientData((x, y), torch.arange(32))
    mech = DPSGD(noise_multiplier=1e-6, max_grad_norm=1e-3, verbose=False)
    mech.setup(RunInfo(num_clients=1, sampler=FullParticipation(), rounds=1, strategy=FedAvg(), seed=0))
    model = MLPClassifier(lr=1.0)
    local = make_local(model, 32, mech)
    start = local.spec.flatten(local.tensors).clone()
    update = local.fit_client(0, 0, data, start)
    assert 0 < float(update.delta.norm()) <= 1e-3 * 1.001
    plain = LocalTrainer(model, local.spec, FedAvg(), None, 1, 1, 32, seed=0).fit_client(0, 0, data, start)
    assert float(plain.delta.norm()) > 100 * 1e-3  # without DP the step is far larger
    assert update.metrics["dp_steps"] == 1.0 and update.metrics["dp_sample_rate"] == 1.0


def test_noise_std_of_a_step_is_z_C_over_expected_batch():
    """Zero gradients: the step is pure noise, std lr * z * C / (p n) per coordinate."""
    torch.manual_seed(0)

    class Zero(MLPClassifier):
        def training_step(self, batch, batch_idx):
            return (self(batch[0]) * 0).sum()

    n, batch, z, c = 40, 10, 2.0, 0.5
    data = ClientData((torch.randn(n, 64), torch.zeros(n, dtype=torch.long)), torch.arange(n))
    mech = DPSGD(noise_multiplier=z, max_grad_norm=c, verbose=False)
    mech.setup(RunInfo(num_clients=1, sampler=FullParticipation(), rounds=1, strategy=FedAvg(), seed=0))
    local = make_local(Zero(lr=1.0, hidden=[256]), batch, mech)
    local.local_steps = 1
    start = local.spec.flatten(local.tensors).clone()
    update = local.fit_client(0, 0, data, start)
    assert float(update.delta.std()) == pytest.approx(z * c / (batch / n * n), rel=0.03)


def test_batchnorm_is_refused_with_a_fix():
    class BN(MLPClassifier):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Linear(16, 10))

    mech = DPSGD(noise_multiplier=1.0, verbose=False)
    with pytest.raises(ValueError, match=r"BatchNorm.*GroupNorm.*ModuleValidator\.fix"):
        make_local(BN(), 8, mech)


def test_strategies_that_change_local_gradients_are_refused():
    class Prox(Strategy):
        def client_loss(self, ctx, loss):
            return loss + 1.0

    with pytest.raises(ValueError, match="client_loss"):
        DPSGD(noise_multiplier=1.0, verbose=False).setup(
            RunInfo(num_clients=2, sampler=PoissonSampler(0.5), rounds=1, strategy=Prox(), seed=0)
        )


def test_target_epsilon_calibrates_each_client_for_all_rounds():
    mech = DPSGD(target_epsilon=4.0, delta=1e-4, verbose=False)
    mech.setup(RunInfo(num_clients=10, sampler=PoissonSampler(0.5), rounds=3, strategy=FedAvg(), seed=0))
    rate, steps = dpsgd_schedule(100, 20, 1, None)  # p = 0.2, 5 steps per visit
    z = mech.noise_multiplier_for(rate, steps)
    grid = _rate_grid(rate)  # calibrated for the rate rounded up to 10^(-13/20) = 0.2239
    assert grid == pytest.approx(10 ** (-13 / 20)) and grid >= rate
    assert direct_eps(grid, z, 3 * steps, 1e-4) <= 4.0 < direct_eps(grid, z - 0.02, 3 * steps, 1e-4)
    assert direct_eps(rate, z, 3 * steps, 1e-4) <= 4.0
    assert mech.noise_multiplier_for(0.21, steps) == z  # same grid cell: no second calibration
