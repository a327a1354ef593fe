"""The federated loop end to end: training, evaluation, logging, checkpoints, resume, determinism."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightfed import ClientUpdate, FederatedTrainer, FullParticipation, Strategy
from lightfed.data.partition import IID
from lightfed.seeding import make_generator
from tests.conftest import BoringFederatedData, boring_model


def make_trainer(tmp_path: Path, **kwargs) -> FederatedTrainer:
    kwargs.setdefault("rounds", 3)
    kwargs.setdefault("clients_per_round", 4)
    kwargs.setdefault("batch_size", 8)
    return FederatedTrainer(logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path), **kwargs)


def test_fit_learns_and_reports(tmp_path):
    trainer = make_trainer(tmp_path, rounds=8, eval_every=4, fed_eval_fraction=0.5)
    history = trainer.fit(boring_model(), BoringFederatedData())
    assert [r["round"] for r in history] == list(range(8))
    first, last = history[3], history[-1]
    assert last["central/test_acc"] > 0.9
    assert last["central/test_loss"] < first["central/test_loss"]
    assert 0 <= last["federated/val_acc_worst10"] <= last["federated/val_acc_mean"] <= 1
    assert last["federated/clients"] == 6
    assert history[0]["round/clients"] == 4 and history[0]["round/updates"] == 4
    n_params = 8 * 16 + 16 + 16 * 3 + 3
    assert history[0]["round/bytes_up_per_client"] == 4 * n_params
    assert history[0]["round/bytes_down_per_client"] == 4 * n_params
    assert history[0]["client/loss_mean"] > history[-1]["client/loss_mean"]


def test_one_round_equals_hand_computed_weighted_fedavg(tmp_path):
    """Train two clients by hand with plain PyTorch and check the global model is their weighted mean."""
    data = BoringFederatedData(IID(num_clients=2), n=45)
    model = boring_model(lr=0.05)
    reference = copy.deepcopy(model)
    trainer = make_trainer(tmp_path, rounds=1, sampler=FullParticipation(), batch_size=5, fed_eval_fraction=0)
    trainer.fit(model, data)

    start = [p.detach().clone() for p in reference.parameters()]
    deltas, sizes = [], []
    for cid in range(2):
        worker = copy.deepcopy(reference)
        opt = torch.optim.SGD(worker.parameters(), lr=0.05)
        client = data.client_train(cid)
        for x, y in client.batches(5, make_generator(0, "batches", 0, cid, 0)):
            opt.zero_grad()
            F.cross_entropy(worker(x), y).backward()
            opt.step()
        deltas.append([p.detach() - s for p, s in zip(worker.parameters(), start)])
        sizes.append(len(client))
    assert sizes[0] != sizes[1], "unequal client sizes make the weighting observable"
    total = sum(sizes)
    expected = [s + (sizes[0] * d0 + sizes[1] * d1) / total for s, d0, d1 in zip(start, *deltas)]
    got = trainer.spec.unflatten(trainer.global_params)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


def test_same_seed_same_numbers_different_seed_different(tmp_path):
    runs = []
    for seed in (0, 0, 1):
        trainer = make_trainer(tmp_path / f"s{seed}{len(runs)}", seed=seed)
        trainer.fit(boring_model(), BoringFederatedData())
        runs.append(trainer.global_params)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_resume_after_interruption_gives_identical_weights(tmp_path):
    full = make_trainer(tmp_path / "full", rounds=6, checkpoint_every=3)
    full.fit(boring_model(), BoringFederatedData())

    first = make_trainer(tmp_path / "part", rounds=3)
    first.fit(boring_model(), BoringFederatedData())
    ckpt = first.last_checkpoint
    assert ckpt is not None and ckpt.is_file()

    resumed = make_trainer(tmp_path / "resumed", rounds=6)
    history = resumed.fit(boring_model(seed=99), BoringFederatedData(), ckpt_path=str(ckpt))
    assert torch.equal(resumed.global_params, full.global_params)
    assert [r["round"] for r in history] == list(range(6))


def test_checkpoints_and_exported_model_load_outside_lightfed(tmp_path):
    from safetensors.torch import load_file

    trainer = make_trainer(tmp_path, rounds=4, checkpoint_every=2)
    trainer.fit(boring_model(), BoringFederatedData())
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "round-00002.ckpt", "round-00004.ckpt"]
    fresh = boring_model(seed=5)
    fresh.load_state_dict(load_file(str(trainer.exported_model)))
    flat = trainer.spec.flatten(trainer.spec.tensors(fresh))
    assert torch.equal(flat, trainer.global_params)


class _PoisonClient(Strategy):
    """FedAvg whose client 1 sends NaN."""

    def on_client_end(self, ctx, update: ClientUpdate) -> ClientUpdate:
        if update.client_id == 1:
            update.delta = torch.full_like(update.delta, float("nan"))
        return update


def test_nan_update_is_excluded_with_warning(tmp_path):
    trainer = make_trainer(tmp_path, rounds=2, sampler=FullParticipation(), strategy=_PoisonClient())
    with pytest.warns(RuntimeWarning, match="client 1 sent an update with NaN"):
        history = trainer.fit(boring_model(), BoringFederatedData())
    assert torch.isfinite(trainer.global_params).all()
    assert history[0]["round/rejected"] == 1 and history[0]["round/updates"] == 11


def test_trainable_patterns_freeze_the_rest_and_shrink_the_payload(tmp_path):
    model = boring_model()
    frozen_before = model.net[1].weight.detach().clone()
    trainer = make_trainer(tmp_path, trainable=["net.3.*"])
    history = trainer.fit(model, BoringFederatedData())
    assert trainer.spec.names == ("net.3.weight", "net.3.bias")
    assert history[0]["round/bytes_up_per_client"] == 4 * (16 * 3 + 3)
    assert torch.equal(model.net[1].weight, frozen_before)


def test_init_checkpoint_formats(tmp_path):
    from safetensors.torch import save_file

    source = boring_model(seed=7)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "w.ckpt")
    for name in ("w.safetensors", "w.pt", "w.ckpt"):
        model = boring_model(seed=1)
        trainer = make_trainer(tmp_path / name, rounds=1, init_checkpoint=str(tmp_path / name))
        trainer._setup(model, BoringFederatedData())
        assert torch.equal(model.net[1].weight, source.net[1].weight), name


def test_federated_eval_uses_personal_params(tmp_path):
    class Personal(Strategy):
        def eval_params(self, client_id, state, global_params):
            return torch.zeros_like(global_params)

    trainer = make_trainer(tmp_path, rounds=1, strategy=Personal(), fed_eval_fraction=1.0)
    history = trainer.fit(boring_model(), BoringFederatedData())
    # an all-zero MLP predicts class 0 for every input: accuracy equals the share of label 0
    dm = trainer.datamodule
    labels = dm.arrays.train[1]
    per_client = [float((labels[dm.client_val(c).indices] == 0).float().mean()) for c in range(12)]
    assert history[0]["federated/val_acc_mean"] == pytest.approx(sum(per_client) / 12)
    # worst 10% of 12 clients = the lowest ceil(1.2) = 2 clients
    assert history[0]["federated/val_acc_worst10"] == pytest.approx(sum(sorted(per_client)[:2]) / 2)


class _LeavesClientEmpty(IID):
    def partition(self, labels, seed, groups=None):
        from lightfed.data.client_data import Partition

        return Partition.from_lists([list(range(len(labels))), []])


def test_partition_with_an_empty_client_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"leaves clients \[1\] empty"):
        make_trainer(tmp_path).fit(boring_model(), BoringFederatedData(_LeavesClientEmpty(num_clients=2)))


def test_local_steps_run_exactly_that_many_optimizer_steps(tmp_path):
    from lightfed.client import LocalTrainer

    trainer = make_trainer(tmp_path, rounds=1, local_steps=7, batch_size=4)
    trainer.fit(boring_model(), BoringFederatedData())
    local: LocalTrainer = trainer.local
    update = local.fit_client(0, 1, trainer.datamodule.client_train(0), trainer.global_params)
    assert update.num_steps == 7 and len(trainer.datamodule.client_train(0)) < 7 * 4


def test_bf16_precision_applies_to_client_training(tmp_path):
    bf16 = make_trainer(tmp_path / "bf16", rounds=2, precision="bf16-mixed")
    bf16.fit(boring_model(), BoringFederatedData())
    fp32 = make_trainer(tmp_path / "fp32", rounds=2)
    fp32.fit(boring_model(), BoringFederatedData())
    # autocast really ran in bf16 (results differ from fp32) yet trains the same model (close)
    assert bf16.global_params.dtype == torch.float32
    assert not torch.equal(bf16.global_params, fp32.global_params)
    torch.testing.assert_close(bf16.global_params, fp32.global_params, atol=0.05, rtol=0)


def test_round_client_statistics_by_hand_and_with_non_finite_metrics(tmp_path):
    import math

    from lightfed.messages import RoundResult
    from lightfed.params import ParamSpec
    from lightfed.server import round_statistics

    spec = ParamSpec.from_module(torch.nn.Linear(2, 1))
    result = RoundResult(round_idx=0, cohort=[0, 1, 2], num_updates=3)
    metrics = [{"loss": 1.0, "f1": float("nan")}, {"loss": 3.0, "acc": 0.5}, {"loss": 8.0, "acc": float("inf")}]
    out = round_statistics(result, metrics, spec.num_bytes, {}, 0.0)
    assert out["client/loss_mean"] == pytest.approx(4.0)
    assert out["client/loss_std"] == pytest.approx(math.sqrt((9 + 1 + 16) / 2))  # sample std, n - 1
    assert math.isnan(out["client/f1_mean"]) and out["client/f1_std"] == 0.0  # one client logged it
    assert math.isinf(out["client/acc_mean"]) and math.isnan(out["client/acc_std"])
    assert out["round/bytes_up_per_client"] == 4 * 3


# ---------------------------------------------------------------------- nothing silent (issue 16)
class NaNLoss(type(boring_model())):
    """Every training loss is NaN: every update of every round is rejected."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * float("nan")


