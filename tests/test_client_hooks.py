"""The client loop honours the LightningModule contract: hooks in ``lightning.Trainer``'s order, its flags.

The reference is ``lightning.Trainer.fit`` run here on one client's batches (in the order lightfed uses), not
a list written from memory. A probe module records every hook call; the same visit through lightfed's loop
must give the same sequence, and with clipping, accumulation and schedulers the same weights.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from lightfed.client import EVAL_HOOKS, REUSABLE_OPTIMIZERS, TRAIN_HOOKS, LocalTrainer
from lightfed.data.client_data import ClientData
from lightfed.lightning_compat import TrainerStandInError
from lightfed.lightning_hooks import ModuleHookError
from lightfed.messages import RunInfo
from lightfed.params import ParamSpec
from lightfed.seeding import make_generator
from lightfed.strategy import FedAvg

PROBED = tuple(TRAIN_HOOKS) + tuple(h.format(stage=s) for h in EVAL_HOOKS for s in ("validation", "test"))

#: Hooks that lightfed's loop calls differently from ``Trainer.fit``, by design (docs/lightning_contract.md).
#: With one client visit and Lightning's defaults there is none left in the recorded sequence: these are
#: the differences a longer run shows, listed so that the tests below state them.
DOCUMENTED_DIFFERENCES = {
    "configure_optimizers": "called once per run when the optimizer can be reset exactly (reuse_optimizer), "
                            "else once per visit; Trainer.fit calls it once per fit",
    "on_fit_start/on_train_start/on_train_end/on_fit_end": "once per client visit (a visit is one fit)",
    "current_epoch/global_step": "count within the visit: every visit starts at epoch 0, step 0",
}


def _recorder(name: str) -> Any:
    def hook(self: Probe, *args: Any, **kwargs: Any) -> Any:
        idx = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
        self.calls.append((name, *idx[-1:], self.current_epoch, self.global_step))
        return getattr(L.LightningModule, name)(self, *args, **kwargs)

    hook.__name__ = name
    return hook


class Probe(L.LightningModule):
    """Records every hook lightfed may call (and its ``current_epoch`` / ``global_step`` at the time)."""

    def __init__(self, lr: float = 0.5, scheduler: str | None = "step", frequency: int = 1, optimizer: str = "SGD"):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.lr, self.scheduler, self.frequency, self.optimizer = lr, scheduler, frequency, optimizer
        self.calls: list[tuple] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.calls.append(("training_step", batch_idx, self.current_epoch, self.global_step))
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.calls.append(("validation_step", batch_idx, self.current_epoch, self.global_step))
        self.log("val_acc", (self(batch[0]).argmax(-1) == batch[1]).float().mean())

    def test_step(self, batch, batch_idx):
        self.calls.append(("test_step", batch_idx, self.current_epoch, self.global_step))
        self.log("test_acc", (self(batch[0]).argmax(-1) == batch[1]).float().mean())

    def configure_optimizers(self):
        self.calls.append(("configure_optimizers",))
        if self.optimizer == "SGD":
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        else:
            opt = getattr(torch.optim, self.optimizer)(self.parameters(), lr=self.lr / 10)
        if self.scheduler is None:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.scheduler,
                                                   "frequency": self.frequency}}


for _name in PROBED:
    setattr(Probe, _name, _recorder(_name))


class Plain(L.LightningModule):
    """Overrides no hook: the loop's fast path."""

    def __init__(self, optimizer: str = "SGD", momentum: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.optimizer, self.momentum = optimizer, momentum

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        if self.optimizer == "SGD":
            return torch.optim.SGD(self.parameters(), lr=0.3, momentum=self.momentum, weight_decay=1e-3)
        return getattr(torch.optim, self.optimizer)(self.parameters(), lr=0.01)


def client(n: int = 37, seed: int = 1) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    return ClientData((torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)), torch.arange(n))


