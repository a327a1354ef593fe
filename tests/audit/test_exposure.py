"""Secret-sharer exposure: ranks and bits by hand, the digit tree against scoring one by one, extraction."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lightfed.audit.exposure import (
    Canary,
    digit_secret_scores,
    exposure,
    exposure_from_scores,
    extrapolated_exposure,
    greedy_extracts,
    make_canaries,
    planted_lines,
    rank_of,
)
from tests.models.tiny_llama import build_tiny_llama


def test_exposure_by_hand() -> None:
    scores = torch.tensor([5.0, 1.0, 3.0, 3.0, 9.0, 0.5, 7.0, 8.0])  # |R| = 8
    assert rank_of(scores, 5) == 1 and exposure_from_scores(scores, 5) == 3.0  # the most likely: log2 |R|
    assert rank_of(scores, 4) == 8 and exposure_from_scores(scores, 4) == 0.0  # the least likely: 0 bits
    assert rank_of(scores, 2) == 3 and rank_of(scores, 3) == 3  # ties share the better rank
    assert exposure_from_scores(scores, 0) == pytest.approx(3 - math.log2(5))
    assert exposure(lambda: scores, 8, 1) == pytest.approx(3 - 1)
    with pytest.raises(ValueError, match="9 candidates"):
        exposure(lambda: scores, 9, 1)


def test_extrapolation_matches_the_exact_rank_on_a_smooth_distribution() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = 40 + 3 * torch.randn(100_000, generator=gen, dtype=torch.float64)
    secret = float(scores.sort().values[99])  # rank 100 of 100,000
    exact = math.log2(len(scores)) - math.log2(100)
    sample = scores[torch.randperm(len(scores), generator=gen)[:5000]]
    assert extrapolated_exposure(secret, sample) == pytest.approx(exact, abs=0.4)
    assert extrapolated_exposure(float(scores.median()), sample) == pytest.approx(1.0, abs=0.1)  # half below: 1 bit


def test_canaries_are_seeded_and_planted_per_speaker() -> None:
    a, b = make_canaries(2, 4, seed=3)
    assert make_canaries(2, 4, seed=3) == [a, b] and a != b and len(a.secret) == 4
    c = Canary("my PIN is", (7, 3, 9, 1))
    assert c.text == "my PIN is 7 3 9 1" and c.index == 7391 and c.space_size == 10_000
    plan = planted_lines([(c, ["hamlet/HAMLET"]), (a, ["hamlet/HAMLET", "macbeth/MACBETH"])], repeats=2)
    assert plan == {"hamlet/HAMLET": [c.text, c.text, a.text, a.text], "macbeth/MACBETH": [a.text, a.text]}


def test_digit_tree_equals_scoring_each_candidate(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_tiny_llama(tmp_path / "m")
    model, tok = AutoModelForCausalLM.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(str(folder))
    tree = digit_secret_scores(model, tok, "PIN", 2, batch_size=7)
    assert tree.shape == (100,)
    for i in (0, 7, 42, 99):
        text = "PIN" + "".join(f" {d}" for d in f"{i:02d}")
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        n_head = len(tok("PIN", add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]
        nats = -sum(logp[t - 1, ids[0, t]].item() for t in range(n_head, ids.shape[1]))
        assert tree[i].item() == pytest.approx(nats / math.log(2), rel=1e-6)  # float32 logits


class _Parrot:
    """A stand-in model whose greedy output is fixed."""

    training = False

    def __init__(self, continuation: list[int]) -> None:
        self.continuation = continuation

    def parameters(self):  # noqa: ANN201
        yield torch.zeros(1)

    def eval(self) -> None: ...

    def train(self, mode: bool = True) -> None: ...

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kw) -> torch.Tensor:  # noqa: ANN003
        return torch.cat([input_ids, torch.tensor([self.continuation[:max_new_tokens]])], 1)


def test_greedy_extraction(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(build_tiny_llama(tmp_path / "m")))
    c = Canary("PIN", (4, 2))
    right = tok(" 4 2!", add_special_tokens=False)["input_ids"]
    wrong = tok(" 4 3!", add_special_tokens=False)["input_ids"]
    assert greedy_extracts(_Parrot(right), tok, c) and not greedy_extracts(_Parrot(wrong), tok, c)
