"""The trainer's callback seam: hook order, extra updates through the server path, state in checkpoints, config."""

from __future__ import annotations

import pytest
import torch

from lightfed import Callback, ClientUpdate, FederatedTrainer, FullParticipation
from lightfed.data.partition import IID
from tests.conftest import BoringFederatedData, boring_model
from tests.test_cli import write_config


class Recorder(Callback):
    def __init__(self, push: float = 0.0) -> None:
        self.calls: list[str] = []
        self.push = push
        self.rounds_seen = 0

    def setup(self, trainer):
        self.calls.append("setup")

    def on_fit_start(self, trainer):
        self.calls.append("fit_start")

    def on_round_start(self, trainer, round_idx, cohort):
        self.calls.append(f"round_start:{round_idx}:{len(cohort)}")

    def extra_updates(self, trainer, round_idx, cohort):
        if not self.push:
            return []
        return [ClientUpdate(10_000 + round_idx, torch.full_like(trainer.global_params, self.push), num_examples=1)]

    def on_round_end(self, trainer, result):
        self.rounds_seen += 1
        result.metrics["audit/rounds_seen"] = float(self.rounds_seen)
        self.calls.append(f"round_end:{result.round_idx}")

    def on_fit_end(self, trainer):
        self.calls.append("fit_end")

    def state_dict(self):
        return {"rounds_seen": self.rounds_seen}

    def load_state_dict(self, state):
        self.rounds_seen = state["rounds_seen"]


def _trainer(tmp_path, cb, rounds=2, **kw):
    return FederatedTrainer(rounds=rounds, sampler=FullParticipation(), logger=False, enable_progress_bar=False,
                            default_root_dir=str(tmp_path), fed_eval_fraction=0, callbacks=[cb], **kw)


def test_hooks_run_in_order_and_metrics_reach_the_history(tmp_path):
    cb = Recorder()
    history = _trainer(tmp_path, cb).fit(boring_model(), BoringFederatedData(IID(num_clients=3), n=60))
    assert cb.calls == ["setup", "fit_start", "round_start:0:3", "round_end:0", "round_start:1:3", "round_end:1", "fit_end"]
    assert [h["audit/rounds_seen"] for h in history] == [1.0, 2.0]


def test_extra_updates_go_through_the_server_path(tmp_path):
    """An extra update of +1 everywhere, weight 1 among 3 clients of 20 examples each: the mean moves by 1/61."""
    plain = _trainer(tmp_path / "a", Recorder(), rounds=1, strategy="FedAvg", local_steps=1, batch_size=4)
    plain.fit(boring_model(), BoringFederatedData(IID(num_clients=3), n=60))
    pushed = _trainer(tmp_path / "b", Recorder(push=1.0), rounds=1, local_steps=1, batch_size=4)
    pushed.fit(boring_model(), BoringFederatedData(IID(num_clients=3), n=60))
    # the extra update is summed but never counted as a client
    assert pushed.history[0]["round/updates"] == plain.history[0]["round/updates"] == 3
    assert pushed.history[0]["round/extra_updates"] == 1 and "round/extra_updates" not in plain.history[0]
    sizes = plain.datamodule.client_num_examples().tolist()
    n = sum(sizes)
    # FedAvg: (sum_k n_k d_k + 1 * 1) / (n + 1) versus sum_k n_k d_k / n
    init = torch.cat([p.detach().reshape(-1) for p in boring_model().parameters()])
    mean_plain = plain.global_params - init
    expected = (mean_plain * n + 1.0) / (n + 1)
    torch.testing.assert_close(pushed.global_params - init, expected, atol=1e-6, rtol=1e-5)


