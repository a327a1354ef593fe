"""Secret-sharer exposure of planted canaries in a language model (Carlini et al., USENIX Security 2019).

A *canary* is a random secret ``s`` from a space ``R`` put in a format, e.g. ``"my PIN is 7 3 9 1"``:
prefix ``"my PIN is"``, secret ``(7, 3, 9, 1)`` from ``R = {0..9}^4``. It is planted in the training text (of
one client, or of ``k``, repeated ``r`` times). After training, every candidate ``c in R`` is scored by its
log-perplexity under the model given the prefix,

.. math::

    P_\\theta(c) = -\\log_2 \\Pr_\\theta(c_1 \\ldots c_n \\mid \\text{prefix}),

the *rank* of the planted secret is its position among all candidates sorted by ``P`` (rank 1: the model
prefers it to every other), and its *exposure* is

.. math::

    \\text{exposure}(s) = \\log_2 |R| - \\log_2 \\text{rank}(s) \\in [0, \\log_2 |R|].

A model that never saw ``s`` gives it a uniformly random rank: expected exposure about ``1/ln 2 = 1.44`` bits
and rarely more than a few bits; a memorised secret reaches ``log2 |R|``. The exact rank needs every
candidate scored (:func:`digit_secret_scores` does ``10^4`` in about ``1,111`` short forward passes by
walking the digit tree). For large spaces the paper's *extrapolation* (Section 4.3) fits a skew-normal
distribution to the scores of sampled candidates and reads exposure off its CDF,
``-log2 Pr[P(c) <= P(s)]`` (:func:`extrapolated_exposure`). *Extraction* asks the stronger question: does
greedy decoding from the prefix emit the secret (:func:`greedy_extracts`)?
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightfed.seeding import make_generator

__all__ = [
    "Canary", "digit_secret_scores", "exposure", "exposure_from_scores", "extrapolated_exposure", "greedy_extracts",
    "make_canaries", "planted_lines", "rank_of",
]


@dataclass(frozen=True)
class Canary:
    """A planted secret: ``prefix`` followed by the digits of ``secret``, each after a space.

    Attributes:
        prefix: The text before the secret (``"my PIN is"``).
        secret: The digits (``(7, 3, 9, 1)``).
    """

    prefix: str
    secret: tuple[int, ...]

    @property
    def text(self) -> str:
        """The planted sentence: ``"my PIN is 7 3 9 1"``."""
        return self.prefix + self.suffix

    @property
    def suffix(self) -> str:
        """The secret as it follows the prefix: ``" 7 3 9 1"``."""
        return "".join(f" {d}" for d in self.secret)

    @property
    def space_size(self) -> int:
        """``|R| = 10^len(secret)``."""
        return 10 ** len(self.secret)

    @property
    def index(self) -> int:
        """The secret as an integer in ``[0, |R|)`` (its digits read in base 10), the order of the candidates."""
        return int("".join(map(str, self.secret)))


def make_canaries(n: int, digits: int, seed: int, prefix: str = "my PIN is") -> list[Canary]:
    """``n`` canaries with secrets drawn uniformly from ``{0..9}^digits``, seeded by ``(seed, "canary", i)``."""
    out = []
    for i in range(n):
        gen = make_generator(seed, "canary", i)
        out.append(Canary(prefix, tuple(torch.randint(0, 10, (digits,), generator=gen).tolist())))
    return out


def rank_of(scores: Tensor, index: int) -> int:
    """Rank of candidate ``index`` among ``scores`` (log-perplexities, lower = more likely): 1 + #strictly lower."""
    return 1 + int((scores < scores[index]).sum())


def exposure_from_scores(scores: Tensor, index: int) -> float:
    """Exact exposure ``log2 |R| - log2 rank`` of candidate ``index``, given every candidate's log-perplexity."""
    return math.log2(len(scores)) - math.log2(rank_of(scores, index))


def exposure(score: Any, space_size: int, index: int) -> float:
    """Exact exposure with a scorer of all candidates: ``score() -> Tensor (|R|,)`` of log-perplexities."""
    scores = score()
    if len(scores) != space_size:
        raise ValueError(f"the scorer gave {len(scores)} scores for a canary space of {space_size} candidates.")
    return exposure_from_scores(scores, index)


def extrapolated_exposure(secret_score: float, sample_scores: Tensor) -> float:
    """The paper's estimate for large spaces: fit a skew-normal to sampled candidates' scores, ``-log2 CDF(P(s))``.

    Args:
        secret_score: The planted secret's log-perplexity.
        sample_scores: Log-perplexities of candidates drawn uniformly from ``R`` (thousands).

    Returns:
        Estimated exposure in bits (``log2 |R|`` caps the exact value; the estimate is not capped).
    """
    from scipy import stats

    a, loc, scale = stats.skewnorm.fit(sample_scores.double().numpy())
    log_cdf = float(stats.skewnorm.logcdf(secret_score, a, loc, scale))
    return -log_cdf / math.log(2)


