"""The per-client table: one row per client update and round, the histogram, a resume that appends, off."""

from __future__ import annotations

import csv
import math

import pytest

from lightfed import FederatedTrainer
from lightfed.data.partition import IID
from tests.conftest import BoringFederatedData, boring_model


def trainer(root, **kw):
    kw.setdefault("rounds", 2)
    kw.setdefault("clients_per_round", 3)
    return FederatedTrainer(logger=kw.pop("logger", False), enable_progress_bar=False,
                            default_root_dir=str(root), fed_eval_fraction=0, **kw)


def data():
    return BoringFederatedData(IID(num_clients=6), n=96)


def rows(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_one_row_per_client_and_round_whose_losses_give_the_logged_mean(tmp_path):
    # Prepare / Execute
    t, dm = trainer(tmp_path), data()
    history = t.fit(boring_model(), dm)
    sizes = dm.client_num_examples()
    # Assert: the cohort of each round, the header, and the mean the round logged
    table = rows(tmp_path / "clients.csv")
    assert list(table[0])[:6] == ["round", "client", "examples", "steps", "accepted", "loss"]
    for r in range(2):
        mine = [row for row in table if row["round"] == str(r)]
        assert sorted(int(row["client"]) for row in mine) == sorted(t.sample(r))
        assert all(row["accepted"] == "1" and int(row["steps"]) > 0 for row in mine)
        assert [int(row["examples"]) for row in mine] == [int(sizes[int(row["client"])]) for row in mine]
        mean = math.fsum(float(row["loss"]) for row in mine) / len(mine)
        assert mean == pytest.approx(history[r]["client/loss_mean"], rel=1e-12)


def test_a_resume_appends_without_repeating_the_rounds_after_the_checkpoint(tmp_path):
    # Prepare: 4 rounds (checkpoint at round 2), as if the run had died after round 4 before finishing
    first = trainer(tmp_path, rounds=4, checkpoint_every=2)
    first.fit(boring_model(), data())
    whole = (tmp_path / "clients.csv").read_text()
    assert {row["round"] for row in rows(tmp_path / "clients.csv")} == {"0", "1", "2", "3"}
    # Execute: resume from round 2 in the same directory; rounds 2 and 3 are played again
    again = trainer(tmp_path, rounds=4, checkpoint_every=2)
    again.fit(boring_model(), data(), ckpt_path=str(tmp_path / "checkpoints" / "round-00002.ckpt"))
    # Assert: each (round, client) once, and the same table as the uninterrupted run
    table = rows(tmp_path / "clients.csv")
    keys = [(row["round"], row["client"]) for row in table]
    assert len(keys) == len(set(keys)) == 4 * 3
    assert (tmp_path / "clients.csv").read_text() == whole


def test_the_loss_histogram_is_logged_per_round_at_the_round_index(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version=0)
    trainer(tmp_path, logger=logger).fit(boring_model(), data())
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"histograms": 0})
    acc.Reload()
    events = acc.Histograms("client/loss")
    assert [e.step for e in events] == [0, 1] and all(e.histogram_value.num == 3 for e in events)
    assert (tmp_path / "tb" / "version_0" / "clients.csv").is_file()


def test_off_writes_no_table(tmp_path):
    trainer(tmp_path, client_table=False).fit(boring_model(), data())
    assert not (tmp_path / "clients.csv").exists()


def test_evaluated_clients_get_their_own_validation_metrics(tmp_path):
    """On an evaluation round every evaluated client's val metrics are in the table (issue 24: the Flower view)."""
    # Prepare
    t = FederatedTrainer(logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path), rounds=2,
                         clients_per_round=3, eval_every=2, fed_eval_fraction=1.0)
    # Execute
    history = t.fit(boring_model(), data())
    # Assert: round 0 evaluates nobody; round 1 evaluates all 6 clients, trained or not, and their mean is logged
    table = rows(tmp_path / "clients.csv")
    assert "val_acc" in table[0]
    assert all(row["val_acc"] == "" for row in table if row["round"] == "0")
    last = [row for row in table if row["round"] == "1"]
    assert sorted(int(row["client"]) for row in last if row["val_acc"]) == list(range(6))
    trained = set(t.sample(1))
    for row in last:
        assert (row["steps"] != "") == (int(row["client"]) in trained)
    mean = math.fsum(float(row["val_acc"]) for row in last if row["val_acc"]) / 6
    assert mean == pytest.approx(history[1]["federated/val_acc_mean"], rel=1e-12)
