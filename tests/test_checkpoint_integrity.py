"""Every stateful part of a checkpoint is under its integrity hash; keyed mode; the accountant cross-check."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from lightfed import FederatedTrainer, integrity, resume
from lightfed.data.partition import IID
from lightfed.integrity import KEY_ENV
from lightfed_zoo.strategies.fedavgm import FedAvgM
from tests.conftest import BoringFederatedData, boring_model

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def trainer(root, **kw):
    kw.setdefault("rounds", 2)
    return FederatedTrainer(logger=False, enable_progress_bar=False, default_root_dir=str(root), fed_eval_fraction=0,
                            clients_per_round=3, **kw)


def data():
    return BoringFederatedData(IID(num_clients=6), n=96)


def edits():
    """One edit of each stateful part (what the issue's probe changed, and the rest)."""
    def momentum(s):
        s["strategy"]["state"]["momentum_buffer"] += 0.5

    def client_state(s):
        s["client_states"][7] = {"c": torch.ones(2)}

    def history(s):
        s["progress"]["history"][0]["round/update_norm"] = 0.0

    def round_number(s):
        s["progress"]["round"] = 1

    def callbacks(s):
        s["callbacks"]["Recorder"] = {"seen": 1}

    def privacy(s):
        s["privacy"] = {"mechanism": "DPFixedClipping", "accountant": {"rounds": 0}}

    def config(s):
        s["progress"]["config"] = "seed_everything: 1\n"

    return [momentum, client_state, history, round_number, callbacks, privacy, config]


@pytest.fixture(scope="module")
def fedavgm_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("fedavgm")
    t = trainer(root, strategy=FedAvgM(server_lr=1.0, momentum=0.9))
    t.fit(boring_model(), data())
    return t.last_checkpoint


@pytest.mark.parametrize("edit", edits(), ids=lambda f: f.__name__)
def test_an_edit_of_any_stateful_part_is_refused(tmp_path, fedavgm_checkpoint, edit):
    state = torch.load(fedavgm_checkpoint, weights_only=True)
    resume.read(fedavgm_checkpoint)  # the written file verifies
    edit(state)
    torch.save(state, tmp_path / "edited.ckpt")
    with pytest.raises(ValueError, match="is corrupted: its content does not match the integrity hash"):
        resume.read(tmp_path / "edited.ckpt")


def test_a_changed_momentum_is_refused_on_resume(tmp_path, fedavgm_checkpoint):
    state = torch.load(fedavgm_checkpoint, weights_only=True)
    state["strategy"]["state"]["momentum_buffer"] += 0.5  # the issue's probe: accepted before, model off by 1.21
    torch.save(state, tmp_path / "edited.ckpt")
    again = trainer(tmp_path / "run", rounds=3, strategy=FedAvgM(server_lr=1.0, momentum=0.9))
    with pytest.raises(ValueError, match="corrupted"):
        again.fit(boring_model(), data(), ckpt_path=str(tmp_path / "edited.ckpt"))


def test_the_encoding_tells_types_and_values_apart():
    def enc(obj):
        out = []
        integrity.encode(obj, out.append)
        return b"".join(out)

    pairs = [(1, 1.0), (1, True), ("1", 1), ([1], (1,)), ({"a": 1}, {"a": 2}), (0.1, 0.1 + 1e-17 + 2e-17),
             (torch.zeros(2), torch.zeros(2, dtype=torch.float64)), (torch.zeros(2), torch.zeros(1, 2)),
             ({"ab": "c"}, {"a": "bc"})]
    for a, b in pairs:
        assert a is b or enc(a) != enc(b) or a == b, (a, b)
    assert enc({"b": 1, "a": 2}) == enc({"a": 2, "b": 1})  # insertion order does not matter


def test_keyed_mode_detects_an_editor_who_recomputes_the_hash(tmp_path, monkeypatch, fedavgm_checkpoint):
    state = torch.load(fedavgm_checkpoint, weights_only=True)
    monkeypatch.setenv(KEY_ENV, "the run's secret")
    signed = integrity.sign(copy.deepcopy(state))
    assert signed["digest"].startswith("hmac-sha256:")
    integrity.verify(signed, "ckpt")  # with the key: verifies
    edited = copy.deepcopy(signed)
    edited["strategy"]["state"]["momentum_buffer"] += 0.5
    edited["digest"] = integrity.digest(edited)  # the editor recomputes an unkeyed hash: refused under a key
    with pytest.raises(ValueError, match="only an unkeyed hash"):
        integrity.verify(edited, "ckpt")
    edited["digest"] = integrity.digest(edited, b"a guessed key")
    with pytest.raises(ValueError, match="was edited, or was signed with another key"):
        integrity.verify(edited, "ckpt")
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ValueError, match=rf"signed with a key .* \${KEY_ENV} is not set"):
        integrity.verify(signed, "ckpt")
    legacy = {**state, "digest": "0" * 64}  # the old tensors-only hash
    with pytest.raises(ValueError, match="older lightfed"):
        integrity.verify(legacy, "ckpt")


def test_the_accountant_is_cross_checked_against_the_round():
    with pytest.raises(ValueError, match=r"composed 0 rounds, but the checkpoint is at round 3 .*epsilon 0 instead of 1\.5"):
        integrity.check_privacy_progress({"accountant": {"rounds": 0}}, 3, "ckpt", epsilon=lambda t: 0.5 * t)
    integrity.check_privacy_progress({"accountant": {"rounds": 3}}, 3, "ckpt")
    cohorts = {0: [1, 2], 1: [2, 3]}.__getitem__
    integrity.check_privacy_progress({"participations": {1: 1, 2: 2, 3: 1}}, 2, "ckpt", cohorts=cohorts)
    with pytest.raises(ValueError, match="counts 1 reports of client 2, but the sampler drew it 2 times"):
        integrity.check_privacy_progress({"participations": {1: 1, 2: 1, 3: 1}}, 2, "ckpt", cohorts=cohorts)


@pytest.mark.slow
def test_the_issue_scenario_a_rewound_accountant_is_refused(tmp_path, monkeypatch):
    """digits_dp_eps3 for 6 rounds, checkpoint every 3; the accountant of round 3 set to 0 rounds (and the
    unkeyed hash recomputed, as an editor would): the resume is refused, naming both epsilons."""
    from lightfed.cli import LightFedCLI

    monkeypatch.setattr(sys, "argv", ["lightfed"])

    def cli(root):
        return LightFedCLI(args=["--config", str(EXPERIMENTS / "digits_dp_eps3.yaml"), "--trainer.logger", "false",
                                 "--trainer.rounds", "6", "--trainer.checkpoint_every", "3",
                                 "--trainer.default_root_dir", str(root)], run=False)

    first = cli(tmp_path / "a")
    first.trainer.fit(first.model, first.datamodule)
    mid = tmp_path / "a" / "checkpoints" / "round-00003.ckpt"
    state = torch.load(mid, weights_only=True)
    assert state["privacy"]["accountant"]["rounds"] == 3
    state["privacy"]["accountant"]["rounds"] = 0
    state["digest"] = integrity.digest(state)  # an editor who recomputes the unkeyed hash
    torch.save(state, mid)
    second = cli(tmp_path / "b")
    second.trainer.config_yaml = None
    with pytest.raises(ValueError, match=r"composed 0 rounds, but the checkpoint is at round 3 .*epsilon 0 instead of 2\.\d+"):
        second.trainer.fit(second.model, second.datamodule, ckpt_path=str(mid))