class EpochBatches:
    """What lightfed's client visit iterates, epoch after epoch, as a Lightning train dataloader.

    The epoch comes from the module's Trainer (Lightning also iterates the loader once while setting up).
    """

    def __init__(self, data: ClientData, batch_size: int, module: L.LightningModule, seed: int = 0):
        self.data, self.batch_size, self.module, self.seed = data, batch_size, module, seed

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def __iter__(self):
        gen = make_generator(self.seed, "batches", 0, 0, self.module.current_epoch)  # round 0, client 0
        return iter(list(self.data.batches(self.batch_size, gen)))


class Loader:
    """A fixed list of batches as one Lightning dataloader (a bare list would be read as several)."""

    def __init__(self, batches: list[Any]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def lightning_fit(module: L.LightningModule, data: ClientData, batch_size: int, epochs: int, **flags: Any):
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, deterministic=False, **flags,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=EpochBatches(data, batch_size, module))
    return trainer


def lightfed_fit(module: nn.Module, data: ClientData, batch_size: int, epochs: int, **flags: Any):
    spec = ParamSpec.from_module(module)
    local = LocalTrainer(module, spec, FedAvg(), None, epochs, None, batch_size, seed=0, **flags)
    start = spec.flatten(local.tensors).clone()
    update = local.fit_client(0, 0, data, start)
    return local, start + update.delta


def test_one_visit_calls_the_hooks_in_lightning_trainer_fit_order():
    data = client(37)
    theirs, ours = Probe(), Probe()
    lightning_fit(theirs, data, 8, 2, accumulate_grad_batches=2, gradient_clip_val=0.5)
    lightfed_fit(ours, data, 8, 2, accumulate_grad_batches=2, gradient_clip_val=0.5)
    assert len(theirs.calls) > 60
    assert ours.calls == theirs.calls  # no difference left for one visit (see DOCUMENTED_DIFFERENCES)


@pytest.mark.parametrize("stage", ["validation", "test"])
def test_evaluation_calls_the_stage_hooks_in_lightning_order(stage):
    data = client(20)
    theirs, ours = Probe(), Probe()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    run = trainer.validate if stage == "validation" else trainer.test
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(theirs, dataloaders=Loader(list(data.batches(8))), verbose=False)
    local = LocalTrainer(ours, ParamSpec.from_module(ours), FedAvg())
    metrics = local.evaluate(data, ParamSpec.from_module(ours).flatten(local.tensors), "val" if stage == "validation" else "test", 8)
    assert ours.calls == theirs.calls
    assert set(metrics) == {"val_acc" if stage == "validation" else "test_acc"}
    assert ours.training  # put back in training mode by on_{stage}_model_train


@pytest.mark.parametrize(
    "scheduler, frequency, algorithm, accumulate",
    [("step", 1, "norm", 2), ("step", 2, "value", 3), ("epoch", 1, "norm", 1), (None, 1, "value", 2)],
)
def test_clipping_accumulation_and_schedulers_give_lightning_trainer_fit_weights(scheduler, frequency, algorithm, accumulate):
    data = client(37)
    theirs = Probe(scheduler=scheduler, frequency=frequency)
    ours = copy.deepcopy(theirs)
    flags = dict(gradient_clip_val=0.05, gradient_clip_algorithm=algorithm, accumulate_grad_batches=accumulate)
    lightning_fit(theirs, data, 8, 3, **flags)
    _, local_weights = lightfed_fit(ours, data, 8, 3, **flags)
    expected = ParamSpec.from_module(theirs).flatten(list(theirs.parameters()))
    torch.testing.assert_close(local_weights, expected, rtol=1e-5, atol=1e-6)
    moved = local_weights - ParamSpec.from_module(Probe()).flatten(list(Probe().parameters()))
    assert float(moved.abs().max()) > 1e-3  # it trained


