"""Batches of any structure go through the one client loop: a tensor, a tuple, a dict, a BatchEncoding, nested.

Prepare / Execute / Assert: the same examples in the same seeded order, packed as a tuple and as something
else, must give bit-identical updates and metrics; batch sizes are counted from the structure; DP-SGD takes
dict batches; the vmap executor refuses what it cannot gather, in one line naming the fix.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.demos.boring_classes import BoringModel, DemoModel
from torch import nn
from torch.utils.data import Dataset

from lightfed.client import LocalTrainer
from lightfed.data.client_data import ClientData, DatasetClientData, LoaderSettings
from lightfed.executors.support import VmapUnsupportedError
from lightfed.executors.vmap import VmapExecutor
from lightfed.lightning_compat import batch_size_of
from lightfed.messages import RunInfo
from lightfed.params import ParamSpec
from lightfed.strategy import FedAvg


class TupleNet(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def unpack(self, batch):
        return batch[0], batch[1]

    def training_step(self, batch, batch_idx):
        x, y = self.unpack(batch)
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = self.unpack(batch)
        self.log("test_acc", (self.net(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.9)


class DictNet(TupleNet):
    def unpack(self, batch):
        return batch["x"], batch["y"]


class NestedNet(TupleNet):
    def unpack(self, batch):
        return batch["inputs"][0], batch["target"]


def tensors(n: int = 37):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


class Examples(Dataset):
    """A map-style dataset whose examples are ``pack(x_i, y_i)``."""

    def __init__(self, pack, n: int = 37):
        self.x, self.y = tensors(n)
        self.pack = pack

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.pack(self.x[i], self.y[i])


def visit(module, data, **kw):
    local = LocalTrainer(module, ParamSpec.from_module(module), FedAvg(), None, 2, None, 8, seed=0, **kw)
    start = local.spec.flatten(local.tensors).clone()
    update = local.fit_client(3, 1, data, start)
    return local, start, update


def reference():
    x, y = tensors()
    return visit(TupleNet(), ClientData((x, y), torch.arange(37)))


def same(a, b):
    assert torch.equal(a.delta, b.delta)
    assert a.metrics == pytest.approx(b.metrics, rel=1e-6) and a.num_steps == b.num_steps


def test_dict_batches_from_in_memory_tensors_equal_tuple_batches():
    x, y = tensors()
    local, start, ref = reference()
    keyed = ClientData((x, y), torch.arange(37), keys=("x", "y"))
    dict_local, _, got = visit(DictNet(), keyed)
    same(got, ref)
    params = start + ref.delta
    assert dict_local.evaluate(keyed, params) == local.evaluate(ClientData((x, y), torch.arange(37)), params)


@pytest.mark.parametrize(
    "module, pack",
    [(TupleNet, lambda x, y: (x, y)), (DictNet, lambda x, y: {"x": x, "y": y}),
     (NestedNet, lambda x, y: {"inputs": [x], "target": y})],
    ids=["tuple", "dict", "nested"],
)
def test_a_map_style_dataset_batched_by_its_collate_fn_equals_the_in_memory_path(module, pack):
    _, _, ref = reference()
    _, _, got = visit(module(), DatasetClientData(Examples(pack), torch.arange(37)))
    same(got, ref)


def test_batch_encoding_batches_from_a_collate_fn():
    transformers = pytest.importorskip("transformers")

    def collate(items):
        x = torch.stack([i[0] for i in items])
        return transformers.BatchEncoding({"x": x, "y": torch.stack([i[1] for i in items])})

    _, _, ref = reference()
    data = DatasetClientData(Examples(lambda x, y: (x, y)), torch.arange(37), LoaderSettings(collate_fn=collate))
    assert isinstance(next(data.batches(8)), transformers.BatchEncoding)
    _, _, got = visit(DictNet(), data)
    same(got, ref)


def test_batch_sizes_are_counted_from_the_structure():
    x = torch.zeros(5, 3)
    assert batch_size_of((x, x)) == 5 and batch_size_of(x) == 5 and batch_size_of({"a": {"b": x}}) == 5
    assert batch_size_of([x[:2], x[:2]]) == 2 and batch_size_of(()) == 0 and batch_size_of(torch.tensor(1.0)) == 1


def test_lightnings_demo_modules_train_unchanged_on_their_own_datasets():
    from lightning.pytorch.demos.boring_classes import RandomDataset

    from lightfed import lightning_hooks

    lightning_hooks._NOT_EVALUATED.discard(DemoModel)  # said once per class and process
    for cls in (BoringModel, DemoModel):
        torch.manual_seed(0)
        module = cls()
        data = DatasetClientData(RandomDataset(32, 64), torch.arange(64))
        said = pytest.warns(UserWarning, match="neither validation_step nor test_step")
        with said if cls is DemoModel else _nothing():
            local, start, update = visit(module, data)
        assert update.num_steps == 16 and float(update.delta.abs().sum()) > 0
        assert torch.isfinite(torch.tensor(update.metrics["loss"]))
        metrics = local.evaluate(data, start + update.delta)
        assert metrics == {}  # DemoModel has no evaluation step; BoringModel's steps log nothing


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_dpsgd_takes_dict_batches():
    pytest.importorskip("opacus")
    from lightfed.privacy import DPSGD
    from lightfed.sampling import FullParticipation

    x, y = tensors()
    runs = []
    for module, data in ((TupleNet(), ClientData((x, y), torch.arange(37))),
                         (DictNet(), DatasetClientData(Examples(lambda a, b: {"x": a, "y": b}), torch.arange(37)))):
        base = LocalTrainer(module, ParamSpec.from_module(module), FedAvg(), None, 1, None, 8, seed=0)
        mech = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, verbose=False)
        mech.setup(RunInfo(num_clients=1, sampler=FullParticipation(), rounds=1, strategy=FedAvg(), seed=0))
        local = mech.wrap_local_trainer(base)
        runs.append(local.fit_client(0, 0, data, local.spec.flatten(local.tensors).clone()))
    assert torch.allclose(runs[0].delta, runs[1].delta, atol=1e-6)


def test_vmap_refuses_dataset_and_dict_batches_naming_the_fix():
    x, y = tensors()
    for data, match in ((DatasetClientData(Examples(lambda a, b: (a, b)), torch.arange(37)), "map-style dataset"),
                        (ClientData((x, y), torch.arange(37), keys=("x", "y")), "batches are dicts")):
        module = TupleNet()
        local = LocalTrainer(module, ParamSpec.from_module(module), FedAvg(), None, 1, None, 8)
        ex = VmapExecutor()
        ex.setup(local)
        start = local.spec.flatten(local.tensors).clone()
        with pytest.raises(VmapUnsupportedError, match=f"{match}.*executor: sequential"):
            list(ex.run(0, [0], lambda c, data=data: data, start, {}, lambda c: {}))


def test_a_datamodule_with_keys_gives_dict_batches_to_clients_and_to_evaluation(tmp_path):
    from lightfed.data.datamodule import FederatedArrays, FederatedDataModule
    from lightfed.data.partition import IID
    from lightfed.trainer import FederatedTrainer

    class Keyed(FederatedDataModule):
        def load(self):
            x, y = tensors(60)
            return FederatedArrays((x[:40], y[:40]), (x[40:], y[40:]), y[:40], num_classes=3, keys=("x", "y"))

    data = Keyed(IID(4), val_fraction=0.25)
    batch = next(data.client_train(0).batches(4))
    assert set(batch) == {"x", "y"} and batch["x"].shape == (4, 6)
    trainer = FederatedTrainer(rounds=2, clients_per_round=2, batch_size=4, logger=False, checkpoint_every=0,
                               default_root_dir=str(tmp_path), fed_eval_fraction=0.5)
    history = trainer.fit(DictNet(), data)
    assert 0 <= history[-1]["central/test_acc"] <= 1 and "federated/test_acc_mean" in history[-1]

    class OneKeyTooFew(FederatedDataModule):
        def load(self):
            x, y = tensors(8)
            return FederatedArrays((x, y), (x, y), y, keys=("x",))

    with pytest.raises(ValueError, match=r"keys \['x'\] must name each of the 2 training and 2 test tensors"):
        OneKeyTooFew(IID(2)).setup()
