"""The vmap executor: the same global model as the sequential executor, exact SGD, clear refusals."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightfed.executors  # noqa: F401 - registers "vmap"
from lightfed import EXECUTORS, ClientUpdate, FedAvg, FederatedTrainer, RoundAggregate
from lightfed.client import LocalTrainer
from lightfed.data.client_data import ClientData
from lightfed.data.datasets import DigitsDataModule
from lightfed.data.partition import Dirichlet
from lightfed.executors import SGDHyper, VmapExecutor, VmapUnsupportedError
from lightfed.models import CNNClassifier, MLPClassifier
from lightfed.params import ParamSpec
from lightfed.seeding import make_generator
from lightfed_zoo.strategies.fedprox import FedProx
from tests.conftest import BoringFederatedData, boring_model


def skewed_data() -> BoringFederatedData:
    """12 clients of unequal sizes (2 to ~40 examples), so batches of 8 are padded and clients finish early."""
    return BoringFederatedData(Dirichlet(num_clients=12, alpha=0.5, min_size=2), val_fraction=0.0)


def fit(
    tmp_path: Path, executor: str | VmapExecutor, model: L.LightningModule | None = None, data=None, **kwargs
) -> FederatedTrainer:
    kwargs.setdefault("rounds", 2)
    kwargs.setdefault("clients_per_round", 5)
    kwargs.setdefault("batch_size", 8)
    where = executor if isinstance(executor, str) else f"vmap-{executor.loss}"
    trainer = FederatedTrainer(
        logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path / where), fed_eval_fraction=0.0,
        eval_every=kwargs["rounds"], checkpoint_every=0, executor=executor, **kwargs,
    )
    trainer.fit(model if model is not None else boring_model(), data if data is not None else skewed_data())
    return trainer


def assert_same_run(seq: FederatedTrainer, vec: FederatedTrainer, atol: float = 1e-5) -> None:
    assert seq.global_params is not None and vec.global_params is not None
    torch.testing.assert_close(vec.global_params, seq.global_params, rtol=0, atol=atol)
    for a, b in zip(seq.history, vec.history):
        for key in ("client/loss_mean", "central/test_acc"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


# ---------------------------------------------------------------------------------------- test modules
class TwoGroupSGD(MLPClassifier):
    """SGD with two parameter groups: Nesterov momentum everywhere, its own lr and weight decay on the head."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        head = list(self.net[-1].parameters())
        body = [p for p in self.parameters() if all(p is not h for h in head)]
        return torch.optim.SGD(
            [{"params": body}, {"params": head, "lr": 0.05, "weight_decay": 0.01}],
            lr=0.1, momentum=0.9, nesterov=True,
        )


class LogsAccuracy(MLPClassifier):
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        self.log("train_acc", (logits.argmax(-1) == y).float().mean(), batch_size=len(y))
        return F.cross_entropy(logits, y)


class ClassWeighted(MLPClassifier):
    """Weighted cross-entropy is a weighted mean over the batch: not a per-example mean."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y, weight=torch.tensor([1.0, 5.0, 0.2]))


class FunctionalDropout(MLPClassifier):
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(F.dropout(x, 0.2, training=True)), y)


class WithScheduler(MLPClassifier):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1)]


def with_layer(layer: nn.Module) -> MLPClassifier:
    model = boring_model()
    model.net.insert(2, layer)
    return model


# ---------------------------------------------------------------------------------------- test strategies
class SquaredDeltaExtra(FedAvg):
    """on_client_end adds an extra; the server uses its mean, so a wrong extra changes the global model."""

    def on_client_end(self, ctx, update: ClientUpdate) -> ClientUpdate:
        update.extras["sq"] = ctx.local_params().sub(ctx.global_params).square()
        return update

    def aggregate(self, global_params: Tensor, aggregate: RoundAggregate, round_idx: int) -> Tensor:
        return global_params + aggregate.mean_delta() - 0.5 * aggregate.mean_extra("sq")


class EditsGradients(FedAvg):
    def on_before_optimizer_step(self, ctx) -> None:
        for p in ctx.local_tensors():
            p.grad.mul_(0.5)


class KeepsState(FedAvg):
    uses_client_state = True


class ClientDependentLoss(FedAvg):
    def client_loss(self, ctx, loss: Tensor) -> Tensor:
        return loss * (1.0 + 0.1 * ctx.client_id)


class SnapshotAtStart(FedAvg):
    """Pulls towards the weights *copied* at the start of the visit: the vmap program cannot reproduce that."""

    def on_client_start(self, ctx) -> None:
        ctx.extras["start"] = ctx.local_params()

    def client_loss(self, ctx, loss: Tensor) -> Tensor:
        local = torch.cat([t.reshape(-1) for t in ctx.local_tensors()])
        return loss + 10.0 * local.sub(ctx.extras["start"]).square().sum()


# ---------------------------------------------------------------------------------------- equality with sequential
def test_vmap_is_registered():
    assert EXECUTORS.get("vmap") is VmapExecutor
    assert "vmap" in [n.lower() for n in EXECUTORS.names()]


def test_skewed_data_pads_batches():
    data = skewed_data()
    data.setup()
    sizes = data.client_num_examples()
    assert int(sizes.min()) < 8 < int(sizes.max())
    assert bool((sizes % 8 != 0).any())


@pytest.mark.parametrize(
    ("make_model", "options"),
    [
        (boring_model, {}),
        (lambda: TwoGroupSGD(in_features=8, hidden=[16], num_classes=3), {}),
        (lambda: boring_model(momentum=0.5), {"local_steps": 5}),
        (boring_model, {"local_epochs": 2}),
        (boring_model, {"strategy": FedProx(mu=0.5)}),
        (boring_model, {"strategy": SquaredDeltaExtra()}),
    ],
    ids=["fedavg", "param-groups-nesterov-wd", "local-steps", "two-epochs", "fedprox", "on-client-end-extras"],
)
@pytest.mark.parametrize("program", ["cross_entropy", "training_step"])
def test_vmap_equals_sequential(tmp_path, make_model, options, program):
    L.seed_everything(0, verbose=False)
    seq = fit(tmp_path, "sequential", make_model(), **options)
    L.seed_everything(0, verbose=False)
    vec = fit(tmp_path, VmapExecutor(loss=program), make_model(), **options)
    assert vec.executor.program == program
    assert_same_run(seq, vec)
    L.seed_everything(0, verbose=False)
    start = make_model()
    assert float((vec.global_params - seq.spec.flatten(seq.spec.tensors(start))).abs().max()) > 1e-3


def test_fedprox_term_is_applied(tmp_path):
    """FedProx's proximal term changes the vmap result exactly as it changes the sequential one."""
    plain = fit(tmp_path / "a", "vmap", boring_model())
    prox = fit(tmp_path / "b", "vmap", boring_model(), strategy=FedProx(mu=0.5))
    assert float((plain.global_params - prox.global_params).abs().max()) > 1e-3