@torch.no_grad()
def digit_secret_scores(model: Any, tokenizer: Any, prefix: str, digits: int, batch_size: int = 128) -> Tensor:
    """Log-perplexity (bits) of every digit string ``" d1 d2 ... dn"`` after ``prefix``, candidate ``i`` = ``i`` in base 10.

    Walks the digit tree: at depth ``j`` one forward pass per prefix of ``j`` digits (plus the separator)
    scores all ten children, so ``10^4`` candidates cost ``1 + 10 + 100 + 1000`` passes instead of ``10^4``.
    Needs every ``" d"`` to tokenize as the same separator tokens followed by one digit token, independently of
    what precedes it (true of SmolLM2's tokenizer and of character tokenizers); checked on the full strings.

    Args:
        model: A Hugging Face causal LM (or :class:`~lightfed.models.causal_lm.CausalLM`'s ``.model``).
        tokenizer: Its tokenizer.
        prefix: The canary's prefix.
        digits: Secret length ``n``.
        batch_size: Sequences per forward pass.

    Returns:
        ``(10^n,)`` float64 log-perplexities in bits.

    Raises:
        ValueError: the tokenizer splits the digits otherwise (score the candidates one by one instead).
    """
    encode = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    head = encode(prefix)
    pieces = [encode(f" {d}") for d in range(10)]
    sep = pieces[0][:-1]
    if any(p[:-1] != sep for p in pieces) or len({p[-1] for p in pieces}) != 10:
        raise ValueError(f"digit_secret_scores: the tokenizer does not write ' d' as one separator and one digit token: {pieces}.")
    digit_ids = torch.tensor([p[-1] for p in pieces])
    for probe in ("0" * digits, "7391"[:digits].ljust(digits, "5")):
        full = encode(prefix + "".join(f" {c}" for c in probe))
        if full != head + [t for c in probe for t in pieces[int(c)]]:
            raise ValueError("digit_secret_scores: the tokenizer merges the digits with their context; score one by one.")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores = torch.zeros(1, dtype=torch.float64)  # nats of each node at this depth
    for depth in range(digits):
        nodes = torch.arange(10**depth)
        seqs = []
        for node in nodes.tolist():
            ds = [int(c) for c in str(node).zfill(depth)] if depth else []
            seqs.append(head + [t for d in ds for t in pieces[d]] + sep)
        ids = torch.tensor(seqs, device=device)
        child = []
        for start in range(0, len(ids), batch_size):
            part = ids[start:start + batch_size]
            n_sep = len(sep)
            logp = torch.log_softmax(_last_logits(model, part, n_sep + 1).double(), -1)  # (B, n_sep + 1, V)
            sep_nll = torch.zeros(len(part), dtype=torch.float64, device=device)
            for j in range(n_sep):  # the separator tokens after the previous digit
                pos = part.shape[1] - n_sep + j
                sep_nll -= logp[:, j].gather(1, part[:, pos:pos + 1]).squeeze(1)
            child.append(sep_nll[:, None] - logp[:, -1, digit_ids.to(device)])
        scores = (scores[:, None] + torch.cat(child).cpu()).reshape(-1)
    model.train(was_training)
    return scores / math.log(2)


def _last_logits(model: Any, ids: Tensor, keep: int) -> Tensor:
    """Logits of the last ``keep`` positions only (``logits_to_keep`` spares the vocabulary projection elsewhere)."""
    try:
        logits = model(input_ids=ids, logits_to_keep=keep).logits
    except TypeError:  # a model without the argument
        logits = model(input_ids=ids).logits
    return logits[:, -keep:]


@torch.no_grad()
def greedy_extracts(model: Any, tokenizer: Any, canary: Canary) -> bool:
    """Whether greedy decoding of ``canary.prefix`` emits exactly the secret (``" 7 3 9 1"``) next."""
    enc = tokenizer(canary.prefix, return_tensors="pt", add_special_tokens=False)
    n = len(tokenizer(canary.text, add_special_tokens=False)["input_ids"]) - enc["input_ids"].shape[1]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids = model.generate(**enc.to(device), max_new_tokens=n, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    model.train(was_training)
    text = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return text.startswith(canary.suffix)


def planted_lines(plan: Sequence[tuple[Canary, Sequence[str]]], repeats: int) -> dict[str, list[str]]:
    """``data.planted`` for :class:`~lightfed.data.text.ShakespeareCausalDataModule`.

    Args:
        plan: ``(canary, speakers)`` pairs: the canary goes into the text of each speaker (1 or ``k`` of them).
        repeats: ``r``, how many times each speaker's text holds the canary.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    out: dict[str, list[str]] = {}
    for canary, speakers in plan:
        for speaker in speakers:
            out.setdefault(speaker, []).extend([canary.text] * repeats)
    return out