def test_plain_module_takes_the_fast_path_and_matches_lightning():
    data = client(37)
    theirs = Plain(momentum=0.9)
    ours = copy.deepcopy(theirs)
    lightning_fit(theirs, data, 8, 2)
    local, weights = lightfed_fit(ours, data, 8, 2)
    assert local.hooks.overridden == frozenset()
    assert all(getattr(local._calls, h) is None for h in TRAIN_HOOKS) and not local._calls.transfer
    expected = ParamSpec.from_module(theirs).flatten(list(theirs.parameters()))
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", [cls.__name__ for cls in REUSABLE_OPTIMIZERS])
def test_a_reused_optimizer_is_bit_identical_to_a_fresh_one(optimizer):
    fresh, reused = Plain(optimizer, momentum=0.9), Plain(optimizer, momentum=0.9)
    spec = ParamSpec.from_module(fresh)
    a = LocalTrainer(fresh, spec, FedAvg(), None, 2, None, 8, reuse_optimizer=False)
    b = LocalTrainer(reused, ParamSpec.from_module(reused), FedAvg(), None, 2, None, 8)
    start = spec.flatten(a.tensors).clone()
    for cid in range(3):  # the later visits run on the reset optimizer
        ua = a.fit_client(cid, 0, client(21 + cid, seed=cid), start)
        ub = b.fit_client(cid, 0, client(21 + cid, seed=cid), start)
        assert torch.equal(ua.delta, ub.delta), (optimizer, cid)
    assert b._reusable is not None and a._reusable is None


def test_the_reused_optimizer_skips_torch_profiler_ranges_only_while_nothing_observes_them():
    module = Plain("SGD", momentum=0.9)
    local = LocalTrainer(module, ParamSpec.from_module(module), FedAvg(), None, 1, None, 8)
    start = local.spec.flatten(local.tensors).clone()
    quiet = local.fit_client(0, 0, client(21), start)  # 3 steps; the first visit builds the reused optimizer
    assert local._lean is not None and not local._lean.observed()
    quiet = local.fit_client(0, 0, client(21), start)  # a visit on the lean path
    seen: list[str] = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append("global"))
    own = local._lean.optimizer.register_step_post_hook(lambda opt, args, kwargs: seen.append("own"))
    try:
        hooked = local.fit_client(0, 0, client(21), start)
    finally:
        handle.remove()
        own.remove()
    assert seen == ["global", "own"] * 3  # every step went through optimizer.step() while hooks were registered
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        profiled = local.fit_client(0, 0, client(21), start)
    names = [e.name for e in prof.events()]
    assert names.count("Optimizer.step#SGD.step") == 3 and names.count("Optimizer.zero_grad#SGD.zero_grad") == 3
    assert not local._lean.observed()
    assert torch.equal(quiet.delta, hooked.delta) and torch.equal(quiet.delta, profiled.delta)


def test_configure_optimizers_is_called_per_visit_when_the_optimizer_cannot_be_reset():
    module = Probe(scheduler="step")  # a scheduler: fresh optimizer and scheduler every visit
    local, _ = lightfed_fit(module, client(10), 8, 1)
    local.fit_client(1, 0, client(10, seed=3), local.spec.flatten(local.tensors).clone())
    assert [c for c in module.calls if c[0] == "configure_optimizers"] == [("configure_optimizers",)] * 2
    plain = Probe(scheduler=None)
    local, _ = lightfed_fit(plain, client(10), 8, 1)
    local.fit_client(1, 0, client(10, seed=3), local.spec.flatten(local.tensors).clone())
    assert [c for c in plain.calls if c[0] == "configure_optimizers"] == [("configure_optimizers",)]


def test_self_trainer_is_a_stand_in_that_names_what_it_lacks():
    seen = {}

    class Reads(Plain):
        def on_train_batch_start(self, batch, batch_idx):
            t = self.trainer
            seen.update(epoch=self.current_epoch, step=self.global_step, clip=t.gradient_clip_val,
                        steps=t.estimated_stepping_batches, client=t.client_id, device=self.device)

        def on_train_epoch_end(self):
            self.trainer.datamodule  # noqa: B018 - no such thing on the stand-in

    module = Reads()
    local = LocalTrainer(module, ParamSpec.from_module(module), FedAvg(), None, 2, None, 8, gradient_clip_val=1.0)
    with pytest.raises(ModuleHookError, match=r"Reads\.on_train_epoch_end raised TrainerStandInError: "
                                              r"self\.trainer\.datamodule.*without a lightning\.Trainer") as info:
        local.fit_client(4, 0, client(20), local.spec.flatten(local.tensors).clone())
    assert isinstance(info.value.__cause__, TrainerStandInError) and info.value.hook == "on_train_epoch_end"
    assert seen == dict(epoch=0, step=2, clip=1.0, steps=6, client=4, device=torch.device("cpu"))
    assert module._trainer is None  # detached after the visit, even after an error


