"""The worst-10% clients of federated evaluation: the lowest accuracies, the highest losses and
perplexities."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from lightfed import FederatedTrainer
from lightfed.evaluation import Evaluation, evaluate_federated, higher_is_better, worst_clients_mean
from lightfed.messages import RoundResult


@pytest.mark.parametrize(("key", "override", "expected"), [
    ("val_acc", None, True), ("val_ppl", None, False), ("val_loss", None, False),
    ("test_Perplexity", None, False), ("val_f1", None, True), ("val_ppl", True, True),
    ("val_acc", False, False),
])
def test_direction_from_the_name_or_the_override(key: str, override: bool | None, expected: bool) -> None:
    assert higher_is_better(key, override) is expected


def _trainer(per_client: list[dict[str, float]], metric: str, higher: bool | None = None) -> SimpleNamespace:
    """A stand-in trainer whose client ``c`` reports ``per_client[c]`` (every client evaluated)."""
    return SimpleNamespace(
        datamodule=SimpleNamespace(client_val=lambda cid: [cid]), global_params=torch.zeros(1),
        num_clients=len(per_client), fed_eval_fraction=1.0, seed=0, client_states={}, eval_batch_size=1,
        strategy=SimpleNamespace(eval_params=lambda cid, state, g: g),
        local=SimpleNamespace(evaluate=lambda data, params, stage, bs: dict(per_client[data[0]])),
        fed_eval_metric=metric, fed_eval_higher_is_better=higher,
    )


# 11 clients: the worst 10% are ceil(1.1) = 2 clients.
PPL = [12.0, 30.0, 9.0, 15.0, 11.0, 44.0, 10.0, 13.0, 8.0, 14.0, 16.0]
ACC = [0.40, 0.10, 0.50, 0.35, 0.42, 0.05, 0.45, 0.38, 0.55, 0.36, 0.30]


def test_worst_ten_percent_by_hand_for_perplexity_and_accuracy() -> None:
    clients = [{"val_ppl": p, "val_acc": a} for p, a in zip(PPL, ACC, strict=True)]
    ppl = evaluate_federated(_trainer(clients, "ppl"), 0)
    assert ppl["federated/val_ppl_worst10"] == pytest.approx((44.0 + 30.0) / 2)  # the highest perplexities
    assert ppl["federated/val_ppl_mean"] == pytest.approx(sum(PPL) / 11)
    assert ppl["federated/higher_is_better"] == 0.0
    acc = evaluate_federated(_trainer(clients, "acc"), 0)
    assert acc["federated/val_acc_worst10"] == pytest.approx((0.05 + 0.10) / 2)  # the lowest accuracies
    assert acc["federated/higher_is_better"] == 1.0
    forced = evaluate_federated(_trainer(clients, "ppl", higher=True), 0)  # the override wins over the name
    assert forced["federated/val_ppl_worst10"] == pytest.approx((8.0 + 9.0) / 2)
    assert worst_clients_mean([3.0], False) == 3.0


def test_the_direction_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    clients = [{"val_ppl": p} for p in PPL]
    trainer = _trainer(clients, "ppl")
    trainer.eval_every, trainer.rounds = 1, 2
    evaluation = Evaluation()
    evaluation.evaluate = lambda tr, r: evaluate_federated(tr, r)  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, logger="lightfed"):
        for r in range(2):
            result = RoundResult(round_idx=r, cohort=[], num_updates=0)
            evaluation.on_round_end(trainer, result)  # type: ignore[arg-type]
    said = [m for m in caplog.messages if "val_ppl_worst10" in m]
    assert len(said) == 1 and "highest 10%" in said[0] and "lower is better" in said[0]


def test_a_direction_that_is_not_a_bool_is_refused_by_name() -> None:
    match = r"trainer.fed_eval_higher_is_better must be null, true or false, got 'yes'"
    with pytest.raises(ValueError, match=match):
        FederatedTrainer(fed_eval_higher_is_better="yes", logger=False)  # type: ignore[arg-type]


def test_the_summary_says_which_end_and_best_perplexity_is_the_lowest() -> None:
    from lightfed.reporting import format_summary, summary_metrics

    history = [{"central/test_ppl": 40.0, "central/test_acc": 0.2, "federated/val_ppl_worst10": 60.0,
                "federated/higher_is_better": 0.0},
               {"central/test_ppl": 30.0, "central/test_acc": 0.3, "federated/val_ppl_worst10": 50.0,
                "federated/higher_is_better": 0.0},
               {"central/test_ppl": 35.0, "central/test_acc": 0.25}]
    final = summary_metrics(history)
    assert final["best/central/test_ppl"] == 30.0 and final["best/central/test_acc"] == 0.3
    trainer = SimpleNamespace(history=history, exported_model=None, last_checkpoint=None, log_dir=".")
    text = format_summary(trainer, final, 1.0)  # type: ignore[arg-type]
    assert "val_ppl_worst10 (worst-10% clients, highest values): 50.0000" in text
