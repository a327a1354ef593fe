"""``SecAggPlus``: the secure-aggregation plugin that runs a full SecAgg+ round inside each round's aggregator.

The trainer hands every accepted client's ``(update, weight)`` to :class:`SecAggPlusAggregator`. The
aggregator plays both parties with explicit messages (:mod:`lightfed.secagg.protocol`): the client
object turns its contribution into a masked vector, the server object only ever adds masked vectors and,
after the unmasking stage, releases the decoded sums as a :class:`~lightfed.messages.RoundAggregate` --
or ``None`` when the round fails closed.

Each client's contribution is one vector, so the server learns only sums, weights included:

``x_k = [w_k delta_k, w_k e_k (each extra), w_k, w_k m_k (each metric)] / W ++ [n_k (each count), c_k]``

with ``W`` = ``max_weight`` (a public bound on the weights, so every entry stays inside its clipping
range), ``n_k`` the update's counts (a privacy mechanism's centred clip bit, summed unweighted) and
``c_k`` the fraction of coordinates the client had to clip (neither divided by W).
The server rescales by ``W``; the weighted metric means are ``sum w m / sum w``.

With distributed Gaussian noise (``(z, C)``, ``n_min`` survivors at least) each client

1. clips ``w (delta_k, e_k)`` -- the update *and every extra together* (SCAFFOLD's ``delta_c``) -- to L2
   norm ``C``, and adds ``N(0, sigma^2)``, ``sigma = z C / sqrt(n_min)``, to every coordinate of both, so
   every summed part the strategy consumes carries ``N(0, (z C)^2)`` or more on the sum;
2. sends no metrics (its loss would reach the server un-noised);
3. encodes into a range sized for signal plus noise, ``B = max(clip, (C + k sigma) / W)`` per coordinate,
   with ``k`` the smallest multiple of 0.1 whose two-sided Gaussian tail, union-bounded over all
   ``n d`` noisy coordinates of the round, is at most ``NOISE_TAIL = 1e-6``: the noise is clipped (and the
   released variance falls short of the plan) with probability at most 1e-6 per round.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lightfed.messages import ClientUpdate
from lightfed.privacy.base import NoisePlan
from lightfed.registry import SECURE_AGGREGATION
from lightfed.secagg.aggregator import SecAggPlusAggregator, flat_numpy
from lightfed.secagg.base import SecureAggregation
from lightfed.secagg.crypto import require_cryptography
from lightfed.secagg.dropout import DropoutModel, StageDropout
from lightfed.secagg.graph import Graph, harary_graph
from lightfed.secagg.quantize import FixedPoint, Layout
from lightfed.secagg.view import ServerView
from lightfed.seeding import derive_seed, make_generator
from lightfed.strategy import Strategy

#: Clipping range of a count (a privacy mechanism's centred clip bit lies in [-1/2, 1/2]).
COUNT_BOUND = 1.0
#: Probability bound (per round, union over all noisy coordinates) that distributed noise is clipped.
NOISE_TAIL = 1e-6


def tail_multiplier(draws: int, tail: float = NOISE_TAIL) -> float:
    """The smallest ``k`` (a multiple of 0.1) with ``draws * P(|N(0, 1)| > k) <= tail`` (union bound)."""
    k = 1.0
    while max(draws, 1) * math.erfc(k / math.sqrt(2)) > tail:
        k = round(k + 0.1, 1)
    return k


@SECURE_AGGREGATION.register("SecAggPlus")
class SecAggPlus(SecureAggregation):
    """SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020) with dropouts and optional distributed Gaussian DP noise.

    Args:
        clip: Clipping bound of each coordinate of ``w delta / W`` (and of the extras): values beyond
            ``+-clip`` are clipped before quantization (counted in ``secagg/clipped_fraction``). With
            ``|delta_i| <= clip`` nothing is ever clipped.
        extras_clip: Bound for strategy extras (SCAFFOLD control variates); ``None``: ``clip``.
        max_weight: ``W``, a public upper bound on a client's strategy weight (FedAvg: its example
            count). A larger weight is refused with an error.
        metrics_bound: Clipping bound of each ``w m / W`` of the client metrics (losses, accuracies).
        quantization_bits: ``q``: each coordinate becomes an integer in ``[-(2**(q-1)-1), 2**(q-1)-1]``.
        modulus_bits: ``b``: masks and sums live in Z_(2**b); a cohort whose sum could wrap is refused.
        num_neighbours: ``k``, the SecAgg+ degree; ``None``: ``2 ceil(log2 n)``; ``>= n - 1``: all pairs.
        threshold: Shamir threshold as a fraction of ``k``: ``t = floor(threshold k) + 1`` shares rebuild a
            secret; ``threshold >= 0.5`` (an honest majority of each neighbourhood) is required.
        max_dropout: Fraction of the cohort that may drop before sending masked input: rounds with fewer
            than ``n - floor(max_dropout n)`` masked inputs (and at least 2) fail closed. Distributed DP
            noise is calibrated for that many survivors.
        dropout: Simulated dropout: one probability for every stage, ``{stage: probability}``, or a
            :class:`~lightfed.secagg.dropout.DropoutModel`.
        noise_multiplier: ``z`` of distributed Gaussian DP noise set here (``None``/0: off, unless the
            privacy mechanism asks for distributed noise with ``noise_placement = "distributed"``, in
            which case its ``z`` and clip are used). Each client clips ``w delta`` to L2 norm ``C`` and
            adds ``N(0, (z C)**2 / n_min)`` before quantization, so any ``>= n_min`` survivors carry at
            least the ``N(0, (z C)**2)`` on the sum that the accountant assumes.
        noise_clip_norm: ``C`` for ``noise_multiplier``; ``None``: the privacy mechanism's ``clip_norm``.
        key_source: ``"seeded"`` (reproducible 256-bit keys derived from the run seed) or ``"os"``.
        noise_source: Where each client's distributed noise comes from: ``"seeded"`` (derived from
            ``(seed, round, client)``: reproducible and resumable, but whoever knows the run seed can
            recompute every share and subtract it from the sum, so the DP guarantee then holds only
            against a server that does not know the seed) or ``"os"`` (the operating system's entropy,
            as ``key_source: os``: nobody can recompute it; runs are no longer bit-reproducible).
        record_vectors: Keep every masked vector in the server view (else only SHA-256 digests).
        server_view_dir: If set, save each round's server view there as ``round-XXXXX.npz``.
        timer: ``"wall"`` (elapsed time) or ``"cpu"`` (process CPU time, stable on a shared machine) for the
            ``secagg/*_seconds`` metrics.
    """

    def __init__(
        self,
        *,
        clip: float = 1.0,
        extras_clip: float | None = None,
        max_weight: float = 1.0,
        metrics_bound: float = 1000.0,
        quantization_bits: int = 20,
        modulus_bits: int = 32,
        num_neighbours: int | None = None,
        threshold: float = 0.5,
        max_dropout: float = 0.2,
        dropout: float | dict[str, float] | DropoutModel = 0.0,
        noise_multiplier: float | None = None,
        noise_clip_norm: float | None = None,
        key_source: Literal["seeded", "os"] = "seeded",
        noise_source: Literal["seeded", "os"] = "seeded",
        record_vectors: bool = True,
        server_view_dir: str | None = None,
        timer: Literal["wall", "cpu"] = "wall",
    ) -> None:
        require_cryptography()
        for name, value in (("clip", clip), ("max_weight", max_weight), ("metrics_bound", metrics_bound)):
            if not value > 0:
                raise ValueError(f"secure_aggregation.{name} must be > 0, got {value}.")
        if extras_clip is not None and not extras_clip > 0:
            raise ValueError(f"secure_aggregation.extras_clip must be > 0 or null, got {extras_clip}.")
        if not 0.5 <= threshold < 1:
            raise ValueError(
                f"secure_aggregation.threshold must be in [0.5, 1) (a fraction of the neighbours; below 0.5 a "
                f"minority of a neighbourhood could rebuild a secret), got {threshold}."
            )
        if not 0 <= max_dropout < 1:
            raise ValueError(f"secure_aggregation.max_dropout must be in [0, 1), got {max_dropout}.")
        if noise_multiplier is not None and noise_multiplier < 0:
            raise ValueError(f"secure_aggregation.noise_multiplier must be >= 0, got {noise_multiplier}.")
        if noise_clip_norm is not None and not noise_clip_norm > 0:
            raise ValueError(f"secure_aggregation.noise_clip_norm must be > 0 or null, got {noise_clip_norm}.")
        if timer not in ("wall", "cpu"):
            raise ValueError(f"secure_aggregation.timer must be 'wall' or 'cpu', got {timer!r}.")
        if key_source not in ("seeded", "os"):
            raise ValueError(f"secure_aggregation.key_source must be 'seeded' or 'os', got {key_source!r}.")
        if noise_source not in ("seeded", "os"):
            raise ValueError(f"secure_aggregation.noise_source must be 'seeded' or 'os', got {noise_source!r}.")
        self.codec = FixedPoint(quantization_bits, modulus_bits)
        self.clip = float(clip)
        self.extras_clip = float(extras_clip) if extras_clip is not None else float(clip)
        self.max_weight = float(max_weight)
        self.metrics_bound = float(metrics_bound)
        self.num_neighbours = num_neighbours
        self.threshold = float(threshold)
        self.max_dropout = float(max_dropout)
        self.dropout = dropout if isinstance(dropout, DropoutModel) else StageDropout(dropout)
        self.noise_multiplier = float(noise_multiplier or 0.0)
        self.noise_clip_norm = noise_clip_norm
        self.key_source = key_source
        self.noise_source = noise_source
        self.record_vectors = record_vectors
        self.server_view_dir = server_view_dir
        self.timer = timer
        self.clock = time.perf_counter if timer == "wall" else time.process_time
        self.seed = 0
        self.numel = 0
        self.failed_rounds = 0
        self.rounds_run = 0
        self.last_view: ServerView | None = None
        self._privacy_noise: Any = None
        self._metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ contract
    def setup(self, *, strategy: Strategy, privacy: Any, numel: int, seed: int) -> None:
        """Refuse strategies that need individual updates and server-side clipping; resolve the DP noise.

        Raises:
            ValueError: for a ``needs_all_updates`` strategy; a privacy mechanism that clips on the server
                (which never sees an individual update under secure aggregation); distributed noise
                configured twice or on top of the mechanism's own server noise; a missing clip norm.
        """
        super().setup(strategy=strategy, privacy=privacy, numel=numel, seed=seed)
        self.seed, self.numel = int(seed), int(numel)
        self._privacy_noise = None
        name = type(privacy).__name__
        plan = privacy.noise_plan() if privacy is not None else NoisePlan()
        if plan.clipping == "server":
            raise ValueError(
                f"privacy {name} clips updates on the server, but under secure aggregation the server never holds "
                f"an individual update: set privacy.init_args.clipping: client."
            )
        if plan.placement == "distributed":
            if self.noise_multiplier > 0:
                raise ValueError(
                    f"privacy {name} already asks for distributed noise (noise_placement: distributed); remove "
                    f"secure_aggregation.noise_multiplier (the mechanism's noise multiplier is used)."
                )
            self._privacy_noise = privacy
            return
        if self.noise_multiplier == 0:
            return
        if plan.placement == "server" and plan.noise_multiplier > 0:
            raise ValueError(
                f"privacy {name} adds its own Gaussian noise to the unmasked sum on the server; adding "
                f"secure_aggregation.noise_multiplier={self.noise_multiplier} on the clients would noise the sum twice. "
                f"Use one: the mechanism's server noise (remove secure_aggregation.noise_multiplier) or distributed "
                f"noise (a mechanism with noise_placement: distributed)."
            )
        if self.noise_clip_norm is None:
            if plan.clip_norm is None:
                raise ValueError(
                    "secure_aggregation.noise_multiplier > 0 needs the L2 bound of a client's update: set "
                    "secure_aggregation.noise_clip_norm, or configure a privacy mechanism with a clip_norm."
                )
            self.noise_clip_norm = float(plan.clip_norm)

    def noise_params(self) -> tuple[float, float]:
        """``(z, C)`` of the distributed noise of the coming round; ``(0, 0)`` when there is none."""
        if self._privacy_noise is not None:
            plan = self._privacy_noise.noise_plan()
            assert plan.clip_norm is not None, "a distributed-noise plan always has a clip"
            return float(plan.noise_multiplier), float(plan.clip_norm)
        if self.noise_multiplier > 0:
            assert self.noise_clip_norm is not None, "setup() resolves noise_clip_norm"
            return self.noise_multiplier, float(self.noise_clip_norm)
        return 0.0, 0.0

    def min_survivors(self, cohort_size: int) -> int:
        """``n_min = n - floor(max_dropout n)`` (at least 2): the fewest masked inputs a released sum may have."""
        return max(2, cohort_size - math.floor(self.max_dropout * cohort_size))

    def noise_std_per_client(self, cohort_size: int) -> float:
        """``z C / sqrt(n_min)``: each client's share of the noise on ``w delta``."""
        z, clip_norm = self.noise_params()
        return z * clip_norm / math.sqrt(self.min_survivors(cohort_size)) if z > 0 else 0.0

    def aggregator(self, round_idx: int, cohort: list[int]) -> SecAggPlusAggregator:
        """Run the key stages for ``cohort`` and return the aggregator that masks and unmasks its inputs.

        Raises:
            ValueError: if the cohort's sum could wrap around the modulus (with the numbers).
        """
        self.codec.check_capacity(len(cohort))
        return SecAggPlusAggregator(self, round_idx, list(cohort))

    def round_metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"failed_rounds": self.failed_rounds, "rounds_run": self.rounds_run}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.failed_rounds = int(state.get("failed_rounds", 0))
        self.rounds_run = int(state.get("rounds_run", 0))

    # ------------------------------------------------------------------ client side
    def noise_range(self, numel: int, cohort_size: int) -> float:
        """``(C + k sigma) / W``: the coordinate range that holds a noisy clipped coordinate (0 without noise).

        ``|w x_i| <= C`` for a coordinate of an update clipped to L2 norm ``C``; ``k`` is
        :func:`tail_multiplier` over the ``n d`` noisy coordinates of the round.
        """
        z, clip_norm = self.noise_params()
        if z <= 0:
            return 0.0
        sigma = self.noise_std_per_client(cohort_size)
        return (clip_norm + tail_multiplier(numel * cohort_size) * sigma) / self.max_weight

    def layout_for(self, update: ClientUpdate, cohort_size: int = 1) -> Layout:
        """The public vector layout of a round, fixed by the shapes (not values) of the first update.

        Under distributed noise the update and extras segments are widened to :meth:`noise_range` and the
        client metrics are left out (they would reach the server without noise).
        """
        noisy = self.noise_params()[0] > 0
        numel = update.delta.numel() + sum(v.numel() for v in update.extras.values())
        wide = self.noise_range(numel, cohort_size)
        parts: list[tuple[str, int, float]] = [("delta", update.delta.numel(), max(self.clip, wide))]
        parts += [(f"extra/{k}", update.extras[k].numel(), max(self.extras_clip, wide)) for k in sorted(update.extras)]
        parts.append(("weight", 1, 1.0))
        parts += [] if noisy else [(f"metric/{k}", 1, self.metrics_bound) for k in sorted(update.metrics)]
        parts += [(f"count/{k}", 1, COUNT_BOUND) for k in sorted(update.counts)]
        parts.append(("clipped", 1, 1.0))
        return Layout.build(parts)

    def encode(
        self, update: ClientUpdate, weight: float, round_idx: int, layout: Layout, noise: tuple[float, float] = (0.0, 0.0)
    ) -> tuple[np.ndarray, int]:
        """Client side: ``x = [w delta (+ noise), w e, w, w m, c] / W``, clipped and quantized into Z_(2**b).

        Args:
            update: The client's update.
            weight: Its strategy (or privacy) weight ``w``.
            round_idx: The round (seeds the stochastic rounding and the noise).
            layout: The round's public layout.
            noise: ``(sigma, C)``: clip ``w delta`` to L2 norm ``C`` and add ``N(0, sigma**2)`` per coordinate
                (distributed DP); ``sigma = 0``: none.

        Returns:
            The encoded vector and the number of clipped coordinates.

        Raises:
            ValueError: for a weight outside ``[0, max_weight]`` or an update that does not fit ``layout``.
        """
        if not 0 <= weight <= self.max_weight:
            raise ValueError(
                f"round {round_idx}: client {update.client_id} has weight {weight:g}, outside [0, "
                f"secure_aggregation.max_weight={self.max_weight:g}]; the bound is public and sizes the "
                f"quantization. Set max_weight to at least the largest client weight (FedAvg: its example count)."
            )
        expected = self.layout_for(update)
        if [(g.name, g.length) for g in expected.segments] != [(g.name, g.length) for g in layout.segments]:
            raise ValueError(
                f"round {round_idx}: client {update.client_id} sends {expected.names()} but the round's layout is "
                f"{layout.names()}; every client of a round must send the same extras and metrics."
            )
        w, big_w = float(weight), self.max_weight
        values = np.zeros(layout.length, dtype=np.float64)
        delta = values[: update.delta.numel()]
        np.multiply(flat_numpy(update.delta), w, out=delta, dtype=np.float64)
        for name in sorted(update.extras):
            seg = layout[f"extra/{name}"]
            np.multiply(flat_numpy(update.extras[name]), w, out=values[seg.start : seg.stop], dtype=np.float64)
        stop = layout["weight"].start
        sigma, clip_norm = noise
        if sigma > 0:  # the update and every extra: clipped together, each coordinate noised
            signal = values[:stop]
            norm = float(np.linalg.norm(signal))
            if norm > clip_norm:
                signal *= clip_norm / norm
            signal += sigma * self._noise_rng(round_idx, update.client_id).standard_normal(stop)
        values[layout["weight"].start] = w
        for name in sorted(update.metrics):
            if f"metric/{name}" not in layout.names():
                continue  # not sent under distributed noise
            m = float(update.metrics[name])
            values[layout[f"metric/{name}"].start] = w * m if math.isfinite(m) else 0.0
        values /= big_w
        for name in sorted(update.counts):  # counts are summed unweighted (a privacy mechanism's clip bit)
            values[layout[f"count/{name}"].start] = float(update.counts[name])
        over = int(np.count_nonzero(np.abs(values[: update.delta.numel()]) > layout["delta"].bound))
        for name in sorted(update.extras):
            seg = layout[f"extra/{name}"]
            over += int(np.count_nonzero(np.abs(values[seg.start : seg.stop]) > seg.bound))
        values[layout["clipped"].start] = over / max(stop, 1)
        rng = np.random.default_rng(derive_seed(self.seed, "secagg/rounding", round_idx, update.client_id))
        encoded, _ = self.codec.encode(values, layout, rng)
        return encoded, over

    def _noise_rng(self, round_idx: int, client_id: int) -> np.random.Generator:
        if self.noise_source == "os":
            return np.random.default_rng()  # fresh OS entropy (numpy's SeedSequence reads os.urandom)
        return np.random.default_rng(derive_seed(self.seed, "secagg/noise", round_idx, client_id))

    def make_graph(self, round_idx: int) -> Any:
        """The server's graph sampler for a round (seeded by ``(seed, round)``)."""

        def make(members: list[int], k: int) -> Graph:
            return harary_graph(members, k, make_generator(self.seed, "secagg/graph", round_idx))

        return make

    # ------------------------------------------------------------------ bookkeeping
    def record_round(self, metrics: dict[str, float], view: ServerView) -> None:
        """Book-keeping of a finished round (called by its aggregator): metrics, failures, the saved view."""
        self.rounds_run += 1
        self.failed_rounds += int(view.failed)
        metrics["failed_rounds"] = float(self.failed_rounds)
        self._metrics = metrics
        self.last_view = view
        if self.server_view_dir:
            view.save(Path(self.server_view_dir) / f"round-{view.round_idx:05d}.npz")