def test_a_run_whose_every_update_is_nan_fails_loudly_and_exports_nothing(tmp_path):
    from lightfed.trainer import RunFailedError

    L_seed = boring_model()  # same initial weights as NaNLoss below
    model = NaNLoss(in_features=8, hidden=[16], num_classes=3, lr=0.1)
    model.load_state_dict(L_seed.state_dict())
    trainer = make_trainer(tmp_path, rounds=4, fed_eval_fraction=0, max_failed_rounds=3)
    with pytest.warns(RuntimeWarning, match="NaN/Inf"), pytest.raises(RunFailedError, match=r"3 consecutive round\(s\).*NaN/Inf.*max_failed_rounds=3"):
        trainer.fit(model, BoringFederatedData())
    assert len(trainer.history) == 3 and trainer.exported_model is None
    assert not (tmp_path / "global_model.safetensors").exists()
    assert trainer.last_checkpoint is not None and trainer.last_checkpoint.is_file()


def test_resume_with_rounds_below_the_checkpoint_is_refused(tmp_path):
    trainer = make_trainer(tmp_path, rounds=2, fed_eval_fraction=0)
    trainer.fit(boring_model(), BoringFederatedData())
    again = make_trainer(tmp_path / "b", rounds=1, fed_eval_fraction=0)
    with pytest.raises(ValueError, match=r"checkpoint is at round 2 but trainer.rounds=1: nothing to train"):
        again.fit(boring_model(), BoringFederatedData(), ckpt_path=str(trainer.last_checkpoint))


