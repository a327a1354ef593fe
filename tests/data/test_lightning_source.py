"""Any LightningDataModule or map-style dataset as federated data: lazy partitions, its collate_fn, its test loader."""

from __future__ import annotations

import pytest
import torch

from lightfed.data.client_data import DatasetClientData
from lightfed.data.datamodule import FederatedDataModule, LightningDataSource
from lightfed.data.partition import IID, Dirichlet, Explicit, Natural
from lightfed.data.speakers import SpeakerExamples, SpeakersDataModule, collate_dicts, label_of, speaker_of


def test_a_natural_key_gives_one_client_per_speaker_with_the_datamodules_collate():
    source = FederatedDataModule.from_datamodule(SpeakersDataModule(num_examples=100, num_speakers=5), Natural(),
                                                 key_fn=speaker_of)
    assert source.num_clients == 5 and source.client_num_examples().tolist() == [20] * 5
    part = source.client_train(2)
    assert isinstance(part, DatasetClientData) and sorted(part.indices.tolist()) == list(range(2, 100, 5))
    batch = next(part.batches(8, torch.Generator().manual_seed(0)))
    assert set(batch) == {"x", "y"} and batch["x"].shape == (8, 16)  # collate_dicts dropped the speaker
    test = source.test_data()
    assert len(test) == 400 and next(test.batches())["x"].shape == (64, 16)  # its own loader's batch size


def test_iid_dirichlet_and_explicit_lists_partition_by_index():
    dm = SpeakersDataModule(num_examples=200)
    iid = LightningDataSource(dm, IID(4))
    assert iid.client_num_examples().tolist() == [50] * 4
    skew = LightningDataSource(SpeakersDataModule(num_examples=200), Dirichlet(4, alpha=0.1), label_fn=label_of)
    labels, _ = skew.partition_labels()
    assert labels.tolist() == [label_of(SpeakerExamples(200)[i]) for i in range(200)]
    assert skew.client_num_examples().sum() == 200
    given = LightningDataSource(SpeakersDataModule(num_examples=10), Explicit([[0, 1, 2], [7, 9]]))
    assert given.client_train(1).indices.tolist() == [7, 9]


def test_labels_and_keys_read_from_a_column_equal_the_per_example_functions():
    by_fn = LightningDataSource(SpeakersDataModule(num_examples=90, num_speakers=7), Natural(), key_fn=speaker_of)
    by_column = LightningDataSource(SpeakersDataModule(num_examples=90, num_speakers=7), Natural(),
                                    group_key="speakers")
    by_fn.setup(), by_column.setup()
    assert by_fn.num_clients == 7 and torch.equal(by_fn.partition.indices, by_column.partition.indices)
    assert torch.equal(by_fn.partition.offsets, by_column.partition.offsets)
    skew_fn = LightningDataSource(SpeakersDataModule(num_examples=90), Dirichlet(3, alpha=0.3), label_fn=label_of)
    skew_targets = LightningDataSource(SpeakersDataModule(num_examples=90), Dirichlet(3, alpha=0.3))
    skew_fn.setup(), skew_targets.setup()
    assert torch.equal(skew_fn.partition.indices, skew_targets.partition.indices)
    with pytest.raises(ValueError, match="group_key='speaker'.*no attribute or column"):
        LightningDataSource(SpeakersDataModule(), Natural(), group_key="speaker").setup()


def test_what_a_partitioner_needs_is_asked_for_by_name():
    with pytest.raises(ValueError, match="neither data.key_fn"):
        LightningDataSource(SpeakersDataModule(), Natural())
    class NoTargets(SpeakersDataModule):
        def setup(self, stage=None):
            super().setup(stage)
            self.train_set = torch.utils.data.Subset(self.train_set, range(len(self.train_set)))

    with pytest.raises(ValueError, match="label_fn is not set"):
        LightningDataSource(NoTargets(), Dirichlet(2)).setup()
    with pytest.raises(ValueError, match="disjoint"):
        LightningDataSource(SpeakersDataModule(num_examples=10), Explicit([[0, 1], [1]])).setup()


def test_plain_datasets_and_the_federated_trainer_run_end_to_end(tmp_path):
    from lightfed.data.speakers import SpeakersClassifier
    from lightfed.trainer import FederatedTrainer

    source = FederatedDataModule.from_datasets(SpeakerExamples(120, num_speakers=6), IID(6),
                                               test=SpeakerExamples(40, offset=120), collate_fn=collate_dicts)
    trainer = FederatedTrainer(rounds=2, clients_per_round=3, batch_size=8, logger=False,
                               default_root_dir=str(tmp_path), checkpoint_every=0, fed_eval_fraction=0.0)
    history = trainer.fit(SpeakersClassifier(), source)
    assert len(history) == 2 and 0.0 <= history[-1]["central/test_acc"] <= 1.0


@pytest.mark.parametrize("name", ["BoringModel", "DemoModel"])
def test_lightnings_demo_modules_run_unchanged_through_the_federated_trainer(name, tmp_path):
    from lightning.pytorch.demos import boring_classes

    from lightfed.trainer import FederatedTrainer

    data = FederatedDataModule.from_datasets(boring_classes.RandomDataset(32, 64), IID(4),
                                             test=boring_classes.RandomDataset(32, 16), val_fraction=0.25)
    trainer = FederatedTrainer(rounds=2, clients_per_round=2, batch_size=4, logger=False, checkpoint_every=0,
                               default_root_dir=str(tmp_path), fed_eval_fraction=0.5)
    history = trainer.fit(getattr(boring_classes, name)(), data)  # DemoModel: warned once, no evaluation step
    assert len(history) == 2 and history[-1]["round/update_norm"] > 0
    assert not any(k.startswith(("central/", "federated/")) for k in history[-1])  # they log nothing when evaluated

