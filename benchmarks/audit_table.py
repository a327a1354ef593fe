"""Privacy-utility-leakage table on digits: accuracy, accountant epsilon, one-shot empirical epsilon, LiRA,
reconstruction; audit overhead; and how reconstruction degrades (local steps, batch, DP, secure aggregation).

    python benchmarks/audit_table.py              # seeds 0 1 2, 8 LiRA shadows per run (about 40 minutes on one core)
    python benchmarks/audit_table.py --seeds 0    # one seed
    python benchmarks/audit_table.py --overhead 3 # also time 3 runs with and without the audit (CPU seconds)
    python benchmarks/audit_table.py --reconstruction-only   # only the reconstruction table (digits, Fashion-MNIST)
    python benchmarks/audit_table.py --head-only --seeds 0   # head-only fine-tuning of a pretrained MLP (pretrains first)
    python benchmarks/audit_table.py --pretrain-only         # only the checkpoint experiments/audit_digits_head_only.yaml loads
    python benchmarks/audit_table.py --fashion --seeds 0 1 2 --shadows 4               # the Fashion-MNIST rows
    python benchmarks/audit_table.py --fashion --head-only --seeds 0 1 2 --shadows 4   # head-only on Fashion-MNIST
    python benchmarks/audit_table.py --ideal 1290 30   # the canary estimator on the exact DP mechanism (d, rounds)
    python benchmarks/audit_table.py --ideal-nulls 1290 30   # the same, lightfed's null vs the authors' vs shift only

Leakage columns of each row, on the same run: offline LiRA (Carlini et al. 2022; ``--shadows`` re-runs of the
row's config on seeded pool subsets, :func:`lightfed.audit.cli.lira_report`) on the final model, AUC and TPR at
1% FPR; and reconstruction of one client's update sent from the final model (batch 1, one local step, a cohort
of one: the attacker isolates the client) through the row's clip and noise multiplier, PSNR of the analytic
first-layer attack and of gradient inversion (Geiping et al. 2020), mean over 5 clients of one example.

Every row is an example config under ``experiments/`` run as written through the ``lightfed fit`` parser, with
the one-shot canary audit (Andrew et al. 2024; 100 inserted + 100 held-out canaries, sampled like clients)
added by ``--trainer.callbacks+=``. The no-DP row audits with canaries of norm 0.5 (the DP rows' clip). The
table goes between the ``audit-table`` markers in docs/auditing.md (``--fashion``: ``audit-fashion-table``;
``--head-only``: ``audit-head-table``, the rows of experiments/audit_digits_head_only.yaml, whose Fashion-MNIST
pretraining :func:`pretrain` runs first; ``--fashion --head-only``: ``audit-fashion-head-table``, the rows of
experiments/audit_fashion_head_only.yaml, whose Animal-MNIST pretraining :func:`pretrain_animal` runs first) and
to stdout. The overhead is CPU time of
``fit`` (``time.process_time``), which other processes on a shared machine do not inflate as they do wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING
from unittest import mock

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "auditing.md"
BEGIN, END = "<!-- audit-table:begin -->", "<!-- audit-table:end -->"
RBEGIN, REND = "<!-- reconstruction-table:begin -->", "<!-- reconstruction-table:end -->"
AUDIT = ["--trainer.callbacks+=lightfed.audit.OneShotCanaryAudit", "--trainer.callbacks.init_args.num_canaries=100"]

FBEGIN, FEND = "<!-- audit-fashion-table:begin -->", "<!-- audit-fashion-table:end -->"
FASHION = "audit_fashion_dp_eps3.yaml"

#: (row label, config, the row's own CLI arguments (shadows train with them too), the canary audit's arguments)
FASHION_ROWS = [
    ("FedAvg, no DP", FASHION, ["--privacy", "null"], ["--trainer.callbacks.init_args.canary_norm=0.5"]),
    ("DP-FedAvg, target eps 8", FASHION, ["--privacy.init_args.target_epsilon", "8"], []),
    ("DP-FedAvg, target eps 3", FASHION, [], []),
    ("DP-FedAvg, target eps 1", FASHION, ["--privacy.init_args.target_epsilon", "1"], []),
]
HEAD = "audit_digits_head_only.yaml"
PRETRAINED = ROOT / "runs" / "audit_digits_head_only" / "pretrained_fashion8x8.pt"
HBEGIN, HEND = "<!-- audit-head-table:begin -->", "<!-- audit-head-table:end -->"
HEAD_ROWS = [
    ("head-only fine-tuning, no DP", HEAD, ["--privacy", "null", "--trainer.init_checkpoint", str(PRETRAINED)],
     ["--trainer.callbacks.init_args.canary_norm=0.5"]),
    ("head-only fine-tuning, DP target eps 8", HEAD,
     ["--privacy.init_args.target_epsilon", "8", "--trainer.init_checkpoint", str(PRETRAINED)], []),
    ("head-only fine-tuning, DP target eps 3", HEAD, ["--trainer.init_checkpoint", str(PRETRAINED)], []),
    ("head-only fine-tuning, DP target eps 1", HEAD,
     ["--privacy.init_args.target_epsilon", "1", "--trainer.init_checkpoint", str(PRETRAINED)], []),
]
FASHION_HEAD = "audit_fashion_head_only.yaml"
PRETRAINED_ANIMAL = ROOT / "runs" / "audit_fashion_head_only" / "pretrained_animal.pt"
FHBEGIN, FHEND = "<!-- audit-fashion-head-table:begin -->", "<!-- audit-fashion-head-table:end -->"
FASHION_HEAD_ROWS = [
    ("head-only fine-tuning, no DP", FASHION_HEAD,
     ["--privacy", "null", "--trainer.init_checkpoint", str(PRETRAINED_ANIMAL)], ["--trainer.callbacks.init_args.canary_norm=0.5"]),
    ("head-only fine-tuning, DP target eps 8", FASHION_HEAD,
     ["--privacy.init_args.target_epsilon", "8", "--trainer.init_checkpoint", str(PRETRAINED_ANIMAL)], []),
    ("head-only fine-tuning, DP target eps 3", FASHION_HEAD, ["--trainer.init_checkpoint", str(PRETRAINED_ANIMAL)], []),
    ("head-only fine-tuning, DP target eps 1", FASHION_HEAD,
     ["--privacy.init_args.target_epsilon", "1", "--trainer.init_checkpoint", str(PRETRAINED_ANIMAL)], []),
]
ROWS = [
    ("FedAvg, no DP", "digits_dp_eps8.yaml", ["--privacy", "null"], [*AUDIT, "--trainer.callbacks.init_args.canary_norm=0.5"]),
    ("DP-FedAvg, target eps 8", "digits_dp_eps8.yaml", [], AUDIT),
    ("DP-FedAvg, target eps 3", "digits_dp_eps3.yaml", [], AUDIT),
    ("DP-FedAvg, target eps 1", "digits_dp_eps1.yaml", [], AUDIT),
]


def _fit_mlp(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor,
             epochs: int, seed: int, path: Path) -> float:
    """Train ``model`` centrally (Adam, lr 1e-3, batch 128, ``epochs`` epochs shuffled by ``seed``), save its
    state dict to ``path``; return its accuracy on ``(xt, yt)``."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(128):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, path)
    return acc


