"""One-shot empirical epsilon for client-level DP: random canary clients, measured in the same training run.

Andrew, Kairouz, Oh, Oprea, McMahan & Suriyakumar (ICLR 2024), "One-shot Empirical Privacy Estimation for
Federated Learning". ``2k`` canary directions ``c_i`` are drawn uniformly on the unit sphere of the payload
(``d`` parameters); the first ``k`` are *inserted*: in the rounds they take part in, a canary client sends the
update ``C * c_i`` (``C``: the round's clip norm). The other ``k`` are *held out* and never sent. Then

* **final model**: ``s_i = cos(theta_T - theta_0, c_i)``;
* **all iterates**: ``s_i = max_t cos(theta_{t+1} - theta_t, c_i)`` (the adversary sees every round's model);

for each threat model, Gaussians are fitted to the inserted and the held-out statistics, and the estimate is
the epsilon at the run's delta of the best test between the two fits (:func:`epsilon_two_gaussians`: the
hockey-stick divergence of two Gaussians, both directions). In high dimension a held-out canary's cosine is
``N(0, 1/d)`` whatever the model did; an inserted canary's is shifted by what the run released of it. For the
Gaussian mechanism with canaries in every round, the estimate converges to the true epsilon as ``d``, ``k``
grow (the paper's Theorem 3.2).

**Where canaries enter.** Canary updates come from :meth:`Callback.extra_updates` on global rank 0 and travel
the server path of every client update: client- and server-side clipping, the DP weight, the sum, the noise,
the fixed denominator. The audit therefore measures what the configured pipeline releases, bugs included.

**How canaries take part** (``participation``):

* ``"sampled"`` (default): each canary joins each round independently with the sampler's rate ``q`` (drawn
  from ``(seed, round)``), as a real client would under Poisson sampling. The epsilon the mechanism claims
  for a canary is then the accountant's epsilon of the run (computed for Poisson sampling at ``q``), and the
  estimate reads directly beside it;
* ``"every_round"``: every canary takes part in every round (the paper's analysed setting, no amplification
  by sampling). The claim for a canary is then ``T`` unsampled Gaussian rounds, larger than the run's
  accountant epsilon; the estimate is tight against it.

**Limits.** The estimate needs the canaries to be a small part of the model's change (the paper's
``d -> infinity``): when ``k`` canaries in ``T`` rounds make up most of it (``k q^2 T`` comparable to ``d z^2``),
every cosine is normalised by the canaries' own mass and the estimate saturates near ``sqrt(d / k)`` standard
deviations. The report gives ``canary_share_of_update`` and warns above one half.

**What stays out of utility metrics.** Canaries have no data and no training metrics: they never enter the
``client/...`` means, ``round/updates`` is corrected to count real clients only, and evaluation never sees
them. They do move the model a little (``k q C / m`` per round in random directions, ``m`` the expected
cohort), as in the paper, which reports no measurable utility cost.

**Canary kinds** (``kind``). ``"random"``: directions uniform on the sphere of the whole payload (the paper).
A mechanism that skips the noise on *part* of the update hides from them (each direction is only partly in
the unnoised part), so two more kinds confine canaries, after Nasr, Hayes, Steinke, Balle, Tramer, Jagielski,
Carlini & Terzis (USENIX Security 2023), "Tight Auditing of Differentially Private Machine Learning":

* ``"per_tensor"``: each canary is a random direction inside *one* tensor (round-robin over the tensors of at
  least 4 coordinates), and its statistic is the cosine with that tensor's part of the step;
* ``"dirac"``: each canary is one coordinate (a basis vector ``e_j``, Nasr et al.'s Dirac canary; distinct
  coordinates, round-robin over the tensors), with the same per-tensor statistic.

Both report an estimate per tensor (``groups``) beside the pooled one, and ``max_group_epsilon``: a tensor
released without noise shows up as its own, far larger, estimate. A pattern inside every tensor (every other
coordinate noised) still mixes noised and exact coordinates in every group; the direct check of the released
noise (:class:`~lightfed.audit.noise_check.ReleasedNoiseCheck`) is what catches it.

**A lower bound beside the estimate** (``inclusion="coin"``). Steinke, Nasr & Jagielski (NeurIPS 2023),
"Privacy Auditing with One (1) Training Run", need each canary inserted *independently with probability 1/2*
(a fixed split of ``k`` inserted and ``k`` held out does not qualify: given the others, a canary's role is
known). With ``inclusion="coin"`` each of the ``num_canaries + num_held_out`` candidates is inserted on a fair
coin (seeded by ``(seed, "canary_inclusion")``); the audit then guesses "inserted" for the highest statistics and "held out" for
the lowest (:func:`~lightfed.audit.estimators.best_one_run_bound`) and reports, for the final model and for all
iterates (each at confidence ``1 - (1 - confidence) / 2``, so the larger of the two keeps ``confidence``),
the epsilon at the audit's delta below which the run is *not* DP for canary clients (``one_run``,
``audit/epsilon_lower_bound``). Above the accountant's epsilon it proves a bug; below it proves nothing.
With few canaries the bound is small (perfect guesses on 40 candidates refute only about epsilon 1.6 at delta
0) and the ``2 m delta`` term of the theorem zeroes it once ``m delta`` nears 1/2: audit with a small delta.

**What the number means.** An *estimate* of what this attack (cosine with a known direction) learns; not a
lower bound with a guarantee and never a proof of privacy. An estimate clearly above the claimed epsilon means
the pipeline adds less noise, or clips less, than it claims only if it is also above what the estimator gives on
the exact mechanism: with sampled participation a canary's appearances are a mixture, and at 100 canaries, a
payload of 10^3-10^4 and epsilon 1-8 the estimate of a correct mechanism reaches 1.5-6 times the claim
(``python benchmarks/audit_table.py --ideal D T``; docs/auditing.md).
"""