def test_callback_state_is_checkpointed_and_restored(tmp_path):
    first = Recorder()
    t = _trainer(tmp_path / "a", first, rounds=2, checkpoint_every=1)
    t.fit(boring_model(), BoringFederatedData(IID(num_clients=3), n=60))
    again = Recorder()
    _trainer(tmp_path / "b", again, rounds=3).fit(boring_model(), BoringFederatedData(IID(num_clients=3), n=60),
                                                  ckpt_path=str(t.last_checkpoint))
    assert again.rounds_seen == 3  # 2 restored + 1 run


class Counter(Callback):
    """Counts rounds; instances with another ``name`` are another state (Lightning's ``state_key``)."""

    def __init__(self, name: str = "a", step: int = 1) -> None:
        self.name, self.step, self.count = name, step, 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def on_round_end(self, trainer, result):
        self.count += self.step

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def _fit(tmp_path, callbacks, rounds, **kw):
    trainer = FederatedTrainer(
        rounds=rounds, sampler=FullParticipation(), logger=False, enable_progress_bar=False,
        default_root_dir=str(tmp_path), fed_eval_fraction=0, callbacks=callbacks, checkpoint_every=1,
    )
    trainer.fit(boring_model(), BoringFederatedData(IID(num_clients=3), n=60), **kw)
    return trainer


@pytest.mark.parametrize("keyed", [True, False], ids=["state_key", "same_key"])
def test_two_callbacks_of_one_class_keep_their_own_state(tmp_path, keyed):
    # Prepare: two callbacks of one class counting by 1 and by 10 (with or without their own state_key)
    make = (lambda n, s: Counter(n, s)) if keyed else (lambda n, s: Recorder())
    first = [Counter("a", 1), Counter("b", 10)] if keyed else [Recorder(), Recorder()]
    if not keyed:
        first[1].rounds_seen = 100
    t = _fit(tmp_path / "a", first, rounds=2)
    # Execute: resume into fresh instances
    again = [make("a", 1), make("b", 10)]
    _fit(tmp_path / "b", again, rounds=3, ckpt_path=str(t.last_checkpoint))
    # Assert: each continued from its own state
    if keyed:
        assert [cb.count for cb in again] == [3, 30]
        assert set(torch.load(t.last_checkpoint, weights_only=True)["callbacks"]) == {"Counter{'name': 'a'}",
                                                                                       "Counter{'name': 'b'}"}
    else:  # one class, one key: told apart by their order (Recorder, Recorder#2)
        assert [cb.rounds_seen for cb in again] == [3, 103]


def test_callbacks_from_the_config(tmp_path):
    from lightfed.cli import LightFedCLI

    cfg = write_config(tmp_path, logger=False, rounds=1)
    cli = LightFedCLI(args=["--config", cfg, "--trainer.callbacks+=tests.test_callbacks.Recorder",
                            "--trainer.default_root_dir", str(tmp_path / "r")], run=False)
    assert len(cli.trainer.callbacks) == 1 and isinstance(cli.trainer.callbacks[0], Recorder)


def test_an_audit_section_in_the_config_runs_inside_the_fit(tmp_path):
    """Issue 14: `audit:` (a list of audits) is a top-level config section; the audits run after trainer.callbacks."""
    import yaml

    from lightfed.cli import LightFedCLI

    cfg = write_config(tmp_path, logger=False, rounds=1)
    config = yaml.safe_load(open(cfg))
    config["audit"] = [{"class_path": "tests.test_callbacks.Recorder"}]
    config["trainer"]["callbacks"] = [{"class_path": "tests.test_callbacks.Recorder", "init_args": {"push": 0.0}}]
    path = tmp_path / "with_audit.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightFedCLI(args=["--config", str(path), "--trainer.default_root_dir", str(tmp_path / "r")], run=False)
    names = [type(cb).__name__ for cb in cli.trainer.all_callbacks]
    assert names == ["NoiseHint", "Evaluation", "Recorder", "Recorder", "ClientTable", "Reporting"]
    cli.trainer.fit(cli.model, cli.datamodule)
    assert all(cb.calls[-1] == "fit_end" for cb in cli.trainer.callbacks)
