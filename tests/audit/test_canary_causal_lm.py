"""The one-shot canary audit on the LoRA adapters of a causal LM (tiny random Llama, FedIT), with the one-run
lower bound of Steinke, Nasr & Jagielski (canaries inserted on fair coins): without DP and with large canaries
the bound is clearly above 0; under client-level DP it stays below the accountant's epsilon."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightfed import FederatedTrainer, FullParticipation
from lightfed.audit import OneShotCanaryAudit
from lightfed.data.partition import Natural
from lightfed.data.text import ShakespeareCausalDataModule
from lightfed.models import CausalLM
from lightfed.privacy import DPFixedClipping
from lightfed.registry import STRATEGIES
from tests.models.tiny_llama import build_tiny_llama

LORA = {"r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
DELTA = 1e-6  # the theorem's 2 m delta term must stay small


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def _audit_run(
    tiny: Path, root: Path, audit: OneShotCanaryAudit, privacy: DPFixedClipping | None
) -> FederatedTrainer:
    """40 Macbeth speakers (blocks of 16 tokens), every client in every round, 2 FedIT rounds of one step."""
    dm = ShakespeareCausalDataModule(Natural(min_size=2, max_clients=40), model=str(tiny), block_size=16,
                                     plays=["macbeth"], held_out_speakers=2, test_subset=8, val_fraction=0.0)
    trainer = FederatedTrainer(
        rounds=2, sampler=FullParticipation(), privacy=privacy, local_steps=1, batch_size=4,
        strategy=STRATEGIES.create("FedITLoRA", weighted=privacy is None), logger=False,
        enable_progress_bar=False,
        default_root_dir=str(root), fed_eval_fraction=0.0, checkpoint_every=0, eval_batch_size=8,
        callbacks=[audit],
    )
    trainer.fit(CausalLM(model=str(tiny), lora=LORA, lr=1e-2), dm)
    return trainer


def test_without_dp_large_canaries_give_a_clear_lower_bound(tiny_llama: Path, tmp_path: Path) -> None:
    audit = OneShotCanaryAudit(num_canaries=20, canary_norm=5.0, inclusion="coin", delta=DELTA, bootstrap=20)
    trainer = _audit_run(tiny_llama, tmp_path, audit, None)
    r = audit.report
    adapters = sum(p.numel() for n, p in trainer.module.named_parameters() if "lora_" in n)
    assert r["dimension"] == adapters == 224  # the audited vector is the adapters that travel, not the base
    assert r["one_run"]["candidates"] == 40 and 0 < audit.inserted < 40
    final = r["one_run"]["final_model"]
    assert final["correct"] == final["guesses"]  # every guess right
    assert r["one_run"]["epsilon_lower_bound"] > 1.0  # perfect guesses on 40 coins at delta 1e-6: about 1.4
    assert trainer.history[-1]["audit/epsilon_lower_bound"] == r["one_run"]["epsilon_lower_bound"]
    assert r["final_model"]["epsilon"] > 5.0 and r["claimed_epsilon"] == float("inf")


def test_under_client_level_dp_the_bound_stays_below_the_accountant(tiny_llama: Path, tmp_path: Path) -> None:
    privacy = DPFixedClipping(clip_norm=0.1, noise_multiplier=1.0, clipping="client", delta=DELTA,
                              verbose=False)
    audit = OneShotCanaryAudit(num_canaries=20, inclusion="coin", bootstrap=20)
    trainer = _audit_run(tiny_llama, tmp_path, audit, privacy)
    r = audit.report
    accountant = trainer.history[-1]["privacy/epsilon"]
    assert r["delta"] == DELTA and r["accountant_epsilon"] == accountant
    # every client and canary in every round: the claim for a canary is the accountant's epsilon
    assert r["claimed_epsilon"] == pytest.approx(accountant, rel=1e-6)
    assert r["one_run"]["epsilon_lower_bound"] < accountant


def test_coin_inclusion_is_seeded_and_refused_for_confined_canaries() -> None:
    with pytest.raises(ValueError, match="inclusion='coin' needs kind='random'"):
        OneShotCanaryAudit(inclusion="coin", kind="dirac")
    with pytest.raises(ValueError, match="inclusion must be 'split' or 'coin'"):
        OneShotCanaryAudit(inclusion="half")  # type: ignore[arg-type]
