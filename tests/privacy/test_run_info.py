"""The one ``RunInfo`` every set-up receives: frozen, consistent, and the old keyword signature refused."""

import dataclasses

import pytest
import torch

from lightfed import PoissonSampler
from lightfed.messages import RunInfo
from lightfed.params import ParamSpec
from lightfed.privacy import DPFixedClipping
from lightfed.privacy.base import PrivacyMechanism
from lightfed.server import RoundServer
from lightfed.strategy import FedAvg


def _info(**kw) -> RunInfo:
    args = {"num_clients": 4, "sampler": PoissonSampler(0.5), "rounds": 3, "strategy": FedAvg(weighted=False)}
    return RunInfo(**{**args, **kw})


def test_run_info_is_frozen_and_stores_sizes_as_a_tuple_of_ints():
    info = _info(client_num_examples=[2, 5.0, 10, 20])
    assert info.client_num_examples == (2, 5, 10, 20)
    assert all(type(n) is int for n in info.client_num_examples)
    assert info.seed == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.rounds = 4  # type: ignore[misc]


def test_run_info_refuses_sizes_that_are_not_one_per_client():
    with pytest.raises(ValueError, match=r"client_num_examples has 3 entries but num_clients is 4"):
        _info(client_num_examples=[1, 2, 3])


def test_a_mechanism_written_against_the_keyword_setup_is_refused_at_definition_naming_the_fix():
    fields = "num_clients, sampler, rounds, strategy, seed, client_num_examples"
    fix = rf"OldStyle\.setup takes the keywords {fields}"
    with pytest.raises(TypeError, match=fix + r".*def setup\(self, info: RunInfo\)"):
        class OldStyle(PrivacyMechanism):
            def setup(self, *, num_clients, sampler, rounds, strategy, seed, client_num_examples=None):
                pass

    with pytest.raises(TypeError, match=r"Sub\.setup takes the keywords seed"):
        class Sub(DPFixedClipping):  # an old subclass of a built-in calling super() with keywords
            def setup(self, *, seed, **kwargs):
                super().setup(seed=seed, **kwargs)


def test_a_new_style_mechanism_receives_the_same_info_the_server_was_given():
    seen: list[RunInfo] = []

    class Records(PrivacyMechanism):
        def setup(self, info: RunInfo) -> None:
            seen.append(info)

    strategy = FedAvg(weighted=False)
    server = RoundServer(strategy, Records(), numel=2)
    spec = ParamSpec(names=("w",), shapes=(torch.Size([2]),), is_buffer=(False,))
    info = _info(strategy=strategy, client_num_examples=[1, 1, 2, 2])
    server.setup(spec, torch.zeros(2), info)
    assert seen == [info] and seen[0] is info


def test_the_server_refuses_a_run_info_built_for_another_strategy():
    server = RoundServer(FedAvg(weighted=False), numel=2)
    spec = ParamSpec(names=("w",), shapes=(torch.Size([2]),), is_buffer=(False,))
    with pytest.raises(ValueError, match=r"strategy=server\.strategy"):
        server.setup(spec, torch.zeros(2), _info())


def test_dp_fixed_clipping_gives_the_same_plan_through_run_info():
    """A change of shape only: the calibrated z and the weighted denominator are the hand-computed ones."""
    mech = DPFixedClipping(clip_norm=10.0, noise_multiplier=0.0, weighted_estimator=True, weight_cap=5.0,
                           verbose=False)
    mech.setup(_info(strategy=FedAvg(weighted=True), client_num_examples=[2, 5, 10, 20]))
    # w = min(n / 5, 1) = [0.4, 1, 1, 1], W = 3.4, q W = 0.5 * 3.4
    assert mech.denominator == pytest.approx(1.7)
