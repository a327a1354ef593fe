"""Membership inference on a released model: the loss-threshold attack and offline LiRA, example- and client-level.

Yeom, Giacomelli, Fredrikson & Jha (CSF 2018), "Privacy Risk in Machine Learning": an example the model was
trained on tends to have a lower loss, so ``-loss`` is a membership score. Members are the training examples
of the federation's clients; non-members are the central test set (never trained on). Client-level ("user")
inference scores a client by the mean score of its examples, against pseudo-clients of the same size drawn
from the test set.

Offline LiRA (Carlini, Chien, Nasr, Song, Terzis & Tramer, S&P 2022, "Membership Inference Attacks From First
Principles", Sec. VI-C): shadow models are trained like the target on random subsets of a pool of candidate
examples; for each example, the shadows that did *not* train on it ("OUT") give a Gaussian
``N(mu_i, sigma_i^2)`` of its logit-scaled confidence ``phi = log(p_y / (1 - p_y))``. The one-sided likelihood
test scores the target model's ``phi_i`` by ``Lambda_i = Phi((phi_i - mu_i) / sigma_i)``, the probability that an
OUT model would be *less* confident: members are trained on, so they sit in the upper tail. With few shadows the
per-example variance is noisy; the paper then fixes one variance for all examples (``fix_variance``), which
:func:`lira_offline` does by default.

Reported, as Carlini et al. (S&P 2022, "Membership Inference Attacks From First Principles") ask: the AUC and
the true-positive rate at 0.1% and 1% false-positive rate (an attack that is right about a few examples with
confidence is a real leak even at AUC near 0.5). A score is an attack's success on this model, not a bound.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightfed.seeding import make_generator


@dataclass(frozen=True)
class AttackResult:
    """An attack's ROC summary: AUC, TPR at 0.1% and 1% FPR with 95% Clopper-Pearson intervals, and the counts
    it was computed from.

    A TPR at an FPR below ``1 / non_members`` is not measured (``None``): with 100 non-members the smallest
    non-zero FPR is 1%, so "TPR at 0.1% FPR" would be the TPR at zero false positives, read as something else.
    """

    auc: float
    tpr_at_0_1_fpr: float | None
    tpr_at_1_fpr: float | None
    members: int
    non_members: int
    tpr_at_0_1_fpr_ci: tuple[float, float] | None = None
    tpr_at_1_fpr_ci: tuple[float, float] | None = None

    def as_dict(self, prefix: str = "") -> dict[str, Any]:
        return {f"{prefix}auc": self.auc, f"{prefix}tpr@0.1%fpr": self.tpr_at_0_1_fpr,
                f"{prefix}tpr@0.1%fpr_ci95": _list(self.tpr_at_0_1_fpr_ci),
                f"{prefix}tpr@1%fpr": self.tpr_at_1_fpr,
                f"{prefix}tpr@1%fpr_ci95": _list(self.tpr_at_1_fpr_ci),
                f"{prefix}members": float(self.members), f"{prefix}non_members": float(self.non_members)}


def _list(ci: tuple[float, float] | None) -> list[float] | None:
    return None if ci is None else [ci[0], ci[1]]


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson 1934) two-sided interval of a binomial proportion from ``k`` of ``n``.

    ``[B(a/2; k, n-k+1), B(1-a/2; k+1, n-k)]`` with ``B`` the Beta quantile and ``a = 1 - confidence``; the
    lower end is 0 when ``k = 0`` and the upper end 1 when ``k = n``. Conservative: it covers at least
    ``confidence`` for every true proportion.
    """
    from scipy.stats import beta

    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"clopper_pearson needs 0 <= k <= n and n >= 1, got k={k}, n={n}.")
    a = 1.0 - confidence
    low = 0.0 if k == 0 else float(beta.ppf(a / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - a / 2, k + 1, n - k))
    return low, high


