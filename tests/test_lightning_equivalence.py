"""One client with all the data, one visit of E epochs, equals ``lightning.Trainer.fit`` (issue 21).

FedAvg with server_lr 1 and one client sets the global model to the client's local model, so the visit
alone is compared: the same module trained by ``Trainer.fit`` on the same batches in the same order must end
with the same weights (and buffers) to 1e-6. Parametrised over module patterns real users write: manual
optimization (one and two optimizers), warm-up schedules built from ``estimated_stepping_batches`` in the
first (probe) ``configure_optimizers``, a frozen BatchNorm backbone in eval mode, dict batches, Lightning's
own BoringModel / DemoModel, and a LightningDataModule as the data source.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.demos.boring_classes import BoringModel, DemoModel, RandomDataset
from torch import nn

from lightfed.data.client_data import ClientData, DatasetClientData
from lightfed.data.datamodule import FederatedDataModule
from lightfed.data.partition import IID
from lightfed.data.speakers import SpeakersClassifier, SpeakersDataModule
from lightfed.lightning_hooks import ModuleHookError
from lightfed.messages import RunInfo
from tests.test_client_hooks import lightfed_fit, lightning_fit


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
        return F.cross_entropy(self.net(x), y)

    def test_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


class OneCycle(Net):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.2)
        total = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Warmup(Net):
    """transformers' ``get_linear_schedule_with_warmup`` written as a LambdaLR."""

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=0.05)
        total = self.trainer.estimated_stepping_batches
        warm = max(1, total // 5)
        fn = lambda s: s / warm if s < warm else max(0.0, (total - s) / max(1, total - warm))  # noqa: E731
        return [opt], [{"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, fn), "interval": "step"}]


class Linear(Net):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.2)
        sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=self.trainer.estimated_stepping_batches)
        return [opt], [{"scheduler": sched, "interval": "step"}]


class FrozenBN(L.LightningModule):
    """A pretrained backbone with BatchNorm, frozen and in eval mode; only the head trains."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.backbone[1].running_mean.fill_(0.5)
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.head = nn.Linear(8, 3)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.head(self.backbone(batch[0])), batch[1])

    def test_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.3)


class Manual(Net):
    """Manual optimization, one optimizer, a per-step scheduler the module steps itself (SAM-like modules)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt, sched = self.optimizers(), self.lr_schedulers()
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        sched.step()
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)]