def test_resuming_a_finished_run_completes_its_missing_export_and_trains_nothing(tmp_path):
    # Prepare: a finished run whose final export was lost (killed, or out of disk, while writing it)
    trainer = make_trainer(tmp_path, rounds=2, fed_eval_fraction=0)
    trainer.fit(boring_model(), BoringFederatedData())
    export = tmp_path / "global_model.safetensors"
    expected = export.read_bytes()
    export.unlink()
    # Execute: resume it with the same rounds
    again = make_trainer(tmp_path, rounds=2, fed_eval_fraction=0)
    history = again.fit(boring_model(), BoringFederatedData(), ckpt_path=str(trainer.last_checkpoint))
    # Assert: the export is back, byte for byte; no round ran; the history is the checkpoint's
    assert export.read_bytes() == expected
    assert history == trainer.history and again.round_idx == 2
    export.write_bytes(expected[: len(expected) // 2])  # a truncated export is repaired the same way
    make_trainer(tmp_path, rounds=2, fed_eval_fraction=0).fit(boring_model(), BoringFederatedData(),
                                                               ckpt_path=str(trainer.last_checkpoint))
    assert export.read_bytes() == expected


def test_resuming_a_run_that_failed_at_its_last_round_exports_nothing(tmp_path):
    from lightfed.trainer import RunFailedError

    model = NaNLoss(in_features=8, hidden=[16], num_classes=3, lr=0.1)
    trainer = make_trainer(tmp_path, rounds=3, fed_eval_fraction=0, max_failed_rounds=3)
    with pytest.warns(RuntimeWarning, match="NaN/Inf"), pytest.raises(RunFailedError):
        trainer.fit(model, BoringFederatedData())
    again = make_trainer(tmp_path, rounds=3, fed_eval_fraction=0, max_failed_rounds=3)
    with pytest.raises(RunFailedError, match="released no client update"):
        again.fit(boring_model(), BoringFederatedData(), ckpt_path=str(trainer.last_checkpoint))
    assert not (tmp_path / "global_model.safetensors").exists()


@pytest.fixture
def finished_run(tmp_path):
    trainer = make_trainer(tmp_path / "run", rounds=2, fed_eval_fraction=0, checkpoint_every=1)
    trainer.fit(boring_model(), BoringFederatedData())
    return trainer.log_dir / "checkpoints" / "round-00001.ckpt"


def _resume(tmp_path, ckpt, **kwargs):
    kwargs.setdefault("rounds", 3)
    return make_trainer(tmp_path / "again", fed_eval_fraction=0, **kwargs).fit(boring_model(), BoringFederatedData(), ckpt_path=str(ckpt))


def test_a_truncated_checkpoint_is_refused_naming_the_path(tmp_path, finished_run):
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(finished_run.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cut\.ckpt' could not be read .*truncated"):
        _resume(tmp_path, cut)


def test_a_corrupted_checkpoint_is_refused_by_its_integrity_hash(tmp_path, finished_run):
    state = torch.load(finished_run, weights_only=True)
    state["model"]["global_params"][3] += 438.0  # still a valid file: only the hash can tell
    bad = tmp_path / "bad.ckpt"
    torch.save(state, bad)
    with pytest.raises(ValueError, match="corrupted"):
        _resume(tmp_path, bad)


def test_resume_with_another_seed_is_refused(tmp_path, finished_run):
    with pytest.raises(ValueError, match=r"seed_everything=0, this run has 7"):
        _resume(tmp_path, finished_run, seed=7)
    assert len(_resume(tmp_path, finished_run)) == 3  # the same settings resume


def test_a_dp_checkpoint_resumed_without_privacy_is_refused(tmp_path):
    from lightfed import PoissonSampler
    from lightfed.privacy import DPFixedClipping

    dp = make_trainer(tmp_path / "dp", rounds=1, fed_eval_fraction=0, sampler=PoissonSampler(0.5),
                      strategy=__import__("lightfed").FedAvg(weighted=False),
                      privacy=DPFixedClipping(clip_norm=1.0, noise_multiplier=1.0, verbose=False))
    dp.fit(boring_model(), BoringFederatedData())
    with pytest.raises(ValueError, match="silently drop DP"):
        _resume(tmp_path, dp.last_checkpoint, rounds=2)


@pytest.mark.parametrize(("name", "f", "need"), [("Krum", 2, 5), ("MultiKrum", 2, 5), ("Bulyan", 1, 7)])
def test_robust_strategies_check_the_cohort_at_set_up(tmp_path, name, f, need):
    """Issue 16: Krum's f is checked against the sampler's cohort before round 0 trains, not at its aggregation."""
    from lightfed.registry import STRATEGIES, load_all_plugins

    load_all_plugins()
    t = make_trainer(tmp_path, rounds=1, clients_per_round=need - 1, strategy=STRATEGIES.get(name)(f=f))
    model = boring_model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"needs.* {need} updates per round, but the sampler gives {need - 1} clients"):
        t.fit(model, BoringFederatedData())
    assert t.history == [] and all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    assert len(make_trainer(tmp_path / "ok", rounds=1, clients_per_round=need, strategy=STRATEGIES.get(name)(f=f)).fit(
        boring_model(), BoringFederatedData())) == 1


class NoneStep(type(boring_model())):
    """training_step returns None for every batch: as in Lightning, each such step carries no gradient."""

    def training_step(self, batch, batch_idx):
        return None


def test_a_round_where_no_client_stepped_warns_and_reports_no_loss(tmp_path):
    model = NoneStep(in_features=8, hidden=[16], num_classes=3, lr=0.1)
    trainer = make_trainer(tmp_path, rounds=1, fed_eval_fraction=0)
    with pytest.warns(RuntimeWarning, match="none of the 4 clients trained on a loss"):
        history = trainer.fit(model, BoringFederatedData())
    assert history[0]["round/update_norm"] == 0.0
    assert "client/loss_mean" not in history[0]  # absent, never a made-up 0


def test_labels_beyond_the_models_classes_are_refused_at_set_up(tmp_path):
    """Issue 16, item 4: label 12 with a 10-class model failed mid-round with torch's IndexError."""
    from lightfed.models import MLPClassifier

    model = MLPClassifier(in_features=8, hidden=[16], num_classes=2, lr=0.1)  # the data has 3 classes
    with pytest.raises(ValueError, match=r"train labels go up to 2, but the model has num_classes=2"):
        make_trainer(tmp_path, rounds=1).fit(model, BoringFederatedData())


def test_a_checkpoint_that_cannot_be_written_is_named(tmp_path):
    """Issue 16: a write failure in the checkpoint folder (read-only, full) names the path. Injected so that it
    fails for root too: a directory sits where the checkpoint's temporary file must go."""
    trainer = make_trainer(tmp_path, rounds=2, fed_eval_fraction=0, checkpoint_every=1)
    (tmp_path / "checkpoints" / "round-00001.ckpt.tmp").mkdir(parents=True)
    with pytest.raises(OSError, match=r"could not write the checkpoint .*round-00001\.ckpt.*trainer\.default_root_dir"):
        trainer.fit(boring_model(), BoringFederatedData())
