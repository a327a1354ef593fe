"""LoRA-aware aggregation (FedITLoRA, FFALoRA, FLoRA, FedSALoRA): exactness, what travels, ranks, refusals.

A tiny MLP with peft LoRA adapters (rank 8 on its 8 -> 16 layer, a new output layer trained as is) runs
through the real client loop (:func:`tests.plugins.zoo_testing.train_clients`) and the server path
(:func:`lightfed.server.run_server_round`); expected values are computed densely from the clients' live
adapters, captured as they finish training.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import Tensor

from lightfed import ClientData, FederatedTrainer, ParamSpec, PoissonSampler
from lightfed.models import MLPClassifier
from lightfed.models.hf import add_lora
from lightfed.models.lora import LoRALayout, RankTiers
from lightfed.registry import STRATEGIES
from lightfed.server import run_server_round
from lightfed_zoo.strategies.lora import FedITLoRA, FedSALoRA, FFALoRA, FLoRA
from tests.conftest import BoringFederatedData
from tests.plugins.zoo_testing import train_clients

LORA_NAMES = ["FedITLoRA", "FFALoRA", "FLoRA", "FedSALoRA"]
TRAINABLE = {"FFALoRA": ["*lora_B*", "net.3.*"]}  # FFA-LoRA: A frozen, out of the payload


def lora_mlp(name: str = "FedITLoRA", seed: int = 0, r: int = 8) -> MLPClassifier:
    """MLP 8 -> 16 -> 3 with LoRA on the first layer (``net.1``) and the output layer (``net.3``) trained as is."""
    L.seed_everything(seed, verbose=False)
    model = MLPClassifier(in_features=8, hidden=[16], num_classes=3, lr=0.2)
    lora = {"r": r, "lora_alpha": 2 * r, "target_modules": ["net.1"], "modules_to_save": ["net.3"]}
    if name == "FLoRA":
        lora["base_in_payload"] = True
    return add_lora(model, lora)


def clients(num: int, seed: int = 1) -> dict[int, ClientData]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for c in range(num):
        n = 12 + 4 * c
        x = torch.randn(n, 8, generator=gen) + c
        out[c] = ClientData((x, torch.randint(0, 3, (n,), generator=gen)), torch.arange(n))
    return out


def set_up(name: str, module: MLPClassifier, **kwargs) -> tuple:
    strategy = STRATEGIES.create(name, **kwargs)
    spec = ParamSpec.from_module(module, TRAINABLE.get(name))
    w = spec.flatten(spec.tensors(module))
    strategy.setup(spec, 20, w)
    return strategy, spec, w


def capture(strategy, module) -> list[dict[str, Tensor]]:
    """Record each client's live LoRA tensors as its visit ends (before the strategy's own on_client_end)."""
    seen: list[dict[str, Tensor]] = []
    original = strategy.on_client_end

    def on_client_end(ctx, update):
        seen.append({n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n})
        return original(ctx, update)

    strategy.on_client_end = on_client_end
    return seen


A, B = "net.1.lora_A.default.weight", "net.1.lora_B.default.weight"


def rank_table(tmp_path: Path, ranks: dict[int, int]) -> str:
    path = tmp_path / "ranks.csv"
    path.write_text("client_id,rank\n" + "".join(f"{c},{r}\n" for c, r in ranks.items()))
    return str(path)


# ---------------------------------------------------------------------- FFA-LoRA
def test_ffa_lora_averaged_b_times_fixed_a_is_the_mean_product_and_only_b_travels():
    module = lora_mlp("FFALoRA")
    strategy, spec, w = set_up("FFALoRA", module)
    a_before = module.get_parameter(A).detach().clone()
    assert not any("lora_A" in n for n in spec.names) and any("lora_B" in n for n in spec.names)
    assert spec.numel == 16 * 8 + (16 * 3 + 3)  # B (16 x 8) and the output layer: no A on the wire
    layout = LoRALayout.from_spec(spec)
    (layer,) = layout.layers
    seen = capture(strategy, module)
    data = clients(4)
    updates = train_clients(strategy, module, spec, w, data, {}, 0, local_steps=3)
    weights = torch.tensor([float(len(d)) for d in data.values()])
    p = weights / weights.sum()
    new = run_server_round(strategy, w, updates).global_params
    # Prepare: every client's product B_k A with its live B_k and the one shared A
    a = a_before
    expected = sum(pk * s[B] @ a for pk, s in zip(p, seen))
    # Assert: (mean B) A equals mean(B_k A) to float tolerance; A never changed and nobody trained it
    torch.testing.assert_close(layer.b_matrix(new) @ a, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(module.get_parameter(A), a_before) and all(torch.equal(s[A], a_before) for s in seen)
    assert float(expected.abs().max()) > 0


def test_ffa_lora_mixed_ranks_are_exact_and_a_is_restored(tmp_path):
    module = lora_mlp("FFALoRA")
    strategy, spec, w = set_up("FFALoRA", module, rank_file=rank_table(tmp_path, {0: 2, 1: 4, 2: 8}))
    a_before = module.get_parameter(A).detach().clone()
    seen = capture(strategy, module)
    updates = train_clients(strategy, module, spec, w, clients(3), {}, 0, local_steps=3)
    for s, r in zip(seen, (2, 4, 8)):  # a rank-r client used the first r rows of A, columns of B
        assert bool((s[A][r:] == 0).all()) and bool((s[B][:, r:] == 0).all())
    assert torch.equal(module.get_parameter(A), a_before)  # the truncated rows of the frozen A are restored
    new = run_server_round(strategy, w, updates).global_params
    p = torch.tensor([float(u.num_examples) for u in updates])
    p = p / p.sum()
    expected = sum(pk * s[B] @ s[A] for pk, s in zip(p, seen))  # each client's own (truncated) product
    (layer,) = LoRALayout.from_spec(spec).layers
    torch.testing.assert_close(layer.b_matrix(new) @ a_before, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- FLoRA
def test_flora_applies_the_exact_stacked_update_for_ranks_2_4_8(tmp_path):
    module = lora_mlp("FLoRA")
    strategy, spec, w = set_up("FLoRA", module, rank_file=rank_table(tmp_path, {0: 2, 1: 4, 2: 8}))
    layout = LoRALayout.from_spec(spec)
    (layer,) = layout.layers
    seen = capture(strategy, module)
    updates = train_clients(strategy, module, spec, w, clients(3), {}, 0, local_steps=4)
    assert all(float(u.delta[layer.base].abs().max()) == 0 for u in updates)  # clients never train W
    new = run_server_round(strategy, w, updates, round_idx=0).global_params
    p = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    p = p / p.sum()
    scaling = 16 / 8  # lora_alpha / r
    dense = sum(pk * s[B].double() @ s[A].double() for pk, s in zip(p, seen)) * scaling
    applied = (new[layer.base] - w[layer.base]).view(16, 8).double()
    assert float((applied - dense).norm() / dense.norm()) < 1e-6
    for s, r in zip(seen, (2, 4, 8)):
        assert bool((s[A][r:] == 0).all()) and bool((s[B][:, r:] == 0).all())
    # adapters re-initialised: B = 0 (the merged model computes W' x), A redrawn from the seeded init
    assert float(layer.b_matrix(new).abs().max()) == 0
    assert not torch.equal(layer.a_matrix(new), layer.a_matrix(w))
    assert float(layer.a_matrix(new).abs().max()) <= 1 / 8**0.5
    metrics = strategy.round_metrics()
    others = 16 * 3 + 3
    assert metrics["stack_rank"] == 14.0
    assert metrics["bytes_down_stack"] == 4.0 * (14 * (8 + 16) + others)
    assert metrics["bytes_up_adapters"] == 4.0 * ((2 + 4 + 8) * (8 + 16) / 3 + others)


def test_flora_without_base_weights_in_the_payload_is_refused():
    module = lora_mlp("FedITLoRA")  # no base_in_payload
    with pytest.raises(ValueError, match="FLoRA: the base weight of .* must be part of the payload.*base_in_payload: true"):
        set_up("FLoRA", module)


def test_flora_is_refused_by_client_level_dp_and_secure_aggregation(tmp_path):
    from lightfed.privacy import DPFixedClipping
    from lightfed.secagg import SecAggPlus

    for kwargs in ({"privacy": DPFixedClipping(clip_norm=0.5, noise_multiplier=1.0, verbose=False)},
                   {"secure_aggregation": SecAggPlus()}):
        trainer = FederatedTrainer(
            rounds=1, sampler=PoissonSampler(0.5), strategy=FLoRA(weighted=False), logger=False,
            enable_progress_bar=False, default_root_dir=str(tmp_path), **kwargs,
        )
        with pytest.raises(ValueError, match="FLoRA needs every individual update"):
            trainer.fit(lora_mlp("FLoRA"), BoringFederatedData())


# ---------------------------------------------------------------------- FedSA-LoRA
def fit_fedsa(root: Path, rounds: int, ckpt_path: str | None = None, **kwargs) -> FederatedTrainer:
    trainer = FederatedTrainer(
        rounds=rounds, clients_per_round=4, strategy=FedSALoRA(), local_steps=3, batch_size=8, fed_eval_fraction=1.0,
        checkpoint_every=1, logger=False, enable_progress_bar=False, default_root_dir=str(root), **kwargs,
    )
    trainer.fit(lora_mlp("FedSALoRA"), BoringFederatedData(), ckpt_path=ckpt_path)
    return trainer


def test_fedsa_lora_b_never_leaves_a_client_and_resume_restores_the_personal_bs(tmp_path):
    full = fit_fedsa(tmp_path / "full", rounds=3)
    layout = LoRALayout.from_spec(full.spec)
    b_mask = layout.mask("b")
    start = ParamSpec.from_module(lora_mlp("FedSALoRA"))
    w0 = start.flatten(start.tensors(lora_mlp("FedSALoRA")))
    # the global B never moved from its initialisation (zero) while A and the head did
    assert torch.equal(full.global_params[b_mask], w0[b_mask]) and float(w0[b_mask].abs().max()) == 0
    assert not torch.equal(full.global_params[~b_mask], w0[~b_mask])
    personal = {c: s["lora_B"] for c, s in full.client_states.items()}
    assert len(personal) >= 4 and all(float(b.abs().max()) > 0 for b in personal.values())
    assert len({tuple(b.tolist()) for b in personal.values()}) == len(personal)  # one B per client
    # federated evaluation runs with each client's own B
    cid = next(iter(personal))
    params = full.strategy.eval_params(cid, full.client_states[cid], full.global_params)
    assert torch.equal(params[b_mask], personal[cid]) and torch.equal(params[~b_mask], full.global_params[~b_mask])
    resumed = fit_fedsa(tmp_path / "resumed", rounds=3, ckpt_path=str(tmp_path / "full" / "checkpoints" / "round-00002.ckpt"))
    assert resumed.client_states.keys() == full.client_states.keys()
    assert all(torch.equal(resumed.client_states[c]["lora_B"], b) for c, b in personal.items())
    assert torch.equal(resumed.global_params, full.global_params)


def test_fedsa_lora_update_carries_no_b_and_refuses_mixed_ranks():
    module = lora_mlp("FedSALoRA")
    strategy, spec, w = set_up("FedSALoRA", module)
    states: dict = {}
    updates = train_clients(strategy, module, spec, w, clients(3), states, 0, local_steps=3)
    b_mask = LoRALayout.from_spec(spec).mask("b")
    assert all(float(u.delta[b_mask].abs().max()) == 0 for u in updates)
    assert all(float(states[c]["lora_B"].abs().max()) > 0 for c in range(3))
    with pytest.raises(ValueError, match="FedSALoRA cannot mix LoRA ranks"):
        FedSALoRA(ranks=[2, 8])


# ---------------------------------------------------------------------- every variant
@pytest.mark.parametrize("name", LORA_NAMES)
def test_client_order_does_not_matter_and_state_round_trips(name):
    module = lora_mlp(name)
    strategy, spec, w = set_up(name, module)
    states: dict = {}
    updates = train_clients(strategy, module, spec, w, clients(5), states, 0, local_steps=2)
    perm = [3, 0, 4, 1, 2]
    outs = []
    for order in (updates, updates[::-1], [updates[i] for i in perm]):
        fresh = copy.deepcopy(strategy)
        outs.append(run_server_round(fresh, w, order).global_params)
    for new in outs[1:]:
        torch.testing.assert_close(new, outs[0])
    buffer = io.BytesIO()
    torch.save({"strategy": strategy.state_dict(), "clients": states}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    torch.testing.assert_close(saved["clients"], states, rtol=0, atol=0)


@pytest.mark.parametrize("name", LORA_NAMES)
def test_trains_end_to_end_on_a_lora_model(name, tmp_path):
    trainer = FederatedTrainer(
        rounds=3, clients_per_round=4, strategy=name, local_steps=4, batch_size=8, fed_eval_fraction=0.5,
        trainable=TRAINABLE.get(name), checkpoint_every=0, logger=False, enable_progress_bar=False,
        default_root_dir=str(tmp_path),
    )
    history = trainer.fit(lora_mlp(name), BoringFederatedData())
    assert history[-1]["round/updates"] == 4.0 and history[-1]["central/test_acc"] > 0.5, history[-1]
    # a LoRA run also exports its adapters in peft's format and a merged plain model (issue 13 item 5)
    assert (trainer.exported_peft["adapter"] / "adapter_model.safetensors").is_file()
    assert (trainer.exported_peft["merged"] / "model.safetensors").is_file()
    up = history[-1]["round/bytes_up_per_client"]
    assert up == 4.0 * trainer.spec.numel
    if name == "FLoRA":
        assert history[-1]["strategy/bytes_down_stack"] == 4.0 * (4 * 8 * (8 + 16) + 51)


def test_tiers_are_seeded_per_client_and_checked_against_the_adapter_rank(tmp_path):
    tiers = RankTiers([2, 4, 8], seed=3)
    draws = [tiers.rank(c) for c in range(200)]
    assert draws == [RankTiers([2, 4, 8], seed=3).rank(c) for c in range(200)] and set(draws) == {2, 4, 8}
    assert draws != [RankTiers([2, 4, 8], seed=4).rank(c) for c in range(200)]
    assert RankTiers([2, 8], weights=[0.0, 1.0]).rank(5) == 8
    with pytest.raises(ValueError, match="ranks go up to 16, but the adapters have rank r=8"):
        set_up("FLoRA", lora_mlp("FLoRA"), ranks=[4, 16])
    with pytest.raises(ValueError, match="rank_weights must give one non-negative weight per rank"):
        FedITLoRA(ranks=[2, 4], rank_weights=[1.0])
    with pytest.raises(ValueError, match="needs the columns 'client_id' and 'rank'"):
        bad = tmp_path / "bad.csv"
        bad.write_text("client,tier\n0,2\n")
        FLoRA(rank_file=str(bad))


def test_ffa_lora_refuses_a_payload_that_carries_a():
    module = lora_mlp("FFALoRA")
    strategy = FFALoRA()
    spec = ParamSpec.from_module(module)
    with pytest.raises(ValueError, match=r"FFALoRA: the lora_A of \['net.1'\] must not be part of the payload.*'\*lora_B\*'"):
        strategy.setup(spec, 10, spec.flatten(spec.tensors(module)))


def test_ffa_lora_composes_with_dp_and_secure_aggregation(tmp_path):
    from lightfed.privacy import DPFixedClipping
    from lightfed.secagg import SecAggPlus

    module = lora_mlp("FFALoRA")
    a_before = module.get_parameter(A).detach().clone()
    trainer = FederatedTrainer(
        rounds=2, sampler=PoissonSampler(0.5), strategy=FFALoRA(weighted=False), trainable=TRAINABLE["FFALoRA"],
        privacy=DPFixedClipping(clip_norm=0.5, noise_multiplier=0.5, clipping="client", verbose=False),
        secure_aggregation=SecAggPlus(clip=4.0, max_weight=4.0), local_steps=2, batch_size=8, fed_eval_fraction=0,
        checkpoint_every=0, logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
    )
    history = trainer.fit(module, BoringFederatedData())
    assert history[-1]["privacy/epsilon"] > 0 and torch.equal(module.get_parameter(A), a_before)


def test_fedit_is_fedavg_on_the_adapters():
    module = lora_mlp("FedITLoRA")
    strategy, spec, w = set_up("FedITLoRA", module)
    updates = train_clients(strategy, module, spec, w, clients(3), {}, 0, local_steps=2)
    p = torch.tensor([float(u.num_examples) for u in updates])
    expected = w + sum(pk / p.sum() * u.delta for pk, u in zip(p, updates))
    torch.testing.assert_close(run_server_round(strategy, w, updates).global_params, expected)