def pretrain(path: Path = PRETRAINED, epochs: int = 5, seed: int = 0) -> float:
    """Pretrain the MLP 64-64-10 of experiments/audit_digits_head_only.yaml centrally on public data disjoint
    from digits: Fashion-MNIST's 60,000 training images padded to 32x32 and average-pooled in 4x4 blocks to 8x8
    in [0, 1] (sklearn's digits are 4x4 block counts of 32x32 bitmaps, scaled the same way). Saves the state
    dict to ``path``; returns the test accuracy on Fashion-MNIST's 10,000 test images (8x8)."""
    import gzip

    import numpy as np
    import torch
    import torch.nn.functional as F

    from lightfed.models import MLPClassifier

    root = Path("/usr/share/datasets/fashion-mnist")

    def images(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        with gzip.open(root / f"{split}-images-idx3-ubyte.gz") as f:
            x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
        with gzip.open(root / f"{split}-labels-idx1-ubyte.gz") as f:
            y = np.frombuffer(f.read(), np.uint8, offset=8)
        x = F.avg_pool2d(F.pad(torch.tensor(x, dtype=torch.float32) / 255, (2, 2, 2, 2)), 4)
        return x.reshape(len(x), 64), torch.tensor(y, dtype=torch.int64)

    torch.manual_seed(seed)
    (x, y), (xt, yt) = images("train"), images("t10k")
    acc = _fit_mlp(MLPClassifier(64, [64], 10), x, y, xt, yt, epochs, seed, path)
    print(f"pretrained on Fashion-MNIST 8x8 ({epochs} epochs, seed {seed}): test accuracy {100 * acc:.1f}%, saved "
          f"{path}", file=sys.stderr, flush=True)
    return acc


def pretrain_animal(path: Path = PRETRAINED_ANIMAL, epochs: int = 5, seed: int = 0) -> float:
    """Pretrain the MLP 784-128-10 of experiments/audit_fashion_head_only.yaml centrally on public data disjoint
    from Fashion-MNIST: Animal-MNIST's seeded 8,000-image training split (animal silhouettes, 28x28, normalised
    with Fashion-MNIST's mean and std as the Fashion-MNIST rows are). Saves the state dict to ``path``; returns
    the accuracy on Animal-MNIST's 2,000-image test split."""
    import torch

    from lightfed.data.animal import AnimalMNISTDataModule
    from lightfed.data.partition import IID
    from lightfed.models import MLPClassifier

    torch.manual_seed(seed)
    data = AnimalMNISTDataModule(IID(num_clients=1), flatten=True, val_fraction=0.0, seed=seed)
    arrays = data.load()
    (x, y), (xt, yt) = arrays.train, arrays.test
    acc = _fit_mlp(MLPClassifier(784, [128], 10), x, y, xt, yt, epochs, seed, path)
    print(f"pretrained on Animal-MNIST ({len(y)} images, {epochs} epochs, seed {seed}): test accuracy "
          f"{100 * acc:.1f}%, saved {path}", file=sys.stderr, flush=True)
    return acc


def run_config(config: str, extra: list[str], seed: int, workdir: str, keep: bool = False) -> tuple[dict[str, float], float]:
    """Fit one config through the CLI parser; its last round's metrics and the CPU seconds of ``fit``
    (and the CLI, whose trainer holds the final model, with ``keep``)."""
    from lightfed.cli import LightFedCLI

    args = [
        "--config", str(ROOT / "experiments" / config), *extra, "--seed_everything", str(seed),
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.checkpoint_every", "0", "--trainer.default_root_dir", workdir,
    ]
    with contextlib.redirect_stdout(io.StringIO()), mock.patch.object(sys, "argv", sys.argv[:1]):
        cli = LightFedCLI(args=args, run=False)
        start = time.process_time()
        history = cli.trainer.fit(cli.model, cli.datamodule)
        cpu = time.process_time() - start
    return (dict(history[-1]), cpu, cli) if keep else (dict(history[-1]), cpu)  # type: ignore[return-value]


def leakage(cli: object, config: str, row_args: list[str], seed: int, shadows: int) -> dict[str, float]:
    """LiRA on the final model (shadows: the row's config re-run) and reconstruction of one client's update."""
    from lightfed.audit.cli import lira_report, reconstruction_report

    trainer = cli.trainer  # type: ignore[attr-defined]
    with contextlib.redirect_stdout(io.StringIO()):
        lira = lira_report(str(ROOT / "experiments" / config), trainer, shadows=shadows, seed=seed, extra_args=row_args)
    out = {"lira/auc": lira["example"]["auc"], "lira/tpr@1%fpr": lira["example"]["tpr@1%fpr"]}
    rec = reconstruction_report(trainer, seed)
    out.update({"reconstruction/analytic_psnr": rec["analytic_psnr"], "reconstruction/inversion_psnr": rec["inversion_psnr"]})
    return out


def fmt(values: list[float], digits: int = 3, pct: bool = False) -> str:
    vals = [v * 100 if pct else v for v in values if not math.isnan(v)]
    if not vals:
        return "-"
    if any(math.isinf(v) for v in vals):
        return "∞"
    mean = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{mean:.1f}" if pct else f"{mean:.{digits}g}"
    sd = statistics.stdev(vals)
    return f"{mean:.1f} ± {sd:.1f}" if pct else f"{mean:.{digits}g} ± {sd:.2g}"


def interval(rows: list[dict[str, float]], tag: str) -> str:
    """The mean estimate and the mean of the bootstrap intervals' ends."""
    est = [r[f"audit/epsilon_{tag}"] for r in rows]
    low = statistics.fmean(r[f"audit/epsilon_{tag}_low"] for r in rows)
    high = statistics.fmean(r[f"audit/epsilon_{tag}_high"] for r in rows)
    return f"{fmt(est)} [{low:.3g}, {high:.3g}]"


def grid_of(fashion: bool, head_only: bool) -> tuple[list, tuple[str, str]]:
    """The rows and the docs/auditing.md markers of one of the four tables."""
    if head_only:
        return (FASHION_HEAD_ROWS, (FHBEGIN, FHEND)) if fashion else (HEAD_ROWS, (HBEGIN, HEND))
    return (FASHION_ROWS, (FBEGIN, FEND)) if fashion else (ROWS, (BEGIN, END))


def table(results: dict[str, list[dict[str, float]]], seeds: list[int], shadows: int = 8, fashion: bool = False,
          head: float | None = None) -> str:
    """The markdown table (with its caption) of ``results``; ``head``: the pretrained model's public test
    accuracy for the head-only tables (None otherwise)."""
    if head is not None and fashion:
        task = ("Fashion-MNIST, a seeded 4,000 training images (members) and the 10,000 test images (non-members), "
                "400 IID clients, Poisson q = 0.2, 30 rounds, an MLP 784-128-10 whose hidden layer was pretrained "
                f"centrally on Animal-MNIST (public, disjoint from Fashion-MNIST; {100 * head:.1f}% on its test split) "
                "and frozen, the head (1,290 parameters) fine-tuned and sent, canaries in the head's space")
    elif head is not None:
        task = ("Digits, 400 IID clients, Poisson q = 0.2, 50 rounds, an MLP 64-64-10 whose hidden layer was pretrained "
                f"centrally on Fashion-MNIST downsampled to 8x8 (public, disjoint from digits; {100 * head:.1f}% on its "
                "test set) and frozen, the head (650 parameters) fine-tuned and sent, canaries in the head's space")
    elif fashion:
        task = ("Fashion-MNIST, a seeded 4,000 training images (members) and the 10,000 test images (non-members), 400 "
                "IID clients, Poisson q = 0.2, 30 rounds, logistic regression on flat pixels (7,850 parameters)")
    else:
        task = "Digits, 400 IID clients, Poisson q = 0.2, 50 rounds, logistic regression (650 parameters)"
    members = "" if fashion else " (members: the 1,438 training examples, non-members: the 359 test examples)"
    command = ("python benchmarks/audit_table.py" + (" --fashion" if fashion else "") + (" --head-only" if head is not None else "")
               + " --seeds " + " ".join(map(str, seeds)) + (f" --shadows {shadows}" if shadows != 8 else ""))
    lines = [
        f"{task}; mean ± std over "
        f"seeds {seeds}; empirical epsilons at the run's delta (1/400^1.1) with the mean 95% bootstrap interval over "
        f"canaries in brackets. LiRA: offline, {shadows} shadow re-runs of the row's config on subsets of the pool"
        f"{members}. Reconstruction: one "
        f"client's one-example, one-step update from the final model through the row's clip and noise (a cohort of "
        f"one), mean over 5 clients. Produced by `{command}`.",
        "",
        "| run | test accuracy (%) | accountant epsilon | empirical epsilon, final model | empirical epsilon, all iterates "
        "| LiRA AUC | LiRA TPR at 1% FPR (%) | reconstruction PSNR (dB), analytic / inversion |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, *_ in grid_of(fashion, head is not None)[0]:
        rows = results[label]
        acc = [r.get("central/test_acc", math.nan) for r in rows]
        eps = [r.get("privacy/epsilon", math.inf) for r in rows]

        def col(key: str, pct: bool = False, digits: int = 3, rows: list[dict[str, float]] = rows) -> str:
            return fmt([r.get(key, math.nan) for r in rows], digits=digits, pct=pct)

        lines.append(f"| {label} | {fmt(acc, pct=True)} | {fmt(eps)} | {interval(rows, 'final')} | "
                     f"{interval(rows, 'all_iterates')} | {col('lira/auc')} | {col('lira/tpr@1%fpr', pct=True)} | "
                     f"{col('reconstruction/analytic_psnr', digits=3)} / {col('reconstruction/inversion_psnr', digits=3)} |")
    return "\n".join(lines)


def overhead(repeats: int) -> str:
    """CPU seconds of the eps-3 digits run without and with the audit, interleaved."""
    plain, audited = [], []
    for i in range(repeats):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            plain.append(run_config("digits_dp_eps3.yaml", [], 0, a)[1])
            audited.append(run_config("digits_dp_eps3.yaml", AUDIT, 0, b)[1])
        print(f"overhead run {i}: {plain[-1]:.2f} s plain, {audited[-1]:.2f} s audited", file=sys.stderr, flush=True)
    p, a = statistics.median(plain), statistics.median(audited)
    return (f"Audit overhead on experiments/digits_dp_eps3.yaml (seed 0, median of {repeats} interleaved runs, CPU "
            f"seconds of fit): {p:.2f} s without, {a:.2f} s with 100 + 100 canaries: +{100 * (a - p) / p:.1f}%.")


# ---------------------------------------------------------------------------------------- the ideal mechanism
def ideal_mechanism(dimension: int, rounds: int, epsilons: list[float], seeds: int, canaries: int = 100,
                    real: float = 0.0) -> str:
    """The one-shot estimates of the exact mechanism the accountant charges, with nothing else in the model.

    Each round, each of ``canaries`` inserted unit directions joins with probability q = 0.2 and the released step
    is their sum plus ``N(0, z^2 I_d)`` (clip C = 1; ``z`` of DPFixedClipping at the target epsilon, 400 clients,
    Poisson q = 0.2, ``rounds`` rounds, delta 1/400^1.1): the canary audit's statistics and estimator
    (:func:`lightfed.audit.estimators.epsilon_two_gaussians`) on a mechanism that is (epsilon, delta)-DP by
    construction. Estimates above the target show how far the estimator itself overshoots at this size.
    ``real`` > 0 adds what real clients add, independent of the canaries: a random direction of norm
    ``real * z * sqrt(d) * (1 - t / rounds)`` in round ``t`` (``real`` times the noise's norm, fading out).
    """
    import numpy as np

    from lightfed import PoissonSampler
    from lightfed.audit.estimators import GaussianFit, epsilon_two_gaussians
    from lightfed.messages import RunInfo
    from lightfed.privacy import DPFixedClipping
    from lightfed.strategy import FedAvg

    delta, lines = 400**-1.1, []
    for eps in epsilons:
        privacy = DPFixedClipping(clip_norm=1.0, target_epsilon=eps, verbose=False)
        privacy.setup(RunInfo(num_clients=400, sampler=PoissonSampler(0.2), rounds=rounds,
                              strategy=FedAvg(weighted=False), seed=0))
        z, est = privacy.z, {"final model": [], "all iterates": []}
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            c = rng.normal(size=(2 * canaries, dimension))
            c /= np.linalg.norm(c, axis=1, keepdims=True)
            total, best = np.zeros(dimension), np.full(2 * canaries, -1.0)
            for t in range(rounds):
                step = c[:canaries][rng.random(canaries) < 0.2].sum(0) + rng.normal(0, z, dimension)
                if real:
                    other = rng.normal(size=dimension)
                    step += other * (real * z * math.sqrt(dimension) * (1 - t / rounds) / np.linalg.norm(other))
                total += step
                best = np.maximum(best, c @ step / np.linalg.norm(step))
            for name, stat in (("final model", c @ total / np.linalg.norm(total)), ("all iterates", best)):
                est[name].append(epsilon_two_gaussians(GaussianFit.of(stat[:canaries]), GaussianFit.of(stat[canaries:]), delta))
        cells = [f"{np.median(v):.2f} (max {max(v):.1f}, above the target in {sum(e > eps for e in v)} of {seeds})"
                 for v in est.values()]
        lines.append(f"| {eps:g} | {z:.3f} | {cells[0]} | {cells[1]} |")
    extra = f" --ideal-real {real:g}" if real else ""
    head = (f"Ideal mechanism, d = {dimension}, {rounds} rounds, {canaries} + {canaries} canaries, {seeds} seeds"
            f"{f', real updates {real:g} x the noise norm, fading' if real else ''}; "
            f"`python benchmarks/audit_table.py --ideal {dimension} {rounds}{extra}`.\n\n"
            "| target epsilon | z | final model: median estimate | all iterates: median estimate |\n|---|---|---|---|")
    return head + "\n" + "\n".join(lines)


def ideal_nulls(dimension: int, rounds: int, epsilons: list[float], seeds: int, canaries: int = 100) -> str:
    """The exact mechanism of :func:`ideal_mechanism` (final model), scored three ways against the target epsilon.

    ``fitted held-out`` is lightfed's estimate (Gaussians fitted to the inserted and the held-out canaries);
    ``closed-form null`` is the authors' code (google-research/federated ``one_shot_epe``,
    ``epsilon_closed_form_null_gaussian_alt``: the inserted fit against ``N(0, 1/d)``); ``mean shift only`` gives
    the inserted canaries the null's variance (a pure Gaussian-mechanism reading).
    """
    import numpy as np

    from lightfed import PoissonSampler
    from lightfed.audit.estimators import GaussianFit, epsilon_two_gaussians
    from lightfed.messages import RunInfo
    from lightfed.privacy import DPFixedClipping
    from lightfed.strategy import FedAvg

    delta, null_std, lines = 400**-1.1, dimension**-0.5, []
    null = GaussianFit(0.0, null_std, 10**9)
    for eps in epsilons:
        privacy = DPFixedClipping(clip_norm=1.0, target_epsilon=eps, verbose=False)
        privacy.setup(RunInfo(num_clients=400, sampler=PoissonSampler(0.2), rounds=rounds,
                              strategy=FedAvg(weighted=False), seed=0))
        est: dict[str, list[float]] = {"fitted": [], "closed": [], "shift": []}
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            c = rng.normal(size=(2 * canaries, dimension))
            c /= np.linalg.norm(c, axis=1, keepdims=True)
            total = np.zeros(dimension)
            for _ in range(rounds):
                total += c[:canaries][rng.random(canaries) < 0.2].sum(0) + rng.normal(0, privacy.z, dimension)
            stat = c @ total / np.linalg.norm(total)
            seen, unseen = GaussianFit.of(stat[:canaries]), GaussianFit.of(stat[canaries:])
            est["fitted"].append(epsilon_two_gaussians(seen, unseen, delta))
            est["closed"].append(epsilon_two_gaussians(seen, null, delta))
            est["shift"].append(epsilon_two_gaussians(GaussianFit(seen.mean, null_std, seen.n), null, delta))
        cells = [f"{np.median(v):.2f} / {max(v):.2f} / {sum(e > eps for e in v)}" for v in est.values()]
        lines.append(f"| {eps:g} | {' | '.join(cells)} |")
    head = (f"Exact mechanism, d = {dimension}, {rounds} rounds, {canaries} + {canaries} canaries, {seeds} seeds, final "
            f"model; median / maximum / seeds above the target; `python benchmarks/audit_table.py --ideal-nulls "
            f"{dimension} {rounds}`.\n\n| target epsilon | fitted held-out (lightfed) | closed-form null (the authors' code) "
            "| same variance as the null (mean shift only) |\n|---|---|---|---|")
    return head + "\n" + "\n".join(lines)


# ---------------------------------------------------------------------------------------- reconstruction
#: (row label, local steps, batch size, clients summed, target epsilon of the digits DP configs or None, secure aggregation)
SETTINGS = [
    ("batch 1, 1 step", 1, 1, 1, None, False),
    ("batch 1, 5 steps", 5, 1, 1, None, False),
    ("batch 4, 1 step", 1, 4, 1, None, False),
    ("batch 16, 1 step", 1, 16, 1, None, False),
    ("batch 1, 1 step, DP eps 8", 1, 1, 1, 8.0, False),
    ("batch 1, 1 step, DP eps 3", 1, 1, 1, 3.0, False),
    ("batch 1, 1 step, DP eps 1", 1, 1, 1, 1.0, False),
    ("batch 1, 1 step, SecAgg+ sum of 10", 1, 1, 10, None, True),
]


def reconstruction_target(name: str) -> dict[str, object]:
    """The model (at its seeded initialisation), data, image shape and pixel box of one target."""
    import lightning as L
    import torch

    from lightfed.models import MLPClassifier
    from lightfed.params import ParamSpec

    L.seed_everything(0, verbose=False)
    lr = 0.1
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
        model, image, box = MLPClassifier(64, [64], 10, lr=lr), (1, 8, 8), (0.0, 1.0)
    else:
        from lightfed.data.datasets import FashionMNISTDataModule
        from lightfed.data.partition import IID
        from lightfed.models import CNNClassifier

        cnn = name == "fashion_cnn"
        data = FashionMNISTDataModule(IID(num_clients=1), flatten=not cnn, train_subset=2000, val_fraction=0.0)
        data.setup()
        x, y = data.arrays.train[0], data.arrays.train[1]
        m, sd = FashionMNISTDataModule.MEAN, FashionMNISTDataModule.STD
        image, box = (1, 28, 28), (-m / sd, (1 - m) / sd)
        if cnn:  # experiments/fashion_mnist_fedavg.yaml's CNN
            lr = 0.05
            model = CNNClassifier(1, 28, 10, width=16, hidden=64, lr=lr)
        else:
            model = MLPClassifier(784, [128], 10, lr=lr)
    spec = ParamSpec.from_module(model)
    return {"model": model, "spec": spec, "w": spec.flatten(spec.tensors(model)), "x": x, "y": y, "image": image,
            "box": box, "lr": lr}


def reconstruction_table(targets: list[str], cohorts: int, iterations: int) -> str:
    """Analytic and inversion PSNR and label accuracy for each setting, mean over ``cohorts`` seeded cohorts."""
    import torch

    from lightfed import PoissonSampler
    from lightfed.audit.reconstruction import attack_update, released_update
    from lightfed.data.client_data import ClientData
    from lightfed.messages import RunInfo
    from lightfed.privacy import DPFixedClipping
    from lightfed.secagg import SecAggPlus
    from lightfed.strategy import FedAvg

    cells: dict[tuple[str, str], str] = {}
    zs: dict[float, float] = {}
    for name in targets:
        t = reconstruction_target(name)
        model, spec, w, x, y = t["model"], t["spec"], t["w"], t["x"], t["y"]
        for label, steps, batch, clients, eps, secagg in SETTINGS:
            start = time.perf_counter()
            scores: dict[str, list[float]] = {"analytic": [], "inversion": [], "labels": []}
            for c in range(cohorts):
                privacy = protocol = None
                if eps is not None:  # the digits DP configs' mechanism: 400 clients, Poisson q = 0.2, 50 rounds, C = 0.5
                    privacy = DPFixedClipping(clip_norm=0.5, target_epsilon=eps, verbose=False)
                    privacy.setup(RunInfo(num_clients=400, sampler=PoissonSampler(0.2), rounds=50,
                                          strategy=FedAvg(weighted=False), seed=c))
                    zs[eps] = privacy.z
                if secagg:
                    protocol = SecAggPlus(clip=1.0)
                    protocol.setup(strategy=FedAvg(weighted=False), privacy=None, numel=spec.numel, seed=c)
                per = steps * batch
                pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(1000 + c))[: clients * per]
                cohort = [ClientData((x, y), pick[i * per : (i + 1) * per]) for i in range(clients)]
                observed = released_update(model, spec, w, cohort, local_steps=steps, batch_size=batch, privacy=privacy,
                                           secure_aggregation=protocol, seed=c)
                for method in ("analytic", "inversion"):
                    try:
                        r = attack_update(model, spec, w, observed, lr=t["lr"], batch_size=len(pick), local_steps=steps,
                                          method=method, image_shape=t["image"], box=t["box"], truth=(x[pick], y[pick]),
                                          iterations=iterations, seed=c)
                    except TypeError:  # analytic recovery needs a fully connected first layer (not the CNN)
                        continue
                    scores[method].append(r.psnr)
                scores["labels"].append(r.label_accuracy)
            analytic = f"{statistics.fmean(scores['analytic']):.1f}" if scores["analytic"] else "-"
            cells[(name, label)] = (f"{analytic} / {statistics.fmean(scores['inversion']):.1f} / "
                                    f"{100 * statistics.fmean(scores['labels']):.0f}%")
            print(f"reconstruction {name} {label}: {cells[(name, label)]} ({time.perf_counter() - start:.1f} s)",
                  file=sys.stderr, flush=True)
    z_text = ", ".join(f"eps {e:g}: z = {z:.3g}" for e, z in sorted(zs.items(), reverse=True))
    names = {"digits": "digits, MLP 64-64-10", "fashion_mnist": "Fashion-MNIST, MLP 784-128-10",
             "fashion_cnn": "Fashion-MNIST, CNN (lr 0.05; no analytic attack)"}
    lines = [
        f"The model at its seeded initialisation (plain SGD, lr 0.1 unless stated); each client holds (local steps x batch) examples "
        f"and takes one epoch; the attacker sees what `run_server_round` releases (uniform FedAvg; DP: "
        f"`DPFixedClipping` with C = 0.5 and the noise multiplier of the digits DP configs, 400 clients, Poisson "
        f"q = 0.2, 50 rounds: {z_text}; SecAgg+: only the masked sum of 10 clients). Cells: analytic first-layer "
        f"PSNR / gradient inversion PSNR ({iterations} Adam steps) in dB / labels recovered; each reconstruction "
        f"scored against the true image it is matched to; mean over {cohorts} seeded cohorts. Produced by "
        f"`python benchmarks/audit_table.py --reconstruction-only`.",
        "",
        "| setting | " + " | ".join(names[n] for n in targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for label, *_ in SETTINGS:
        lines.append(f"| {label} | " + " | ".join(cells[(n, label)] for n in targets) + " |")
    return "\n".join(lines)


def write_between(begin: str, end: str, text: str) -> None:
    doc = DOC.read_text()
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        DOC.write_text(head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shadows", type=int, default=8, help="LiRA shadow models per run (0: skip LiRA and reconstruction)")
    parser.add_argument("--overhead", type=int, default=0, help="repeats of the overhead measurement (0: skip)")
    parser.add_argument("--reconstruction-only", action="store_true", help="only the reconstruction table")
    parser.add_argument("--targets", nargs="+", default=["digits", "fashion_mnist", "fashion_cnn"],
                        choices=["digits", "fashion_mnist", "fashion_cnn"])
    parser.add_argument("--cohorts", type=int, default=3, help="reconstruction: seeded cohorts per setting")
    parser.add_argument("--iterations", type=int, default=200, help="reconstruction: Adam steps of gradient inversion")
    parser.add_argument("--fashion", action="store_true", help="the Fashion-MNIST rows instead of digits")
    parser.add_argument("--head-only", action="store_true",
                        help="the head-only fine-tuning rows (pretrains the checkpoint first); with --fashion: on Fashion-MNIST")
    parser.add_argument("--pretrain-only", action="store_true",
                        help="only pretrain the checkpoint experiments/audit_digits_head_only.yaml loads "
                             "(with --fashion: experiments/audit_fashion_head_only.yaml's)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/auditing.md alone")
    parser.add_argument("--ideal", type=int, nargs=2, metavar=("DIMENSION", "ROUNDS"),
                        help="only the one-shot estimates of the ideal mechanism (payload size, rounds), 20 seeds")
    parser.add_argument("--ideal-nulls", type=int, nargs=2, metavar=("DIMENSION", "ROUNDS"),
                        help="only the exact mechanism scored with lightfed's, the authors' and a mean-shift estimate")
    parser.add_argument("--ideal-real", type=float, default=0.0,
                        help="--ideal: add real-client updates of this many times the noise's norm, fading out")
    args = parser.parse_args()
    if args.ideal_nulls:
        print(ideal_nulls(*args.ideal_nulls, epsilons=[8.0, 3.0, 1.0], seeds=20))
        return
    if args.ideal:
        print(ideal_mechanism(*args.ideal, epsilons=[8.0, 3.0, 1.0], seeds=20, real=args.ideal_real))
        return
    if args.reconstruction_only:
        text = reconstruction_table(args.targets, args.cohorts, args.iterations)
        print(text)
        if not args.no_write:
            write_between(RBEGIN, REND, text)
        return
    if args.pretrain_only:
        pretrain_animal() if args.fashion else pretrain()
        return
    head = (pretrain_animal() if args.fashion else pretrain()) if args.head_only else None
    grid, markers = grid_of(args.fashion, args.head_only)
    results: dict[str, list[dict[str, float]]] = {label: [] for label, *_ in grid}
    for label, config, row_args, audit_args in grid:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as workdir:
                metrics, cpu, cli = run_config(config, [*row_args, *audit_args], seed, workdir, keep=True)
                if args.shadows:
                    metrics.update(leakage(cli, config, row_args, seed, args.shadows))
            results[label].append(metrics)
            print(f"{label} seed {seed}: {cpu:.1f} CPU s, final {metrics['audit/epsilon_final']:.3g}, all iterates "
                  f"{metrics['audit/epsilon_all_iterates']:.3g}, LiRA AUC {metrics.get('lira/auc', math.nan):.3f}, "
                  f"PSNR {metrics.get('reconstruction/analytic_psnr', math.nan):.1f}", file=sys.stderr, flush=True)
    text = table(results, args.seeds, args.shadows, fashion=args.fashion, head=head)
    if args.overhead:
        text += "\n\n" + overhead(args.overhead)
    print(text)
    if not args.no_write and DOC.exists():
        write_between(*markers, text)


if __name__ == "__main__":
    main()