from __future__ import annotations

import json
import logging
import math
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from lightfed.audit.estimators import (
    GaussianFit,
    best_one_run_bound,
    bootstrap_interval,
    epsilon_two_gaussians,
)
from lightfed.callbacks import Callback
from lightfed.messages import ClientUpdate, RoundResult
from lightfed.privacy.accounting import SamplingScheme, default_delta, epsilon_for
from lightfed.registry import AUDITS
from lightfed.seeding import derive_seed, make_generator

if TYPE_CHECKING:
    from lightfed.trainer import FederatedTrainer

log = logging.getLogger("lightfed")
Participation = Literal["sampled", "every_round"]
CanaryKind = Literal["random", "per_tensor", "dirac"]
Inclusion = Literal["split", "coin"]
#: Directions are kept in memory; refuse set-ups whose canary matrix would exceed this.
MAX_CANARY_BYTES = 1 << 30


@AUDITS.register("OneShotCanary")
class OneShotCanaryAudit(Callback):
    """Empirical client-level epsilon from random canary clients, final model and all iterates (Andrew et al. 2024).

    Configure it under ``trainer.callbacks``::

        trainer:
          callbacks:
            - class_path: lightfed.audit.OneShotCanaryAudit
              init_args: {num_canaries: 100}

    Args:
        num_canaries: ``k``, canaries inserted into training.
        num_held_out: Canaries drawn but never inserted (default ``k``).
        participation: ``"sampled"`` (each canary joins a round with the sampler's rate) or ``"every_round"``.
        kind: ``"random"`` (whole-payload directions), ``"per_tensor"`` or ``"dirac"`` (canaries confined to one
            tensor / one coordinate, estimated per tensor; see the module docstring).
        canary_norm: L2 norm of a canary update. Default: the privacy mechanism's clip norm of the round
            times ``clip_multiple`` (a run without client-level clipping must set it).
        clip_multiple: Canaries at this multiple of the clip (``> 1`` tests that clipping happens: a correct
            pipeline clips them back to ``C``).
        delta: Delta of the estimate; default the privacy mechanism's, else ``1 / N^1.1``.
        confidence: Level of the bootstrap interval over canaries.
        bootstrap: Bootstrap draws (0: no interval).
        seed: Seed of directions and participation; default the trainer's seed.
        report_name: JSON report written in ``trainer.log_dir``.
        inclusion: ``"split"``: the first ``num_canaries`` candidates are inserted, the rest held out (the paper).
            ``"coin"``: each of the ``num_canaries + num_held_out`` candidates is inserted on a fair coin, which
            adds the one-run lower bound of Steinke et al. (``kind="random"`` only; see the module docstring).

    Raises:
        ValueError: at construction for fewer than 2 canaries of either kind, and at set-up (before any
            round) for more canaries than clients, directions too many to be nearly orthogonal
            (``2k > d / 2``), secure aggregation, a sampler without a rate, or no clip to scale canaries to.
    """

    def __init__(
        self,
        num_canaries: int = 100,
        num_held_out: int | None = None,
        participation: Participation = "sampled",
        canary_norm: float | None = None,
        clip_multiple: float = 1.0,
        delta: float | None = None,
        confidence: float = 0.95,
        bootstrap: int = 200,
        seed: int | None = None,
        report_name: str = "audit_one_shot.json",
        kind: CanaryKind = "random",
        inclusion: Inclusion = "split",
    ) -> None:
        if kind not in ("random", "per_tensor", "dirac"):
            raise ValueError(f"OneShotCanaryAudit kind must be 'random', 'per_tensor' or 'dirac', got {kind!r}.")
        self.kind: CanaryKind = kind
        if inclusion not in ("split", "coin"):
            raise ValueError(f"OneShotCanaryAudit inclusion must be 'split' or 'coin', got {inclusion!r}.")
        if inclusion == "coin" and kind != "random":
            raise ValueError(f"OneShotCanaryAudit inclusion='coin' needs kind='random', got kind={kind!r}.")
        self.inclusion: Inclusion = inclusion
        held_out = num_canaries if num_held_out is None else num_held_out
        if num_canaries < 2 or held_out < 2:
            raise ValueError(
                f"OneShotCanaryAudit needs at least 2 inserted and 2 held-out canaries to fit Gaussians, got "
                f"num_canaries={num_canaries}, num_held_out={held_out}; use 100 or more for a useful estimate."
            )
        if participation not in ("sampled", "every_round"):
            raise ValueError(f"OneShotCanaryAudit participation must be 'sampled' or 'every_round', got {participation!r}.")
        if canary_norm is not None and not canary_norm > 0:
            raise ValueError(f"OneShotCanaryAudit canary_norm must be > 0 or null, got {canary_norm}.")
        if not clip_multiple > 0:
            raise ValueError(f"OneShotCanaryAudit clip_multiple must be > 0, got {clip_multiple}.")
        if delta is not None and not 0 < delta < 1:
            raise ValueError(f"OneShotCanaryAudit delta must be in (0, 1), got {delta}.")
        if not 0 < confidence < 1:
            raise ValueError(f"OneShotCanaryAudit confidence must be in (0, 1), got {confidence}.")
        self.num_canaries = int(num_canaries)
        self.num_held_out = int(held_out)
        self.participation: Participation = participation
        self.canary_norm = canary_norm
        self.clip_multiple = float(clip_multiple)
        self.delta = delta
        self.confidence = confidence
        self.bootstrap = int(bootstrap)
        self.seed = seed
        self.report_name = report_name
        self.report: dict[str, Any] | None = None
        self._reset()

    def _reset(self) -> None:
        self.directions: Tensor | None = None  # (2k, d) unit rows: inserted first, then held out
        self.initial: Tensor | None = None
        self.max_cos: Tensor | None = None
        self.appearances: Tensor | None = None
        self.rounds_seen = 0
        self.accountant_epsilon: float | None = None
        self.run_delta: float | None = None
        self._before: Tensor | None = None
        self._present: list[int] = []
        self.inserted = self.num_canaries  # candidates inserted (the first rows); drawn by coins under "coin"

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: FederatedTrainer) -> None:
        assert trainer.spec is not None and trainer.global_params is not None
        self._reset()
        n, d, total = trainer.num_clients, trainer.spec.numel, self.num_canaries + self.num_held_out
        seed = trainer.seed if self.seed is None else self.seed
        coins = torch.zeros(total, dtype=torch.bool)
        if self.inclusion == "coin":
            coins = torch.rand(total, generator=make_generator(seed, "canary_inclusion")) < 0.5
            self.inserted = int(coins.sum())
            if min(self.inserted, total - self.inserted) < 2:
                raise ValueError(
                    f"OneShotCanaryAudit inclusion='coin': the coins of the {total} candidates inserted {self.inserted}, "
                    f"and the fits need at least 2 inserted and 2 held out; use more candidates (num_canaries + "
                    f"num_held_out, 100 or more for a useful bound) or another seed."
                )
        if self.inserted > n:
            raise ValueError(
                f"OneShotCanaryAudit num_canaries={self.num_canaries} (inserted {self.inserted}, inclusion "
                f"{self.inclusion!r}) exceeds the population of {n} clients: the canaries would outnumber the real "
                f"clients and dominate the model. Use at most {n} (the paper inserts far fewer canaries than clients)."
            )
        if self.kind == "random" and 2 * total > d:
            raise ValueError(
                f"OneShotCanaryAudit: {total} canary directions in a payload of {d} parameters are not nearly "
                f"orthogonal (need num_canaries + num_held_out <= d / 2 = {d // 2}); use fewer canaries."
            )
        if total * d * 4 > MAX_CANARY_BYTES:
            raise ValueError(
                f"OneShotCanaryAudit would hold {total} x {d} canary directions ({total * d * 4 / 2**30:.1f} GiB); "
                f"use fewer canaries or audit a smaller trainable payload (`trainer.trainable`)."
            )
        if trainer.secure_aggregation is not None:
            raise ValueError(
                "OneShotCanaryAudit cannot insert canary clients under secure aggregation yet: the protocol's cohort "
                "is fixed before the canaries arrive. Audit the same run without the secure_aggregation section "
                "(secure aggregation releases the same sum)."
            )
        plan = trainer.privacy.noise_plan() if trainer.privacy is not None else None
        if self.canary_norm is None and (plan is None or plan.clip_norm is None or plan.placement not in ("server", "distributed")):
            what = "has no privacy section" if trainer.privacy is None else f"uses {type(trainer.privacy).__name__}, which clips no client's whole update"
            raise ValueError(
                f"OneShotCanaryAudit scales canaries to the client-level DP clip, but this run {what}. Use a "
                f"client-level mechanism (DPFixedClipping, DPAdaptiveClipping) or set the audit's canary_norm "
                f"(e.g. the typical norm of a client's update) to audit a run without client-level DP."
            )
        self.rate = 1.0 if self.participation == "every_round" else float(trainer.sampler.rate(n))
        self._seed = seed
        device = trainer.global_params.device
        self.groups: list[tuple[str, int, int]] = []  # (tensor, start, stop) of each canary's tensor
        if self.kind == "random":
            rows = []
            for i in range(total):
                v = torch.randn(d, generator=make_generator(seed, "canary", i), dtype=torch.float32)
                rows.append(v / v.norm())
            if self.inclusion == "coin":  # the inserted candidates first, each in its drawn role
                rows = [rows[i] for i in torch.cat([coins.nonzero(), (~coins).nonzero()]).flatten().tolist()]
            self.directions = torch.stack(rows).to(device)
        else:
            self.directions = self._confined_directions(trainer, seed, total).to(device)
        self.max_cos = torch.full((total,), -1.0, dtype=torch.float64)
        self.appearances = torch.zeros(self.inserted, dtype=torch.int64)
        sizes = trainer.datamodule.client_num_examples() if trainer.datamodule is not None else None
        self.canary_examples = int(sizes.float().median().round()) if sizes is not None and len(sizes) else 1
        self.num_clients = n
        self.dimension = d

    def _confined_directions(self, trainer: FederatedTrainer, seed: int, total: int) -> Tensor:
        """Per-tensor or Dirac canaries: inserted ``i`` and held-out ``i`` go to tensor ``i mod T`` alike."""
        assert trainer.spec is not None
        tensors, start = [], 0
        for name, n in zip(trainer.spec.names, trainer.spec.numels):
            if n >= 4:
                tensors.append((name, start, start + n))
            start += n
        if not tensors:
            raise ValueError("OneShotCanaryAudit kind per_tensor/dirac needs a payload tensor of at least 4 coordinates.")
        d = trainer.spec.numel
        rows = torch.zeros(total, d, dtype=torch.float32)
        order = {name: torch.randperm(stop - lo, generator=make_generator(seed, "canary_dirac", name)).tolist()
                 for name, lo, stop in tensors}
        used = dict.fromkeys(order, 0)
        for i in range(total):
            local = i if i < self.num_canaries else i - self.num_canaries
            for step in range(len(tensors)):
                name, lo, stop = tensors[(local + step) % len(tensors)]
                if self.kind == "per_tensor" or used[name] < stop - lo:
                    break
            else:
                raise ValueError(
                    f"OneShotCanaryAudit kind dirac needs {total} distinct coordinates but the payload's tensors of at "
                    f"least 4 coordinates hold {sum(stop - lo for _, lo, stop in tensors)}; use fewer canaries."
                )
            if self.kind == "dirac":
                rows[i, lo + order[name][used[name]]] = 1.0
                used[name] += 1
            else:
                v = torch.randn(stop - lo, generator=make_generator(seed, "canary", i), dtype=torch.float32)
                rows[i, lo:stop] = v / v.norm()
            self.groups.append((name, lo, stop))
        return rows

    def _cosines(self, step: Tensor) -> Tensor:
        """Cosine of every canary with ``step`` (per-tensor kinds: with the canary's tensor's part of it)."""
        assert self.directions is not None
        dots = (self.directions @ step).double().cpu()
        if self.kind == "random":
            norm = float(step.norm())
            return dots / norm if norm > 0 else torch.zeros_like(dots)
        norms = {name: float(step[lo:stop].norm()) for name, lo, stop in set(self.groups)}
        scale = torch.tensor([norms[name] for name, _, _ in self.groups], dtype=torch.float64)
        return torch.where(scale > 0, dots / scale.clamp_min(1e-300), torch.zeros_like(dots))

    def on_fit_start(self, trainer: FederatedTrainer) -> None:
        assert trainer.global_params is not None
        if self.initial is None:
            self.initial = trainer.global_params.detach().clone()

    # ------------------------------------------------------------------ a round
    def present(self, round_idx: int) -> list[int]:
        """The inserted canaries that take part in ``round_idx`` (the same on every process)."""
        if self.participation == "every_round":
            return list(range(self.inserted))
        draws = torch.rand(self.inserted, generator=make_generator(self._seed, "canary_participation", round_idx))
        return torch.nonzero(draws < self.rate).flatten().tolist()

    def on_round_start(self, trainer: FederatedTrainer, round_idx: int, cohort: list[int]) -> None:
        assert trainer.global_params is not None
        self._before = trainer.global_params.detach().clone()
        self._present = self.present(round_idx)

    def _norm(self, trainer: FederatedTrainer) -> float:
        if self.canary_norm is not None:
            return float(self.canary_norm)
        assert trainer.privacy is not None
        clip = trainer.privacy.noise_plan().clip_norm
        assert clip is not None
        return float(clip) * self.clip_multiple

    def extra_updates(self, trainer: FederatedTrainer, round_idx: int, cohort: list[int]) -> list[ClientUpdate]:
        assert self.directions is not None
        norm = self._norm(trainer)
        return [
            ClientUpdate(self.num_clients + i, self.directions[i] * norm, num_examples=self.canary_examples, num_steps=1)
            for i in self._present
        ]

    def on_round_end(self, trainer: FederatedTrainer, result: RoundResult) -> None:
        assert self.directions is not None and self.max_cos is not None and self.appearances is not None
        inserted = len(self._present)
        if not result.skipped:  # the trainer counts canaries as extra updates, never as clients
            self.appearances[self._present] += 1
        result.metrics["audit/canaries_inserted"] = float(0 if result.skipped else inserted)
        if "privacy/epsilon" in result.metrics:
            self.accountant_epsilon = float(result.metrics["privacy/epsilon"])
        if "privacy/delta" in result.metrics:
            self.run_delta = float(result.metrics["privacy/delta"])
        assert trainer.global_params is not None and self._before is not None
        step = (trainer.global_params - self._before).to(self.directions.dtype)
        if float(step.norm()) > 0:
            self.max_cos = torch.maximum(self.max_cos, self._cosines(step))
        self.rounds_seen += 1
        if trainer.round_idx >= trainer.rounds:  # the last round: report with it (logged at its step)
            result.metrics.update(self.finish(trainer))

    def on_fit_end(self, trainer: FederatedTrainer) -> None:
        if self.report is None or self.report["rounds"] != self.rounds_seen:  # stopped early (privacy budget)
            metrics = self.finish(trainer)
            if trainer.logger is not None and trainer.is_global_zero and trainer.history:
                trainer.logger.log_metrics(metrics, step=int(trainer.history[-1]["round"]))
        if trainer.is_global_zero and self.report is not None:
            r = self.report
            print(
                f"[lightfed audit] one-shot empirical epsilon (delta {r['delta']:.3g}): final model "
                f"{_fmt(r['final_model'])}, all iterates {_fmt(r['all_iterates'])}; claimed for a canary "
                f"{r['claimed_epsilon']:.4g}, accountant {_num(r['accountant_epsilon'])}"
                + (f"; one-run lower bound {r['one_run']['epsilon_lower_bound']:.4g}" if "one_run" in r else "")
                + f"  -> {r['path']}",
                flush=True,
            )

    # ------------------------------------------------------------------ the estimate
    def statistics(self, trainer: FederatedTrainer) -> tuple[np.ndarray, np.ndarray]:
        """Per-canary statistics (final model, all iterates), inserted canaries first."""
        assert self.directions is not None and self.initial is not None and self.max_cos is not None
        assert trainer.global_params is not None
        total_step = (trainer.global_params - self.initial).to(self.directions.dtype)
        return self._cosines(total_step).numpy(), self.max_cos.numpy()

    def finish(self, trainer: FederatedTrainer) -> dict[str, float]:
        """Fit, estimate, write the JSON report (rank 0); return the ``audit/...`` metrics."""
        final, iterates = self.statistics(trainer)
        delta = self.delta or self.run_delta or default_delta(self.num_clients)
        claimed = self.claimed_epsilon(trainer, delta)
        k = self.inserted
        # Share of the model's change that the inserted canaries themselves make up (their directions are
        # nearly orthonormal, so it is the sum of their squared cosines, less what random directions get).
        share = max(0.0, float(np.sum(final[:k] ** 2)) - k / self.dimension)
        if share > 0.5 and trainer.is_global_zero:
            log.warning(
                "the canaries make up %.0f%% of the model's change: the estimate is capped near sqrt(d / k) standard "
                "deviations and understates the leakage. Use fewer canaries or a larger payload.", 100 * share,
            )
        metrics = {"audit/epsilon_claimed": claimed}
        if self.accountant_epsilon is not None:
            metrics["audit/epsilon_accountant"] = self.accountant_epsilon
        estimates: dict[str, Any] = {}
        for name, stat in (("final_model", final), ("all_iterates", iterates)):
            part = self._estimate(stat[:k], stat[k:], delta, derive_seed(self._seed, "bootstrap", name))
            estimates[name] = part
            tag = "final" if name == "final_model" else "all_iterates"
            metrics[f"audit/epsilon_{tag}"] = part["epsilon"]
            metrics[f"audit/epsilon_{tag}_low"] = part["interval"][0]
            metrics[f"audit/epsilon_{tag}_high"] = part["interval"][1]
        if self.kind != "random":
            estimates["groups"] = self._group_estimates(final, iterates, delta)
            finite = [g["final_model"]["epsilon"] for g in estimates["groups"].values()]
            finite += [g["all_iterates"]["epsilon"] for g in estimates["groups"].values()]
            estimates["max_group_epsilon"] = max(finite) if finite else None
            if finite:
                metrics["audit/epsilon_max_group"] = max(finite)
        if self.inclusion == "coin":
            estimates["one_run"] = self._one_run_bounds(final, iterates, delta)
            for name, tag in (("final_model", "final"), ("all_iterates", "all_iterates")):
                metrics[f"audit/epsilon_lower_bound_{tag}"] = estimates["one_run"][name]["epsilon_lower_bound"]
            metrics["audit/epsilon_lower_bound"] = estimates["one_run"]["epsilon_lower_bound"]
        # The report in reading order: what was audited, the claim against the estimate, then the set-up.
        report: dict[str, Any] = {
            "audit": "OneShotCanaryAudit",
            "paper": "Andrew et al., One-shot Empirical Privacy Estimation for Federated Learning, ICLR 2024",
            "claimed_epsilon": claimed, "accountant_epsilon": self.accountant_epsilon, **estimates,
            "rounds": self.rounds_seen, "num_canaries": k, "num_held_out": self.num_held_out,
            "kind": self.kind, "inclusion": self.inclusion, "participation": self.participation, "participation_rate": self.rate,
            "mean_appearances": float(self.appearances.double().mean()), "dimension": self.dimension,
            "canary_norm": self.canary_norm, "clip_multiple": self.clip_multiple, "delta": delta,
            "confidence": self.confidence, "canary_share_of_update": share, "seed": self._seed,
        }
        path = trainer.log_dir / self.report_name
        report["path"] = str(path)
        report["metrics"] = metrics
        self.report = report
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
        return metrics

    def _group_estimates(self, final: np.ndarray, iterates: np.ndarray, delta: float) -> dict[str, Any]:
        """The estimate of each tensor's canaries (at least 2 inserted and 2 held out)."""
        k, out = self.inserted, {}
        names = [name for name, _, _ in self.groups]
        for name in dict.fromkeys(names):
            seen = [i for i in range(k) if names[i] == name]
            unseen = [i for i in range(k, len(names)) if names[i] == name]
            if len(seen) < 2 or len(unseen) < 2:
                continue
            out[name] = {"num_canaries": len(seen), "dimension": next(stop - lo for n, lo, stop in self.groups if n == name)}
            for part, stat in (("final_model", final), ("all_iterates", iterates)):
                out[name][part] = self._estimate(stat[seen], stat[unseen], delta, derive_seed(self._seed, "bootstrap", name, part))
        return out

    def _one_run_bounds(self, final: np.ndarray, iterates: np.ndarray, delta: float) -> dict[str, Any]:
        """Steinke et al.'s lower bound from each statistic, at ``beta / 2`` each (Bonferroni over the two)."""
        included = [True] * self.inserted + [False] * (len(final) - self.inserted)
        beta = (1 - self.confidence) / 2
        out: dict[str, Any] = {
            name: best_one_run_bound(stat.tolist(), included, delta=delta, beta=beta)
            for name, stat in (("final_model", final), ("all_iterates", iterates))
        }
        out["epsilon_lower_bound"] = max(out["final_model"]["epsilon_lower_bound"],
                                         out["all_iterates"]["epsilon_lower_bound"])
        out.update({"candidates": len(final), "delta": delta, "confidence": self.confidence})
        return out

    def _estimate(self, seen: np.ndarray, unseen: np.ndarray, delta: float, seed: int) -> dict[str, Any]:
        def eps(a: np.ndarray, b: np.ndarray) -> float:
            p, q = GaussianFit.of(a), GaussianFit.of(b)
            if p.std <= 0 or q.std <= 0:
                return math.inf if p.mean != q.mean else 0.0
            return epsilon_two_gaussians(p, q, delta)

        low, high = bootstrap_interval(eps, seen, unseen, draws=self.bootstrap, confidence=self.confidence, seed=seed)
        p, q = GaussianFit.of(seen), GaussianFit.of(unseen)
        return {
            "epsilon": eps(seen, unseen), "interval": [low, high],
            "inserted_mean": p.mean, "inserted_std": p.std, "held_out_mean": q.mean, "held_out_std": q.std,
            "null_std": 1 / math.sqrt(self.dimension),
        }

    def claimed_epsilon(self, trainer: FederatedTrainer, delta: float) -> float:
        """What the mechanism promises a canary: its update-sum noise over the canary's participation, at ``delta``.

        ``inf`` without client-level noise on the sum (no DP, local DP, DP-SGD).
        """
        plan = trainer.privacy.noise_plan() if trainer.privacy is not None else None
        if plan is None or plan.placement not in ("server", "distributed") or plan.noise_multiplier <= 0:
            return math.inf
        n = self.num_clients
        if self.participation == "every_round":
            scheme = SamplingScheme("full", n, 1.0, n)
        else:
            scheme = SamplingScheme("poisson", n, self.rate)
        return epsilon_for(plan.noise_multiplier, scheme, self.rounds_seen, delta)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "initial": self.initial, "max_cos": self.max_cos, "appearances": self.appearances,
            "rounds_seen": self.rounds_seen, "num_canaries": self.num_canaries, "num_held_out": self.num_held_out,
            "participation": self.participation, "kind": self.kind, "inclusion": self.inclusion,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = (self.num_canaries, self.num_held_out, self.participation, self.kind, self.inclusion)
        theirs = (state["num_canaries"], state["num_held_out"], state["participation"], state.get("kind", "random"),
                  state.get("inclusion", "split"))
        if mine != theirs:
            raise ValueError(
                f"the checkpoint's canary audit had (num_canaries, num_held_out, participation, kind, inclusion) = {theirs}, this run "
                f"{mine}: resume with the same audit settings, or the estimate mixes two experiments."
            )
        device = self.directions.device if self.directions is not None else "cpu"
        self.initial = state["initial"].to(device)
        self.max_cos = state["max_cos"]
        self.appearances = state["appearances"]
        self.rounds_seen = int(state["rounds_seen"])


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _fmt(part: dict[str, Any]) -> str:
    low, high = part["interval"]
    return f"{part['epsilon']:.4g} [{low:.3g}, {high:.3g}]"


__all__ = ["MAX_CANARY_BYTES", "OneShotCanaryAudit"]
