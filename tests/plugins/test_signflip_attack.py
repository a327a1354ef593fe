"""The sign-flip attack wrapper used by the robustness benchmark (plugins/attacks.py)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightfed import FedAvg, FederatedTrainer, ParamSpec
from lightfed.data.datasets import DigitsDataModule
from lightfed.data.partition import IID
from lightfed.models import MLPClassifier
from lightfed_zoo.attacks import SignFlipAttack
from lightfed_zoo.strategies import SCAFFOLD, Krum
from tests.plugins.zoo_testing import update


def setup(strategy, num_clients: int = 10):
    strategy.setup(ParamSpec(("w",), (torch.Size([2]),), (False,)), num_clients, torch.zeros(2))
    return strategy


def test_a_fixed_seeded_fraction_of_clients_is_byzantine():
    a = setup(SignFlipAttack("FedAvg", fraction=0.2, seed=7))
    assert len(a.byzantine) == 2 and a.byzantine <= set(range(10))
    assert a.byzantine == setup(SignFlipAttack(FedAvg(), fraction=0.2, seed=7)).byzantine  # same seed, same clients
    assert len(setup(SignFlipAttack(fraction=0.25), num_clients=20).byzantine) == 5
    assert setup(SignFlipAttack(fraction=0.0)).byzantine == frozenset()


def test_byzantine_clients_send_the_scaled_negated_update_and_honest_ones_are_untouched():
    a = setup(SignFlipAttack("FedAvg", fraction=0.2, scale=3.0, seed=1))
    bad, good = min(a.byzantine), min(set(range(10)) - a.byzantine)
    flipped = a.on_client_end(None, update(bad, [1.0, -2.0], extra=[5.0]))
    torch.testing.assert_close(flipped.delta, torch.tensor([-3.0, 6.0]))
    torch.testing.assert_close(flipped.extras["extra"], torch.tensor([5.0]))  # extras stay honest
    torch.testing.assert_close(a.on_client_end(None, update(good, [1.0, -2.0])).delta, torch.tensor([1.0, -2.0]))


def test_the_wrapped_strategy_keeps_its_nature_and_state():
    krum = SignFlipAttack(Krum(f=2))
    assert krum.needs_all_updates and not krum.uses_client_state
    scaffold = setup(SignFlipAttack(SCAFFOLD()))
    assert scaffold.uses_client_state and not scaffold.needs_all_updates
    assert scaffold.state_dict().keys() == {"c"} and "scaffold_c" in scaffold.client_payload(0)
    assert scaffold.weighted and not SignFlipAttack(FedAvg(weighted=False)).weighted
    # capabilities are declared, and the wrapper declares its strategy's (plus its own on_client_end)
    assert not scaffold.samples_own_cohort
    assert scaffold.client_hooks == SCAFFOLD.client_hooks | {"on_client_end"}
    assert SignFlipAttack(FedAvg()).client_hooks == {"on_client_end"}

    class Picky(FedAvg):
        def sample_clients(self, round_idx, num_clients, seed):
            return [0, 1]

    assert Picky.samples_own_cohort and SignFlipAttack(Picky()).samples_own_cohort
    assert SignFlipAttack(Picky()).sample_clients(0, 10, 0) == [0, 1]


@pytest.mark.parametrize(("kwargs", "match"), [({"fraction": 1.0}, "fraction"), ({"scale": 0.0}, "scale")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SignFlipAttack(**kwargs)


def run(strategy, tmp_path) -> float:
    L.seed_everything(0)
    trainer = FederatedTrainer(
        rounds=6, clients_per_round=10, strategy=strategy, local_steps=5, batch_size=32, fed_eval_fraction=0.0,
        eval_every=6, checkpoint_every=0, logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
    )
    return trainer.fit(MLPClassifier(hidden=[32], lr=0.3), DigitsDataModule(IID(num_clients=10)))[-1]["central/test_acc"]


def test_krum_resists_sign_flipping_that_breaks_fedavg(tmp_path):
    # 3 of 10 clients flip their updates every round: the mean moves by 0.4x the honest mean, Krum picks an honest one
    fedavg = run(SignFlipAttack(FedAvg(), fraction=0.3), tmp_path / "avg")
    krum = run(SignFlipAttack(Krum(f=3), fraction=0.3), tmp_path / "krum")
    assert krum > fedavg + 0.2, (krum, fedavg)