def roc_curve(member_scores: np.ndarray, non_member_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of the rule "member if score >= t" over every threshold ``t`` (ties counted together)."""
    scores = np.concatenate([member_scores, non_member_scores])
    labels = np.concatenate([np.ones(len(member_scores)), np.zeros(len(non_member_scores))])
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.diff(scores) != 0, True]
    tp, fp = np.cumsum(labels)[last_of_tie], np.cumsum(1 - labels)[last_of_tie]
    return np.r_[0.0, fp / len(non_member_scores)], np.r_[0.0, tp / len(member_scores)]


def attack_result(member_scores: np.ndarray, non_member_scores: np.ndarray) -> AttackResult:
    """AUC (trapezoid over the ROC) and TPR at 0.1% / 1% FPR (the best TPR with FPR at most that), each with
    its 95% Clopper-Pearson interval over the members; ``None`` at an FPR below ``1 / non_members``."""
    if len(member_scores) == 0 or len(non_member_scores) == 0:
        raise ValueError("membership inference needs members and non-members, got an empty set.")
    fpr, tpr = roc_curve(np.asarray(member_scores, float), np.asarray(non_member_scores, float))
    auc = float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))
    m, n = len(member_scores), len(non_member_scores)

    def tpr_at(level: float) -> tuple[float | None, tuple[float, float] | None]:
        if level < 1.0 / n:  # no threshold can show this FPR: refuse rather than report the TPR at FPR 0
            return None, None
        best = float(tpr[fpr <= level].max())
        return best, clopper_pearson(round(best * m), m)

    (low, low_ci), (one, one_ci) = tpr_at(0.001), tpr_at(0.01)
    return AttackResult(auc, low, one, m, n, low_ci, one_ci)


@torch.no_grad()
def _per_example(
    module: nn.Module, x: Tensor, y: Tensor, batch_size: int, attack: str, score: Callable[[Tensor, Tensor], Tensor]
) -> Tensor:
    """``score(logits, labels)`` per example, in eval mode and batches (the module's mode is restored).

    Raises:
        TypeError: for labels that are not integer class ids of shape ``[n]`` (not a classifier).
    """
    if y.is_floating_point() or y.dim() != 1:
        raise TypeError(
            f"{attack} scores classifiers (integer labels of shape [n]); got labels of dtype {y.dtype} and shape "
            f"{tuple(y.shape)}. It cannot attack this model."
        )
    was_training = module.training
    module.eval()
    try:
        out = [score(module(x[i : i + batch_size]).float(), y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    finally:
        module.train(was_training)
    return torch.cat(out).float().cpu()


def example_losses(module: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> Tensor:
    """Per-example cross-entropy of a classifier ``module(x) -> logits``."""
    return _per_example(module, x, y, batch_size, "the loss-threshold attack",
                        lambda z, yy: F.cross_entropy(z, yy, reduction="none"))


def loss_threshold(member_losses: Tensor, non_member_losses: Tensor) -> AttackResult:
    """Example-level loss-threshold attack (Yeom et al. 2018): score ``-loss``."""
    return attack_result(-member_losses.numpy(), -non_member_losses.numpy())


def client_level(
    member_losses_by_client: list[Tensor], non_member_losses: Tensor, seed: int = 0
) -> AttackResult:
    """Client-level inference: each client's mean ``-loss`` against test pseudo-clients of the same sizes.

    Pseudo-client ``i`` draws ``len(client i)`` test examples without replacement (from ``(seed, i)``), so both
    sides average the same number of losses.
    """
    return client_level_scores([-c for c in member_losses_by_client], -non_member_losses, seed)


def client_level_scores(
    member_scores_by_client: list[Tensor], non_member_scores: Tensor, seed: int = 0
) -> AttackResult:
    """Client-level inference from any per-example membership score: a client's mean score against test
    pseudo-clients of the same sizes (pseudo-client ``i`` draws ``len(client i)`` test examples without
    replacement, from ``(seed, i)``)."""
    clients = [c for c in member_scores_by_client if len(c)]
    n_test = len(non_member_scores)
    pseudo = []
    for i, c in enumerate(clients):
        idx = torch.randperm(n_test, generator=make_generator(seed, "pseudo_client", i))[: min(len(c), n_test)]
        pseudo.append(float(non_member_scores[idx].mean()))
    members = np.array([float(c.mean()) for c in clients])
    return attack_result(members, np.array(pseudo))


# ---------------------------------------------------------------------------------------- offline LiRA
def logit_confidences(module: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> Tensor:
    """``phi = log(p_y / (1 - p_y)) = z_y - logsumexp_{j != y} z_j`` per example (stable for confident models)."""

    def phi(z: Tensor, yy: Tensor) -> Tensor:
        return z.gather(1, yy[:, None]).squeeze(1) - z.scatter(1, yy[:, None], float("-inf")).logsumexp(1)

    return _per_example(module, x, y, batch_size, "LiRA", phi)


def lira_offline(
    target: Tensor, shadows: Tensor, shadow_in: Tensor, fix_variance: bool = True, min_out: int = 2
) -> Tensor:
    """Offline LiRA scores: ``(phi - mu_out) / sigma_out`` per example (``Phi`` of it is ``Lambda``; same ranking).

    Args:
        target: ``[n]`` logit-scaled confidences of the target model.
        shadows: ``[S, n]`` the same for each shadow model.
        shadow_in: ``[S, n]`` booleans, ``True`` where the shadow trained on the example.
        fix_variance: One OUT standard deviation for every example (pooled over examples); else per example.
        min_out: Examples with fewer OUT shadows than this get score ``nan`` (leave them out of the ROC).

    Raises:
        ValueError: for shapes that disagree.
    """
    if shadows.shape != shadow_in.shape or shadows.shape[-1] != target.shape[-1]:
        raise ValueError(
            f"LiRA needs shadows [S, n] and their membership [S, n] for n = {target.shape[-1]} target scores; got "
            f"{tuple(shadows.shape)} and {tuple(shadow_in.shape)}."
        )
    out = (~shadow_in.bool()).double()
    count = out.sum(0)
    mu = (shadows.double() * out).sum(0) / count.clamp_min(1)
    var = (((shadows.double() - mu) ** 2) * out).sum(0) / (count - 1).clamp_min(1)
    if fix_variance:
        ok = count >= 2
        var = torch.full_like(mu, float(var[ok].mean()) if ok.any() else 1.0)
    score = (target.double() - mu) / var.sqrt().clamp_min(1e-6)
    score[count < min_out] = float("nan")
    return score.float()


def lira_attack(scores: Tensor, is_member: Tensor) -> AttackResult:
    """Example-level ROC summary of LiRA scores (examples with ``nan`` scores left out)."""
    ok = ~torch.isnan(scores)
    return attack_result(scores[ok & is_member].numpy(), scores[ok & ~is_member].numpy())


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """A log-log ROC plot (the scale at which low-FPR attacks are read) of several attacks, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, (fpr, tpr) in curves.items():
        ax.plot(np.maximum(fpr, 1e-5), np.maximum(tpr, 1e-5), label=name)
    ax.plot([1e-5, 1], [1e-5, 1], "k:", lw=0.8, label="chance")
    ax.set(xscale="log", yscale="log", xlabel="false positive rate", ylabel="true positive rate",
           xlim=(1e-4, 1), ylim=(1e-4, 1), title="membership inference ROC")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = [
    "AttackResult", "attack_result", "client_level", "client_level_scores", "example_losses", "lira_attack",
    "lira_offline", "logit_confidences", "loss_threshold", "plot_roc", "roc_curve",
]