def test_vmap_equals_sequential_on_a_cnn_with_groupnorm(tmp_path):
    """Convolutions, GroupNorm and a module reachable under two names (``net`` wraps ``features``)."""

    def data() -> DigitsDataModule:
        return DigitsDataModule(Dirichlet(num_clients=30, alpha=0.5), val_fraction=0.0, flatten=False)

    def model() -> CNNClassifier:
        L.seed_everything(1, verbose=False)
        return CNNClassifier(in_channels=1, image_size=8, width=4, hidden=16, lr=0.05)

    seq = fit(tmp_path, "sequential", model(), data(), clients_per_round=4, batch_size=16)
    for program in ("cross_entropy", "training_step"):
        vec = fit(tmp_path, VmapExecutor(loss=program), model(), data(), clients_per_round=4, batch_size=16)
        assert_same_run(seq, vec)
        assert "central/test_acc" in vec.history[-1]  # the module still evaluates after vmap swapped its weights


def test_logged_training_metrics_match(tmp_path):
    make = lambda: LogsAccuracy(in_features=8, hidden=[16], num_classes=3)  # noqa: E731
    L.seed_everything(0, verbose=False)
    seq = fit(tmp_path, "sequential", make())
    L.seed_everything(0, verbose=False)
    vec = fit(tmp_path, "vmap", make())
    assert vec.executor.program == "training_step"  # auto: a step that logs is run as written
    for a, b in zip(seq.history, vec.history):
        assert 0 < a["client/train_acc_mean"] <= 1
        assert b["client/train_acc_mean"] == pytest.approx(a["client/train_acc_mean"], abs=1e-6)
        assert b["client/train_acc_std"] == pytest.approx(a["client/train_acc_std"], abs=1e-6)


def test_batch_order_is_the_sequential_one():
    x = torch.arange(40.0).reshape(20, 2)
    y = torch.arange(20)
    data = ClientData((x, y), torch.tensor([3, 5, 6, 9, 11, 12, 17, 19]))
    batches = list(data.batches(3, make_generator(7, "batches", 2, 4, 0)))
    order = data.order(make_generator(7, "batches", 2, 4, 0))
    assert sorted(order.tolist()) == data.indices.tolist()
    assert torch.equal(torch.cat([b[1] for b in batches]), y[order])
    assert [len(b[0]) for b in batches] == [3, 3, 2]
    assert torch.equal(data.order(), data.indices)


# ---------------------------------------------------------------------------------------- the SGD update
def test_sgd_hyper_step_by_hand():
    """p=1, g=2, lr=0.1, wd=0.5, momentum=0.9, two steps (numbers worked out by hand)."""
    hyper = SGDHyper(lr=0.1, momentum=0.9, weight_decay=0.5)
    p = torch.tensor([1.0])
    buf = hyper.step(p, torch.tensor([2.0]), None)  # d = 2 + 0.5 = 2.5, b = 2.5, p = 1 - 0.25
    assert p.item() == pytest.approx(0.75) and buf.item() == pytest.approx(2.5)
    hyper.step(p, torch.tensor([2.0]), buf)  # d = 2 + 0.375 = 2.375, b = 2.25 + 2.375, p = 0.75 - 0.4625
    assert buf.item() == pytest.approx(4.625) and p.item() == pytest.approx(0.2875)