@pytest.mark.parametrize(
    "hook, match",
    [("optimizer_step", "optimizer_step.*on_before_optimizer_step"), ("backward", "backward"),
     ("setup", "setup.*__init__"), ("configure_callbacks", "lightfed.Callback"),
     ("on_save_checkpoint", "state_dict")],
)
def test_hooks_the_loop_cannot_honour_are_refused_at_set_up_by_name(hook, match):
    module = type("Refused", (Plain,), {hook: lambda self, *a, **k: None})()
    with pytest.raises(ValueError, match=match):
        LocalTrainer(module, ParamSpec.from_module(module), FedAvg())


def test_clipping_under_manual_optimization_several_automatic_optimizers_and_plateau_are_refused():
    class Manual(Plain):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    for flags in (dict(gradient_clip_val=1.0), dict(accumulate_grad_batches=2)):
        with pytest.raises(ValueError, match=f"automatic_optimization=False.*{next(iter(flags))}"):
            LocalTrainer(Manual(), ParamSpec.from_module(Manual()), FedAvg(), **flags)

    class Two(Plain):
        def configure_optimizers(self):
            return [torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.SGD(self.parameters(), lr=0.1)], []

    class Plateau(Plain):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt)}

    for cls, match in ((Two, "2 optimizers"), (Plateau, "ReduceLROnPlateau")):
        module = cls()
        local = LocalTrainer(module, ParamSpec.from_module(module), FedAvg())
        with pytest.raises(ValueError, match=match):
            local.fit_client(0, 0, client(10), local.spec.flatten(local.tensors).clone())


@pytest.mark.parametrize("flags", [dict(gradient_clip_val=-1.0), dict(gradient_clip_algorithm="l1"),
                                   dict(accumulate_grad_batches=0)])
def test_bad_flags_are_refused(flags):
    with pytest.raises(ValueError, match=next(iter(flags))):
        LocalTrainer(Plain(), ParamSpec.from_module(Plain()), FedAvg(), **flags)


# ---------------------------------------------------------------------------------------- DP-SGD and vmap
class NoGradientHooks(Probe):
    """The probe without the hooks DP-SGD refuses (they see or edit the non-private gradient)."""

    on_after_backward = L.LightningModule.on_after_backward
    on_before_optimizer_step = L.LightningModule.on_before_optimizer_step
    configure_gradient_clipping = L.LightningModule.configure_gradient_clipping


def _dpsgd(local: LocalTrainer):
    from lightfed.privacy import DPSGD
    from lightfed.sampling import FullParticipation

    mech = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, verbose=False)
    mech.setup(RunInfo(num_clients=1, sampler=FullParticipation(), rounds=1, strategy=FedAvg(), seed=0))
    return mech.wrap_local_trainer(local)


def test_dpsgd_runs_the_same_loop_and_hooks_with_poisson_batches():
    pytest.importorskip("opacus")
    data = client(32)  # round(n / B) = ceil(n / B): the same number of batches per epoch both ways
    plain, private = NoGradientHooks(), NoGradientHooks()
    lightfed_fit(plain, data, 8, 2)
    local = _dpsgd(LocalTrainer(private, ParamSpec.from_module(private), FedAvg(), None, 2, None, 8))
    update = local.fit_client(0, 0, data, local.spec.flatten(local.tensors).clone())
    assert update.metrics["dp_steps"] == 8.0 and update.num_steps == 8

    def names(calls):  # Poisson batches: training_step is skipped for an empty batch (documented)
        return [c[0] for c in calls if c[0] != "training_step"]

    assert names(private.calls) == names(plain.calls)
    assert not any(hasattr(p, "grad_sample") for p in private.parameters())


