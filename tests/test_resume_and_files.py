"""Checkpoints as a dict over the stateful parts: lean fine-tuning state, config comparison, files and locks."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from lightning.pytorch.loggers import Logger

from lightfed import FederatedTrainer
from lightfed.data.partition import IID
from lightfed.resume import config_changes
from tests.conftest import BoringFederatedData, boring_model


def trainer(tmp_path, **kw):
    kw.setdefault("rounds", 2)
    kw.setdefault("clients_per_round", 3)
    return FederatedTrainer(logger=kw.pop("logger", False), enable_progress_bar=kw.pop("bar", False),
                            default_root_dir=str(tmp_path), fed_eval_fraction=0, **kw)


def data():
    return BoringFederatedData(IID(num_clients=6), n=96)


def test_a_fine_tuning_checkpoint_holds_what_trains_and_refuses_another_base(tmp_path):
    t = trainer(tmp_path / "a", trainable=["net.3.*"])  # only the head trains
    t.fit(boring_model(), data())
    state = torch.load(t.last_checkpoint, weights_only=True)
    kept = set(state["model"]["state"])
    assert kept == {"net.3.weight", "net.3.bias"}, kept  # the frozen body is fingerprinted, not stored
    other = boring_model(seed=5)  # another "pretrained" body
    again = trainer(tmp_path / "b", rounds=3, trainable=["net.3.*"])
    with pytest.raises(ValueError, match="another frozen base model"):
        again.fit(other, data(), ckpt_path=str(t.last_checkpoint))
    resumed = trainer(tmp_path / "c", rounds=3, trainable=["net.3.*"]).fit(boring_model(), data(), ckpt_path=str(t.last_checkpoint))
    assert len(resumed) == 3


def test_last_is_a_link_and_old_checkpoints_are_pruned(tmp_path):
    t = trainer(tmp_path, rounds=5, checkpoint_every=1, keep_checkpoints=2)
    t.fit(boring_model(), data())
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("round-*.ckpt"))
    assert ckpts == ["round-00004.ckpt", "round-00005.ckpt"]
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == "round-00005.ckpt"
    assert torch.load(last, weights_only=True)["progress"]["round"] == 5


def test_config_changes_are_split_into_safe_and_unsafe():
    old = "seed_everything: 0\ntrainer:\n  rounds: 10\n  batch_size: 16\nstrategy: null\n"
    new = "seed_everything: 0\ntrainer:\n  rounds: 20\n  batch_size: 32\nstrategy: FedProx\n"
    unsafe, safe = config_changes(old, new)
    assert unsafe == ["strategy", "trainer.batch_size"] and safe == ["trainer.rounds"]


def test_resume_with_another_config_is_refused_naming_the_keys(tmp_path, caplog):
    first = trainer(tmp_path / "a", checkpoint_every=1)
    first.config_yaml = "seed_everything: 0\ntrainer:\n  rounds: 2\n  batch_size: 16\n"
    first.fit(boring_model(), data())
    bad = trainer(tmp_path / "b", rounds=4)
    bad.config_yaml = "seed_everything: 0\ntrainer:\n  rounds: 4\n  batch_size: 8\n"
    with pytest.raises(ValueError, match=r"these keys differ and break an exact resume: trainer.batch_size"):
        bad.fit(boring_model(), data(), ckpt_path=str(first.last_checkpoint))
    good = trainer(tmp_path / "c", rounds=4)
    good.config_yaml = "seed_everything: 0\ntrainer:\n  rounds: 4\n  batch_size: 16\n"
    with caplog.at_level(logging.WARNING, logger="lightfed"):
        assert len(good.fit(boring_model(), data(), ckpt_path=str(first.last_checkpoint))) == 4
    assert "changed settings: trainer.rounds" in caplog.text


def test_an_unversioned_directory_is_not_overwritten(tmp_path):
    trainer(tmp_path).fit(boring_model(), data())
    with pytest.raises(ValueError, match="already holds a run's checkpoints"):
        trainer(tmp_path).fit(boring_model(), data())
    assert not (tmp_path / ".lightfed.lock").exists()  # released on the way out


def test_a_live_lock_refuses_a_second_run(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / ".lightfed.lock").write_text(str(os.getppid()))  # a live process holds it
    with pytest.raises(ValueError, match=r"in use by another lightfed run \(pid"):
        trainer(tmp_path).fit(boring_model(), data())
    (tmp_path / ".lightfed.lock").write_text("999999999")  # a dead one: taken over
    assert len(trainer(tmp_path).fit(boring_model(), data())) == 2


class RecordingLogger(Logger):
    def __init__(self, root):
        super().__init__()
        self.root = root
        self.hparams, self.final, self.final_step, self.metrics = None, None, None, []

    @property
    def name(self):
        return "rec"

    @property
    def version(self):
        return 0

    @property
    def log_dir(self):
        return str(self.root)

    def log_hyperparams(self, params, metrics=None, step=None):
        self.hparams, self.final, self.final_step = params, metrics, step

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))


def test_hparams_with_final_metrics_summary_and_eval_seconds(tmp_path, capsys):
    log = RecordingLogger(tmp_path)
    t = trainer(tmp_path, logger=log, bar=True, rounds=3, eval_every=2)
    t.config_yaml = "seed_everything: 0\ntrainer:\n  rounds: 3\nmodel:\n  init_args:\n    lr: 0.1\n"
    history = t.fit(boring_model(), data())
    assert log.hparams == {"seed_everything": 0, "trainer.rounds": 3, "model.init_args.lr": 0.1}
    assert log.final["final/central/test_acc"] == history[-1]["central/test_acc"]
    assert log.final["best/central/test_acc"] == max(h["central/test_acc"] for h in history if "central/test_acc" in h)
    assert [s for s, _ in log.metrics] == [0, 1, 2]
    assert log.final_step == 2  # the summary sits at the last round's step, after the curves
    assert "round/eval_seconds" in history[1] and "round/eval_seconds" not in history[0]
    out = capsys.readouterr().out
    assert "lightfed: 3 rounds in" in out and "test_acc: final" in out and "global model:" in out


def test_final_and_best_scalars_are_written_once_at_the_last_round_after_a_resume(tmp_path):
    """The summary scalars are logged at the last round's 0-based step: a resumed run's summary follows its
    curves (steps 1 then 2), instead of landing a second time at step 0."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Prepare: 2 rounds, then resume the same version to 3
    def tb():
        return TensorBoardLogger(save_dir=str(tmp_path), name="tb", version=0)

    first = trainer(tmp_path, logger=tb(), rounds=2, checkpoint_every=1, eval_every=1)
    first.fit(boring_model(), data())
    # Execute
    resumed = trainer(tmp_path, logger=tb(), rounds=3, eval_every=1)
    resumed.fit(boring_model(), data(), ckpt_path=str(first.last_checkpoint))
    # Assert
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    acc.Reload()
    summary = [t for t in acc.Tags()["scalars"] if t.startswith(("final/", "best/"))]
    assert "final/central/test_acc" in summary and "best/central/test_acc" in summary
    for tag in summary:
        assert [e.step for e in acc.Scalars(tag)] == [1, 2], tag


def test_the_summary_counts_secure_aggregation_key_material_when_present(tmp_path):
    """Under SecAgg the summary prints the bytes with key material and shares, the payload beside them."""
    from types import SimpleNamespace

    from lightfed.reporting import format_summary, summary_metrics

    row = {"round/bytes_up_per_client": 4000.0, "round/bytes_down_per_client": 4000.0,
           "secagg/bytes_up_per_client": 5234.0, "secagg/bytes_down_per_client": 4321.0}
    final = summary_metrics([row])
    assert final["final/secagg/bytes_up_per_client"] == 5234.0
    assert final["final/secagg/bytes_down_per_client"] == 4321.0
    t = SimpleNamespace(history=[row], exported_model=None, last_checkpoint=None, log_dir=tmp_path)
    text = format_summary(t, final, 1.0)
    assert "up 5,234 (payload 4,000 + key material and shares)" in text
    assert "down 8,321 (model 4,000 + keys and shares 4,321)" in text
    payload_only = {k: v for k, v in row.items() if k.startswith("round/")}
    plain = format_summary(t, summary_metrics([payload_only]), 1.0)
    assert "bytes per client per round: up 4,000, down 4,000" in plain