@pytest.mark.parametrize(
    "group",
    [
        {"lr": 0.1},
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
        {"lr": 0.05, "momentum": 0.8, "nesterov": True},
        {"lr": 0.05, "momentum": 0.5, "maximize": True},
    ],
)
def test_sgd_hyper_matches_torch_sgd(group):
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(3, 4, generator=gen)
    grads = [torch.randn(3, 4, generator=gen) for _ in range(4)]
    ref = start.clone().requires_grad_(True)
    opt = torch.optim.SGD([ref], **group)
    ours, buf = start.clone(), None
    hyper = SGDHyper.from_group(opt.param_groups[0])
    for g in grads:
        ref.grad = g.clone()
        opt.step()
        buf = hyper.step(ours, g, buf)
    torch.testing.assert_close(ours, ref.detach(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("model", "options", "match"),
    [
        (lambda: boring_model(optimizer="adam"), {}, "Adam"),
        (lambda: with_layer(nn.Dropout(0.3)), {}, "Dropout"),
        (lambda: with_layer(nn.BatchNorm1d(16)), {}, "buffers"),
        (lambda: with_layer(nn.BatchNorm1d(16)), {"aggregate_buffers": False}, "running batch statistics"),
        (lambda: ClassWeighted(in_features=8, hidden=[16], num_classes=3), {}, "not a mean over examples"),
        (lambda: FunctionalDropout(in_features=8, hidden=[16], num_classes=3), {}, "could not be vectorised"),
        (lambda: WithScheduler(in_features=8, hidden=[16], num_classes=3), {}, "scheduler"),
        (boring_model, {"strategy": EditsGradients()}, "on_before_optimizer_step"),
        (boring_model, {"strategy": KeepsState()}, "client state"),
        (boring_model, {"strategy": ClientDependentLoss()}, "depends on the client"),
        (boring_model, {"strategy": SnapshotAtStart()}, "differs from the sequential"),
        (boring_model, {"precision": "bf16-mixed"}, "precision"),
    ],
    ids=["adam", "dropout", "batchnorm", "batchnorm-no-buffers", "weighted-loss", "random-op", "scheduler",
         "grad-hook", "client-state", "client-dependent-loss", "snapshot-hook", "bf16"],
)
def test_unsupported_setups_raise_before_training(tmp_path, model, options, match):
    with pytest.raises(VmapUnsupportedError, match=match) as info:
        fit(tmp_path, "vmap", model(), **options)
    assert "executor: sequential" in str(info.value)


def test_auto_picks_the_cross_entropy_program_only_when_it_is_exact(tmp_path):
    auto = VmapExecutor()
    assert auto.program is None
    fit(tmp_path / "plain", auto, boring_model())
    assert auto.program == "cross_entropy"
    weighted = VmapExecutor(loss="auto")
    with pytest.raises(VmapUnsupportedError, match="not a mean over examples"):
        fit(tmp_path / "weighted", weighted, ClassWeighted(in_features=8, hidden=[16], num_classes=3))


def test_forced_cross_entropy_program_refuses_other_losses(tmp_path):
    model = LogsAccuracy(in_features=8, hidden=[16], num_classes=3)
    with pytest.raises(VmapUnsupportedError, match="training_step logs"):
        fit(tmp_path, VmapExecutor(loss="cross_entropy"), model)


def test_unknown_loss_program_is_a_config_error():
    with pytest.raises(ValueError, match="trainer.executor.init_args.loss"):
        VmapExecutor(loss="mse")


def test_refuses_a_replaced_local_trainer():
    """Privacy mechanisms such as DP-SGD hand the executor their own LocalTrainer subclass."""

    class NoisyTrainer(LocalTrainer):
        pass

    model = boring_model()
    local = NoisyTrainer(model, ParamSpec.from_module(model), FedAvg())
    with pytest.raises(VmapUnsupportedError, match="NoisyTrainer"):
        VmapExecutor().setup(local)


def test_vmap_example_config_equals_the_sequential_run(tmp_path):
    """experiments/digits_vmap.yaml, two rounds, against the same config with the sequential executor."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from safetensors.torch import load_file

    config = Path(__file__).resolve().parents[2] / "experiments" / "digits_vmap.yaml"
    assert yaml.safe_load(config.read_text())["trainer"]["executor"] == "vmap"
    out = {}
    for executor in ("vmap", "sequential"):
        root = tmp_path / executor
        override = [] if executor == "vmap" else ["--trainer.executor", "sequential"]  # vmap: the config's own
        proc = subprocess.run(
            [sys.executable, "-m", "lightfed.cli", "fit", "--config", str(config), "--trainer.rounds", "2",
             "--trainer.fed_eval_fraction", "0.0", *override, "--trainer.logger", "false",
             "--trainer.default_root_dir", str(root)],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[executor] = load_file(str(root / "global_model.safetensors"))
    assert out["vmap"].keys() == out["sequential"].keys()
    for k, v in out["vmap"].items():
        torch.testing.assert_close(v, out["sequential"][k], atol=1e-5, rtol=0)