@pytest.mark.parametrize(
    "flags, module, match",
    [(dict(gradient_clip_val=1.0), Plain, "max_grad_norm"), (dict(accumulate_grad_batches=2), Plain, "Poisson batch"),
     ({}, Probe, "configure_gradient_clipping, which sees or edits the summed gradient")],
)
def test_dpsgd_refuses_what_it_cannot_honour(flags, module, match):
    pytest.importorskip("opacus")
    m = module()
    with pytest.raises(ValueError, match=match):
        _dpsgd(LocalTrainer(m, ParamSpec.from_module(m), FedAvg(), **flags))


@pytest.mark.parametrize(
    "flags, module, match",
    [(dict(gradient_clip_val=1.0), Plain, "does not clip"), (dict(accumulate_grad_batches=2), Plain, "every batch"),
     ({}, Probe, "on_fit_start.*no per-client training hook")],
)
def test_vmap_refuses_what_it_cannot_honour(flags, module, match):
    from lightfed.executors import VmapExecutor, VmapUnsupportedError

    m = module()
    with pytest.raises(VmapUnsupportedError, match=match):
        VmapExecutor().setup(LocalTrainer(m, ParamSpec.from_module(m), FedAvg(), **flags))


def test_vmap_accepts_evaluation_hooks():
    from lightfed.executors import VmapExecutor

    class EvalOnly(Plain):
        def on_validation_epoch_end(self):
            pass

    m = EvalOnly()
    VmapExecutor().setup(LocalTrainer(m, ParamSpec.from_module(m), FedAvg()))


def test_dpsgd_visit_does_not_call_torch_manual_seed(monkeypatch):
    """The per-visit torch.manual_seed (~0.7 ms: it queues every accelerator backend's seeding) is gone."""
    pytest.importorskip("opacus")
    m = Plain()
    local = _dpsgd(LocalTrainer(m, ParamSpec.from_module(m), FedAvg(), None, 1, None, 8))
    start = local.spec.flatten(local.tensors).clone()
    monkeypatch.setattr(torch, "manual_seed", lambda *a: pytest.fail("torch.manual_seed called per visit"))
    local.fit_client(0, 0, client(16), start)


def test_a_gradient_scaler_is_unscaled_before_the_hooks_and_the_clip():
    """Under 16-mixed the module's on_before_optimizer_step and the clip see true (unscaled) gradients."""
    order = []

    class Scaled:  # the parts of Fabric's MixedPrecision the loop uses
        scaler = object()

        def forward_context(self):
            return torch.autocast("cpu", enabled=False)

        def backward(self, loss, module):
            loss.backward()

        def unscale_gradients(self, optimizer):
            order.append("unscale")

        def optimizer_step(self, optimizer):
            order.append("step")
            optimizer.step()

    class Hooked(Plain):
        def on_before_optimizer_step(self, optimizer):
            order.append("on_before_optimizer_step")

    m = Hooked()
    local = LocalTrainer(m, ParamSpec.from_module(m), FedAvg(), Scaled(), 1, None, 8)
    local.fit_client(0, 0, client(16), local.spec.flatten(local.tensors).clone())
    assert order == ["unscale", "on_before_optimizer_step", "step"] * 2


def test_a_skipped_batch_is_a_step_without_gradient_as_in_lightning():
    """training_step returning None: Lightning still zeroes, calls the step hooks and steps (global_step counts
    it; with no gradient nothing moves). The client then reports no loss rather than a made-up 0."""

    class Skips(Probe):
        def training_step(self, batch, batch_idx):
            self.calls.append(("training_step", batch_idx, self.current_epoch, self.global_step))

    data = client(20)
    theirs, ours = Skips(scheduler=None), Skips(scheduler=None)
    assert lightning_fit(theirs, data, 8, 1).global_step == 3
    spec = ParamSpec.from_module(ours)
    local = LocalTrainer(ours, spec, FedAvg(), None, 1, None, 8)
    update = local.fit_client(0, 0, data, spec.flatten(local.tensors).clone())
    assert ours.calls == theirs.calls
    assert update.num_steps == 3 and "loss" not in update.metrics and float(update.delta.abs().max()) == 0.0
