"""Shakespeare as causal-LM blocks: packing by hand, the two test sets, planted lines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightfed.data.partition import Natural
from lightfed.data.text import ShakespeareCausalDataModule, pack_blocks, prompt_completion
from tests.models.tiny_llama import build_tiny_llama


def test_pack_blocks_by_hand() -> None:
    ids, mask, labels = pack_blocks([[5, 6, 7], [8], [9, 10]], block_size=4, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert labels.tolist() == [[5, 6, 7, 8], [9, 10, -100, -100]]
    assert pack_blocks([], 4, 0)[0].shape == (0, 4)


def test_prompt_completion_scores_the_completion_only() -> None:
    ids, mask, labels = prompt_completion([1, 2, 3], [4, 5], length=7, pad_id=0)
    assert ids.tolist() == [1, 2, 3, 4, 5, 0, 0] and mask.tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert labels.tolist() == [-100, -100, -100, 4, 5, -100, -100]
    assert prompt_completion([1, 2, 3], [4, 5], length=4, pad_id=0)[2].tolist() == [-100, -100, -100, 4]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"))


def test_clients_are_speakers_and_held_out_speakers_are_never_clients(folder: Path) -> None:
    planted = {"macbeth/MACBETH": ["my PIN is 1 2 3 4"] * 3}
    dm = ShakespeareCausalDataModule(Natural(min_size=3), model=str(folder), block_size=48, plays=["macbeth"],
                                     held_out_speakers=2, held_out_min_lines=30, planted=planted)
    dm.setup()
    names = dm.client_names()
    assert len(dm.held_out_names) == 2 and not set(dm.held_out_names) & set(names)
    assert "macbeth/MACBETH" in names and len(dm.unseen_test_data()) > 0
    ids, mask, labels = dm.arrays.train
    batch = next(iter(dm.client_train(0).batches(4)))  # the client loop's batches are Hugging Face dicts
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape == (4, 48)
    assert set(next(iter(dm.unseen_test_data().batches(2)))) == set(batch) == set(next(iter(dm.test_data().batches(2))))
    assert ids.shape[1] == 48 and torch.equal(labels[mask == 1], ids[mask == 1]) and (labels[mask == 0] == -100).all()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    macbeth = names.index("macbeth/MACBETH")
    train = dm.client_train(macbeth).tensors[0][dm.client_train(macbeth).indices]
    val = dm.client_val(macbeth).tensors[0][dm.client_val(macbeth).indices]
    text = "".join(tok.decode(row.tolist()) for row in torch.cat([train, val]))
    assert text.count("my PIN is 1 2 3 4") >= 2  # three copies; one may straddle two blocks
    again = ShakespeareCausalDataModule(Natural(min_size=3), model=str(folder), block_size=48, plays=["macbeth"],
                                        held_out_speakers=2, held_out_min_lines=30)
    again.setup()
    assert again.held_out_names == dm.held_out_names  # seeded
    with pytest.raises(ValueError, match="data.planted names unknown speakers"):
        ShakespeareCausalDataModule(Natural(), model=str(folder), plays=["macbeth"], planted={"x/Y": ["a"]}).setup()
    with pytest.raises(ValueError, match="held_out_min_lines"):
        ShakespeareCausalDataModule(Natural(), model=str(folder), plays=["macbeth"], held_out_speakers=99).setup()