class TwoOptimizers(Net):
    """Manual optimization with two optimizers toggled in turn (GAN-style)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        for opt in (first, second):
            self.toggle_optimizer(opt)
            loss = F.cross_entropy(self.net(batch[0]), batch[1])
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            self.untoggle_optimizer(opt)
        self.log("lr", first.param_groups[0]["lr"])
        return loss

    def configure_optimizers(self):
        return (torch.optim.SGD(self.net[0].parameters(), lr=0.2),
                torch.optim.Adam(self.net[2].parameters(), lr=0.01))


def examples(n: int = 37) -> ClientData:
    g = torch.Generator().manual_seed(1)
    return ClientData((torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)), torch.arange(n))


def state(module: nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in module.state_dict().values()])


def compare(cls, data, epochs: int = 3, batch_size: int = 8) -> tuple[L.LightningModule, L.LightningModule]:
    theirs = cls()
    ours = copy.deepcopy(theirs)
    lightning_fit(theirs, data, batch_size, epochs)
    local, params = lightfed_fit(ours, data, batch_size, epochs)
    local.spec.assign(local.tensors, params)
    assert torch.allclose(state(ours), state(theirs), atol=1e-6), float((state(ours) - state(theirs)).abs().max())
    return theirs, ours


@pytest.mark.parametrize("cls", [Net, OneCycle, Warmup, Linear, FrozenBN, Manual, TwoOptimizers],
                         ids=lambda c: c.__name__)
def test_one_client_one_round_equals_trainer_fit(cls):
    theirs, ours = compare(cls, examples())
    if cls is FrozenBN:
        assert not ours.backbone.training and float(ours.backbone[1].running_mean[0]) == 0.5


def test_dict_batches_equal_trainer_fit():
    x, y = examples().tensors
    compare(Net, ClientData((x, y), torch.arange(37), keys=("x", "y")))


@pytest.mark.parametrize("cls", [BoringModel, DemoModel])
def test_lightnings_demo_modules_equal_trainer_fit(cls):
    torch.manual_seed(0)
    compare(cls, DatasetClientData(RandomDataset(32, 40), torch.arange(40)), epochs=2)


def test_a_lightning_datamodule_source_equals_trainer_fit():
    source = FederatedDataModule.from_datamodule(SpeakersDataModule(num_examples=60, num_speakers=3), IID(1))
    compare(SpeakersClassifier, source.client_train(0), epochs=2)


def test_estimated_stepping_batches_is_right_at_the_first_configure_optimizers():
    seen = []

    class Reads(Net):
        def configure_optimizers(self):
            seen.append(self.trainer.estimated_stepping_batches)
            return super().configure_optimizers()

    lightfed_fit(Reads(), examples(37), 8, 3, accumulate_grad_batches=2)
    assert seen == [9]  # 3 epochs x ceil(5 batches / 2)


def test_the_stand_in_answers_common_calls():
    seen = {}

    class Asks(Net):
        def on_train_batch_start(self, batch, batch_idx):
            self.print("visit", self.trainer.client_id)
            seen.update(rank=self.global_rank, zero=self.trainer.is_global_zero, world=self.trainer.world_size,
                        batches=self.trainer.num_training_batches, lr=self.optimizers().param_groups[0]["lr"],
                        local=self.local_rank)

    lightfed_fit(Asks(), examples(37), 8, 1)
    assert seen == dict(rank=0, zero=True, world=1, batches=5, lr=0.2, local=0)


def test_errors_in_user_hooks_name_the_hook_and_keep_the_message():
    class Broken(Net):
        def configure_optimizers(self):
            raise KeyError("lr missing from hparams")

    message = r"^Broken\.configure_optimizers raised KeyError: 'lr missing from hparams'$"
    with pytest.raises(ModuleHookError, match=message):
        lightfed_fit(Broken(), examples(), 8, 1)

    class Deep(Net):
        def training_step(self, batch, batch_idx):
            return self.helper(batch)

        def helper(self, batch):
            raise RuntimeError("shape\nmismatch")

    with pytest.raises(ModuleHookError, match=r"^Deep\.training_step raised RuntimeError: shape mismatch$"):
        lightfed_fit(Deep(), examples(), 8, 1)


def test_a_module_without_evaluation_steps_trains_says_so_and_evaluates_to_nothing():
    from lightfed import lightning_hooks

    lightning_hooks._NOT_EVALUATED.discard(DemoModel)  # said once per class and process
    with pytest.warns(UserWarning, match="neither validation_step nor test_step"):
        local, params = lightfed_fit(DemoModel(), DatasetClientData(RandomDataset(32, 16), torch.arange(16)), 4, 1)
    assert local.evaluate(DatasetClientData(RandomDataset(32, 8), torch.arange(8)), params) == {}


def test_the_cli_prints_a_hook_error_on_one_line(capsys):
    from lightfed.cli import plain_errors

    class Broken(Net):
        def configure_optimizers(self):
            raise KeyError("lr")

    with pytest.raises(SystemExit), plain_errors():
        lightfed_fit(Broken(), examples(), 8, 1)
    assert capsys.readouterr().err == "lightfed: error: Broken.configure_optimizers raised KeyError: 'lr'\n"


def test_manual_optimization_is_refused_by_dpsgd_and_vmap_and_composes_with_client_dp_and_secagg(tmp_path):
    from lightfed.client import LocalTrainer
    from lightfed.executors.support import VmapUnsupportedError
    from lightfed.executors.vmap import VmapExecutor
    from lightfed.params import ParamSpec
    from lightfed.privacy import DPSGD, DPFixedClipping
    from lightfed.sampling import FullParticipation
    from lightfed.secagg import SecAggPlus
    from lightfed.strategy import FedAvg
    from lightfed.trainer import FederatedTrainer

    module = Manual()
    local = LocalTrainer(module, ParamSpec.from_module(module), FedAvg())
    mech = DPSGD(noise_multiplier=1.0, verbose=False)
    mech.setup(RunInfo(num_clients=1, sampler=FullParticipation(), rounds=1, strategy=FedAvg(), seed=0))
    with pytest.raises(ValueError, match="manual optimization.*DPSGD"):
        mech.wrap_local_trainer(local)
    with pytest.raises(VmapUnsupportedError, match="manual optimization.*executor: sequential"):
        VmapExecutor().setup(local)

    class ManualDict(Manual):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch["x"], batch["y"]), batch_idx)

    source = FederatedDataModule.from_datamodule(SpeakersDataModule(num_examples=80, num_speakers=8, dim=6,
                                                                    num_classes=3), IID(8))
    for i, extra in enumerate((dict(privacy=DPFixedClipping(clip_norm=1.0, noise_multiplier=0.5, verbose=False),
                       strategy=FedAvg(weighted=False)),
                  dict(secure_aggregation=SecAggPlus(clip=1.0, max_weight=16.0)))):
        trainer = FederatedTrainer(rounds=1, clients_per_round=4, batch_size=8, logger=False, checkpoint_every=0,
                                   default_root_dir=str(tmp_path / str(i)), fed_eval_fraction=0.0, **extra)
        history = trainer.fit(ManualDict(), source)
        assert len(history) == 1 and history[0]["round/updates"] == 4 and history[0]["round/update_norm"] > 0
