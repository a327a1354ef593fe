"""The LoRA strategies' server Adam (``server_optimizer: adam``): FedAdam on each variant's aggregate update.

Same tiny LoRA MLP and client loop as ``test_lora_strategies.py``; the reference is the zoo's ``FedAdam`` on the
same updates, or Adam's first step written out by hand.
"""

from __future__ import annotations

import pytest
import torch

from lightfed import FederatedTrainer, PoissonSampler
from lightfed.models.lora import LoRALayout
from lightfed.registry import STRATEGIES
from lightfed.server import run_server_round
from lightfed_zoo.strategies.lora import FedITLoRA
from tests.conftest import BoringFederatedData
from tests.plugins.test_lora_strategies import TRAINABLE, A, clients, lora_mlp, set_up
from tests.plugins.zoo_testing import train_clients

ADAM = {"server_optimizer": "adam", "server_lr": 0.01, "beta1": 0.8, "beta2": 0.95, "tau": 1e-3}


@pytest.mark.parametrize("name", ["FedITLoRA", "FFALoRA"])
def test_server_adam_is_fedadam_on_the_mean_update(name):
    # Prepare: the LoRA strategy with server Adam and the zoo's FedAdam with the same hyper-parameters
    module = lora_mlp(name)
    lora, spec, w = set_up(name, module, **ADAM)
    fedadam = STRATEGIES.create("FedAdam", eta=0.01, beta1=0.8, beta2=0.95, tau=1e-3)
    fedadam.setup(spec, 20, w)
    updates = train_clients(lora, module, spec, w, clients(4), {}, 0, local_steps=2)
    # Execute: two rounds of the same updates (the moments carry over)
    outs = [(run_server_round(lora, w, updates, round_idx=t).global_params,
             run_server_round(fedadam, w, updates, round_idx=t).global_params) for t in (0, 1)]
    # Assert
    for new, expected in outs:
        torch.testing.assert_close(new, expected)  # the same rule up to float rounding
    assert not torch.equal(outs[0][0], outs[1][0])


def test_fedsa_lora_server_adam_never_moves_the_global_b():
    module = lora_mlp("FedSALoRA")
    strategy, spec, w = set_up("FedSALoRA", module, **ADAM)
    updates = train_clients(strategy, module, spec, w, clients(3), {}, 0, local_steps=3)
    new = run_server_round(strategy, w, updates).global_params
    b = LoRALayout.from_spec(spec).mask("b")
    assert torch.equal(new[b], w[b]) and not torch.equal(new[~b], w[~b])


def test_flora_server_adam_steps_the_exact_merged_update():
    # Prepare: the same updates through FLoRA with SGD (server_lr 1: the merged update itself) and with Adam
    module = lora_mlp("FLoRA")
    sgd, spec, w = set_up("FLoRA", module)
    adam, _, _ = set_up("FLoRA", module, **ADAM)
    updates = train_clients(sgd, module, spec, w, clients(3), {}, 0, local_steps=3)
    # Execute
    restarted = run_server_round(sgd, w, updates).global_params
    merged = restarted - w
    new = run_server_round(adam, w, updates).global_params
    # Assert: Adam's first step on the merged W (and the head's mean); the adapters restart exactly as with SGD
    (layer,) = LoRALayout.from_spec(spec).layers
    keep = torch.ones_like(w, dtype=torch.bool)
    keep[layer.a], keep[layer.b] = False, False
    m, v = 0.2 * merged, 0.95 * 1e-6 + 0.05 * merged * merged
    torch.testing.assert_close(new[keep], (w + 0.01 * m / (v.sqrt() + 1e-3))[keep])
    assert torch.equal(new[~keep], restarted[~keep])
    assert float(merged[layer.base].abs().max()) > 0


def test_server_adam_state_round_trips_and_a_mismatched_checkpoint_is_refused():
    module = lora_mlp("FedITLoRA")
    strategy, spec, w = set_up("FedITLoRA", module, **ADAM)
    run_server_round(strategy, w, train_clients(strategy, module, spec, w, clients(2), {}, 0, local_steps=1))
    state = strategy.state_dict()
    fresh, _, _ = set_up("FedITLoRA", module, **ADAM)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.m, state["m"]) and torch.equal(fresh.v, state["v"]) and float(state["m"].abs().max()) > 0
    assert set_up("FedITLoRA", module)[0].state_dict() == {}  # SGD keeps no server state
    with pytest.raises(ValueError, match=r"FedITLoRA \(server_optimizer: adam\) state has no 'm'"):
        fresh.load_state_dict({})


def test_bad_server_optimizer_arguments_are_refused():
    with pytest.raises(ValueError, match="server_optimizer must be 'sgd' or 'adam', got 'rmsprop'"):
        FedITLoRA(server_optimizer="rmsprop")
    with pytest.raises(ValueError, match="tau .* must be > 0, got 0"):
        FedITLoRA(server_optimizer="adam", tau=0)
    with pytest.raises(ValueError, match=r"beta2 must be in \[0.0, 1.0\), got 1.0"):
        FedITLoRA(server_optimizer="adam", beta2=1.0)


@pytest.mark.parametrize("name", ["FFALoRA", "FedSALoRA"])
def test_server_adam_composes_with_client_level_dp(name, tmp_path):
    from lightfed.privacy import DPFixedClipping

    module = lora_mlp(name)
    a_before = module.get_parameter(A).detach().clone()
    trainer = FederatedTrainer(
        rounds=2, sampler=PoissonSampler(0.5), strategy=STRATEGIES.create(name, weighted=False, **ADAM),
        trainable=TRAINABLE.get(name), local_steps=2, batch_size=8, fed_eval_fraction=0, checkpoint_every=0,
        privacy=DPFixedClipping(clip_norm=0.5, noise_multiplier=0.5, clipping="client", verbose=False),
        logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
    )
    history = trainer.fit(module, BoringFederatedData())
    assert history[-1]["privacy/epsilon"] > 0 and float(trainer.strategy.m.abs().max()) > 0
    if name == "FFALoRA":
        assert torch.equal(module.get_parameter(A), a_before)
