"""Privacy accounting with Google's ``dp-accounting``, with events derived from the configured sampler.

A round of client-level DP releases ``sum_k clip(Delta_k) + N(0, (z C)^2 I)``: a Gaussian mechanism with
noise multiplier ``z`` on a sum whose L2 sensitivity is ``C`` (add or remove one client) or ``2C`` (replace
one client). Which event describes a round depends only on how the cohort was drawn, so the events are
built from the sampler (``sampler.kind``, ``sampler.rate(N)``), never typed in by hand:

================  ==============================  =========================================================
sampler.kind      neighbouring relation           dp-accounting event per round
================  ==============================  =========================================================
``"poisson"``     add or remove one client        ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``
``"uniform"``     replace one client (N public)   RDP: ``SampledWithoutReplacementDpEvent(N, m,
                                                  GaussianDpEvent(z / 2))``; PLD: see below
``"full"``        add or remove one client        ``GaussianDpEvent(z)`` (no amplification)
================  ==============================  =========================================================

Fixed-size sampling without replacement (``"uniform"``) needs care, because the two accountants of
dp-accounting use different conventions:

* RDP (Wang, Balle & Kasiviswanathan 2019, Thm. 27) takes the noise multiplier *relative to the
  replace-one sensitivity* ``2C``: the event carries ``z / 2`` and the accountant ``REPLACE_ONE``.
* dp-accounting's PLD has no event for sampling without replacement. Its ``REPLACE_ONE`` relation on a
  subsampled Gaussian builds in the ``2C`` distance but models *Poisson* sampling under substitution,
  the pair ``((1-q) N(0) + q N(-C), (1-q) N(0) + q N(C))``, which is **not** an upper bound for a
  fixed-size cohort: if every other client holds the same update ``v`` and the neighbour replaces one
  ``v`` by ``-v``, the two outputs are ``N(0)`` and ``(1-q) N(0) + q N(2C)`` (after a shift), whose
  ``delta(epsilon)`` is an order of magnitude larger (``tests/privacy/test_accounting.py`` computes both).
  That pair is the dominating pair of sampling without replacement under substitution (Balle, Barthe &
  Gaboardi 2018, Thm. 10; Zhu, Dong & Wang 2022; Lebeda, Regehr, Kamath & Steinke 2024), and it is
  exactly dp-accounting's add/remove PLD of the Poisson-subsampled Gaussian with sampling probability
  ``m / N`` and sensitivity ``2C``, i.e. noise multiplier ``z / 2``. That is what the PLD accountant
  composes here.

The public entry points are :func:`round_event`, :func:`epsilon_for`, :func:`calibrate_noise_multiplier`,
:func:`sum_noise_std` and the stateful :class:`RoundAccountant` (checkpointable); secure aggregation
with distributed noise reuses them for the epsilon of ``(noise multiplier, sampler, rounds)``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

from lightfed.sampling import ClientSampler

AccountantName = Literal["pld", "rdp"]
_ACCOUNTANTS = ("pld", "rdp")
#: Width of the PLD's privacy-loss grid. 1e-3 gives the same epsilon as the library default 1e-4 to
#: about 1e-4 relative (the estimate stays pessimistic, i.e. an upper bound) at a tenth of the time.
DEFAULT_PLD_DISCRETIZATION = 1e-3


def require_dp_accounting() -> Any:
    """Import ``dp_accounting`` or explain how to install it."""
    try:
        import dp_accounting
    except ImportError as err:  # pragma: no cover - CI installs it
        raise ImportError(
            "lightfed's privacy accounting needs Google's dp-accounting: pip install -e \".[privacy]\" (in a checkout of lightfed)"
        ) from err
    return dp_accounting


def default_delta(num_clients: int) -> float:
    """``1 / N^1.1``: below ``1 / N``, so "leak one client's data outright" is not within the budget."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}.")
    return 1.0 / num_clients**1.1


def sum_noise_std(noise_multiplier: float, clip_norm: float) -> float:
    """Standard deviation of the Gaussian noise on the SUM of clipped updates: ``z * C``.

    The mean divides it by the fixed expected cohort ``m`` (or ``q W``), giving ``z C / m``.
    """
    return float(noise_multiplier) * float(clip_norm)


@dataclass(frozen=True)
class SamplingScheme:
    """How a round's cohort is drawn, as the accountant needs it (derived from a :class:`ClientSampler`).

    Attributes:
        kind: ``"poisson"``, ``"uniform"`` (fixed size, without replacement) or ``"full"``.
        num_clients: Population size ``N``.
        rate: Probability ``q`` that a given client takes part in a round.
        cohort: Fixed cohort size ``m`` (``"uniform"`` and ``"full"``), ``None`` for Poisson.
    """

    kind: str
    num_clients: int
    rate: float
    cohort: int | None = None

    @classmethod
    def from_sampler(cls, sampler: ClientSampler, num_clients: int) -> SamplingScheme:
        """Read ``sampler.kind`` and ``sampler.rate``; refuse samplers the accountant cannot describe."""
        kind = getattr(sampler, "kind", "custom")
        if kind == "poisson":
            return cls("poisson", num_clients, float(sampler.rate(num_clients)))
        if kind == "uniform":
            m = int(round(sampler.expected_cohort(num_clients)))
            return cls("uniform", num_clients, m / num_clients, m)
        if kind == "full":
            return cls("full", num_clients, 1.0, num_clients)
        raise ValueError(
            f"the privacy accountant cannot describe sampler {type(sampler).__name__} (kind={kind!r}); it "
            f"supports kind 'poisson', 'uniform' and 'full'. Use `trainer.sampler: class_path: "
            f"lightfed.PoissonSampler` (the DP default), a UniformSampler, or FullParticipation."
        )

    @property
    def expected_cohort(self) -> float:
        """``m = q N``: the fixed denominator of the DP mean."""
        return self.rate * self.num_clients

    @property
    def neighbouring(self) -> str:
        """``"add_or_remove"`` (Poisson, full) or ``"replace_one"`` (fixed-size cohort, N public)."""
        return "replace_one" if self.kind == "uniform" else "add_or_remove"

    def describe(self) -> str:
        if self.kind == "poisson":
            return f"Poisson sampling, q={self.rate:.4g} (expected {self.expected_cohort:.4g} of N={self.num_clients})"
        if self.kind == "uniform":
            return f"fixed-size sampling without replacement, m={self.cohort} of N={self.num_clients} (q={self.rate:.4g})"
        return f"full participation, all N={self.num_clients} clients every round"


def _check_accountant(accountant: str) -> None:
    if accountant not in _ACCOUNTANTS:
        raise ValueError(f"privacy accountant must be 'pld' or 'rdp', got {accountant!r}.")


def make_accountant(
    scheme: SamplingScheme, accountant: AccountantName = "pld", pld_discretization: float = DEFAULT_PLD_DISCRETIZATION
) -> Any:
    """A fresh dp-accounting accountant with the neighbouring relation :func:`round_event` assumes."""
    _check_accountant(accountant)
    dpa = require_dp_accounting()
    rel = dpa.NeighboringRelation
    if accountant == "rdp":
        relation = rel.REPLACE_ONE if scheme.kind == "uniform" else rel.ADD_OR_REMOVE_ONE
        return dpa.rdp.RdpAccountant(neighboring_relation=relation)
    # PLD: add/remove everywhere; a fixed-size cohort is handled by its dominating pair (module docstring).
    return dpa.pld.PLDAccountant(rel.ADD_OR_REMOVE_ONE, value_discretization_interval=pld_discretization)


def round_event(noise_multiplier: float, scheme: SamplingScheme, accountant: AccountantName = "pld") -> Any:
    """The dp-accounting event of one round: a Gaussian of multiplier ``z`` on a sum of clipped updates.

    Args:
        noise_multiplier: ``z``; the noise std on the sum is ``z * C``.
        scheme: How the cohort is drawn (:meth:`SamplingScheme.from_sampler`).
        accountant: ``"pld"`` or ``"rdp"`` (the fixed-size cohort's event differs, see the module docstring).
    """
    _check_accountant(accountant)
    dpa = require_dp_accounting()
    z = float(noise_multiplier)
    if scheme.kind == "full":
        return dpa.GaussianDpEvent(z)
    if scheme.kind == "poisson":
        return dpa.PoissonSampledDpEvent(scheme.rate, dpa.GaussianDpEvent(z))
    assert scheme.cohort is not None
    if accountant == "rdp":
        return dpa.SampledWithoutReplacementDpEvent(scheme.num_clients, scheme.cohort, dpa.GaussianDpEvent(z / 2))
    if scheme.cohort == scheme.num_clients:
        return dpa.GaussianDpEvent(z / 2)
    return dpa.PoissonSampledDpEvent(scheme.rate, dpa.GaussianDpEvent(z / 2))


def epsilon_for(
    noise_multiplier: float,
    scheme: SamplingScheme,
    rounds: int,
    delta: float,
    accountant: AccountantName = "pld",
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds (``inf`` for ``z = 0``, ``0`` for no round).

    Raises:
        ValueError: the PLD of ``rounds`` rounds would not fit in memory (use the RDP accountant).
    """
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    base = one_round_pld(noise_multiplier, scheme, accountant, pld_discretization)
    if base is not None:
        return pld_epsilon(base, int(rounds), delta, pld_discretization)
    dpa = require_dp_accounting()
    acc = make_accountant(scheme, accountant, pld_discretization)
    with _quiet_absl():
        acc.compose(dpa.SelfComposedDpEvent(round_event(noise_multiplier, scheme, accountant), int(rounds)))
        return float(acc.get_epsilon(delta))


def one_round_pld(
    noise_multiplier: float, scheme: SamplingScheme, accountant: AccountantName, pld_discretization: float
) -> Any:
    """The privacy-loss distribution of one subsampled round, as dp-accounting's PLD accountant builds it.

    Building it is most of the cost of an epsilon (a few hundred ms); composing it ``t`` times is the rest.
    ``None`` when the round's event is not a subsampled Gaussian (RDP, full participation: cheap anyway).
    """
    if accountant != "pld" or noise_multiplier <= 0:
        return None
    event = round_event(noise_multiplier, scheme, accountant)
    dpa = require_dp_accounting()
    if not isinstance(event, dpa.PoissonSampledDpEvent):
        return None
    return dpa.pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=event.event.noise_multiplier,
        value_discretization_interval=pld_discretization,
        sampling_prob=event.sampling_probability,
        neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )


#: The most points a composed PLD may hold (complex128 FFT buffers: about 2 GiB at this size).
MAX_PLD_POINTS = 2**27


def pld_epsilon(base: Any, rounds: int, delta: float, pld_discretization: float) -> float:
    """Epsilon at ``delta`` of ``base`` composed ``rounds`` times: exactly dp-accounting's PLD accountant
    (the identity composed with ``base.self_compose(rounds)``), after checking the memory it needs.

    Raises:
        ValueError: the composition needs more than :data:`MAX_PLD_POINTS` points (say how many rounds fit).
    """
    dpa = require_dp_accounting()
    points = _composed_points(base, rounds)
    if points > MAX_PLD_POINTS:
        raise ValueError(
            f"the PLD privacy accountant cannot compose {rounds} rounds: it would hold {points:.3g} points "
            f"(~{points * 16 / 2**30:.0f} GiB). Use privacy.init_args.accountant: rdp (any number of "
            f"rounds), fewer trainer.rounds, or a coarser privacy.init_args.pld_discretization."
        )
    try:
        pld = dpa.pld.privacy_loss_distribution.identity(value_discretization_interval=pld_discretization)
        return float(pld.compose(base.self_compose(rounds)).get_epsilon_for_delta(delta))
    except MemoryError as err:
        raise ValueError(
            f"the PLD privacy accountant ran out of memory composing {rounds} rounds; use privacy.init_args."
            f"accountant: rdp or fewer trainer.rounds."
        ) from err


def _composed_points(base: Any, rounds: int) -> float:
    """An upper estimate of the support of ``base`` composed ``rounds`` times (dp-accounting's own bounds)."""
    try:
        from dp_accounting.pld import common

        pmfs = [getattr(base, "_pmf_remove", None), getattr(base, "_pmf_add", None)]
        sizes = [0]
        for pmf in pmfs:
            probs = getattr(pmf, "_probs", None)
            if probs is not None and len(probs) * rounds > MAX_PLD_POINTS:  # else the whole support fits
                lo, hi = common.compute_self_convolve_bounds(probs, rounds, 1e-15)
                sizes.append(hi - lo + 1)
        return float(max(sizes))
    except Exception:  # noqa: BLE001 - dp-accounting's internals moved: rely on the MemoryError guard
        return 0.0


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    scheme: SamplingScheme,
    rounds: int,
    accountant: AccountantName = "pld",
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
    tol: float = 1e-3,
) -> float:
    """The smallest ``z`` (within ``tol``) whose epsilon after ``rounds`` rounds is at most ``target_epsilon``.

    Uses dp-accounting's ``calibrate_dp_mechanism`` (Brent's method over fresh accountants) inside a
    bracket found by doubling / halving from ``z = 1``, then steps ``z`` up by ``tol`` until the epsilon is
    really within the target (Brent's root may sit a hair below).
    """
    if target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}.")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}.")
    dpa = require_dp_accounting()

    def event(z: float) -> Any:
        return dpa.SelfComposedDpEvent(round_event(z, scheme, accountant), int(rounds))

    def gap(z: float) -> float:
        return epsilon_for(z, scheme, rounds, delta, accountant, pld_discretization) - target_epsilon

    lower, upper = _bracket(gap, target_epsilon)
    with _quiet_absl():
        z = float(
            dpa.calibrate_dp_mechanism(
                lambda: make_accountant(scheme, accountant, pld_discretization),
                event,
                target_epsilon,
                delta,
                bracket_interval=dpa.ExplicitBracketInterval(lower, upper),
                tol=tol,
            )
        )
    while epsilon_for(z, scheme, rounds, delta, accountant, pld_discretization) > target_epsilon:
        z += tol
    return z


def _bracket(gap: Any, target_epsilon: float) -> tuple[float, float]:
    """``(lo, hi)`` with ``gap(lo) > 0 >= gap(hi)``, by doubling / halving from ``z = 1``.

    The search never evaluates tiny multipliers unless it must: the PLD of ``z << 0.1`` is slow (its privacy
    losses are huge) and such a ``z`` only fits absurd targets.
    """
    z = 1.0
    if gap(z) > 0:
        while gap(2 * z) > 0:
            z *= 2
            if z > 2**20:
                raise ValueError(f"no noise multiplier up to 2^20 reaches target epsilon {target_epsilon}.")
        return z, 2 * z
    while True:
        if z / 2 < 0.25:
            raise ValueError(
                f"target epsilon {target_epsilon} is reached with almost no noise (z <= 0.25); such a guarantee is "
                f"meaningless. Lower privacy.init_args.target_epsilon or set noise_multiplier directly."
            )
        if gap(z / 2) > 0:
            return z / 2, z
        z /= 2


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp-accounting's RDP logs an absl warning for every fractional order it drops; keep the console clean."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


#: The most rounds whose epsilon curve is computed in one go, round by round (beyond: one epsilon at a time).
CURVE_ROUNDS = 1000


class RoundAccountant:
    """Client-level accountant: composes one event per round; checkpointable; free per round.

    The state is the number of rounds composed plus the description of the mechanism; epsilon is computed
    from it by dp-accounting, so a resumed run continues exactly where it stopped, and a checkpoint written
    for another mechanism (noise, sampler, delta, accountant) is refused.

    The noise schedule is fixed at set-up, so the epsilon after ``t`` rounds is a fixed curve. With the
    planned ``rounds`` known, the whole curve is computed at the first request (at set-up, when the plan is
    printed), composing one round at a time exactly as dp-accounting's PLD accountant does when it is given
    the round's event once per round (:meth:`curve`); a round then costs a dictionary look-up, and the budget
    stop (:meth:`within`) reads the same curve. Beyond the planned rounds or :data:`CURVE_ROUNDS` (a run of
    10^9 rounds), epsilons are computed one at a time, only where they are read (the budget stop by doubling
    then bisection), each from the privacy-loss distribution of a round built once, with a memory check.

    Args:
        noise_multiplier: ``z`` of every round.
        scheme: The sampling scheme.
        delta: The delta at which epsilon is reported.
        accountant: ``"pld"`` (default, tight) or ``"rdp"``.
        pld_discretization: Grid width of the PLD.
        rounds: The planned number of rounds (``trainer.rounds``), if known.
    """

    def __init__(
        self,
        noise_multiplier: float,
        scheme: SamplingScheme,
        delta: float,
        accountant: AccountantName = "pld",
        pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
        *,
        rounds: int | None = None,
    ) -> None:
        _check_accountant(accountant)
        self.noise_multiplier = float(noise_multiplier)
        self.scheme = scheme
        self.delta = float(delta)
        self.accountant = accountant
        self.pld_discretization = pld_discretization
        self.planned_rounds = rounds
        self.rounds = 0
        self._cache: dict[int, float] = {}
        #: Per budget ``max_epsilon``: (most rounds known within it, fewest rounds known beyond it or None).
        self._bounds: dict[float, tuple[int, int | None]] = {}
        self._base: Any = None
        self._chain: tuple[int, Any] | None = None  # (t, the PLD of t rounds composed one at a time)

    def epsilon(self, rounds: int | None = None) -> float:
        """Epsilon after ``rounds`` rounds (default: the rounds composed so far), computed once."""
        t = self.rounds if rounds is None else int(rounds)
        if t not in self._cache:
            horizon = min(self.planned_rounds or 0, CURVE_ROUNDS)
            next_on_chain = self._chain is not None and t == self._chain[0] + 1
            if 0 < t and self._one_round() is not None and (t <= horizon or next_on_chain):
                self.curve(max(t, horizon))
            else:
                self._cache[t] = self._compute(t)
        return self._cache[t]

    def curve(self, rounds: int) -> list[float]:
        """Epsilon after 1, 2, ..., ``rounds`` rounds, composing the round's PLD once per round.

        Each value is what ``dp_accounting.pld.PLDAccountant`` reports after ``compose(round_event)`` was
        called that many times (equal to the one-shot ``SelfComposedDpEvent`` of :func:`epsilon_for` to about
        1e-10 relative: the two truncate the tails in another order).
        """
        base = self._one_round()
        if base is None:
            return [self.epsilon(t) for t in range(1, rounds + 1)]
        t, pld = self._chain or (0, require_dp_accounting().pld.privacy_loss_distribution.identity(
            value_discretization_interval=self.pld_discretization))
        while t < rounds:
            t, pld = t + 1, pld.compose(base)
            self._cache.setdefault(t, float(pld.get_epsilon_for_delta(self.delta)))
        self._chain = (t, pld)
        return [self._cache[k] for k in range(1, rounds + 1)]

    def _one_round(self) -> Any:
        """The PLD of one round (``None``: RDP, full participation or no noise: dp-accounting is cheap)."""
        if self._base is None and self.noise_multiplier > 0:
            base = one_round_pld(self.noise_multiplier, self.scheme, self.accountant, self.pld_discretization)
            self._base = base.self_compose(1) if base is not None else False  # what the accountant composes
        return self._base or None

    def _compute(self, t: int) -> float:
        if t <= 0:
            return 0.0
        if self.noise_multiplier <= 0:
            return math.inf
        base = self._one_round()
        if base is None:
            return epsilon_for(
                self.noise_multiplier, self.scheme, t, self.delta, self.accountant, self.pld_discretization
            )
        return pld_epsilon(base, t, self.delta, self.pld_discretization)

    def step(self, rounds: int = 1) -> float:
        """Compose ``rounds`` more rounds; return the epsilon spent so far."""
        self.rounds += int(rounds)
        return self.epsilon()

    def within(self, max_epsilon: float, rounds: int) -> bool:
        """Whether ``rounds`` rounds spend at most ``max_epsilon`` (the budget stop).

        Epsilon grows with the rounds, so earlier answers bracket the stop: asked round by round, the bracket
        doubles while within budget and bisects once beyond, about ``2 log2 T`` epsilons in a run of ``T``
        rounds (look-ups in the curve when it was computed).
        """
        lo, hi = self._bounds.get(max_epsilon, (0, None))
        while rounds > lo and (hi is None or rounds < hi):
            probe = max(rounds, 2 * lo) if hi is None else (lo + hi) // 2
            if self.epsilon(probe) <= max_epsilon:
                lo = probe
            else:
                hi = probe
        self._bounds[max_epsilon] = (lo, hi)
        return rounds <= lo

    def describe(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "scheme": asdict(self.scheme),
            "delta": self.delta,
            "accountant": self.accountant,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, **self.describe()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the rounds composed; refuse a checkpoint of a different mechanism."""
        mine = self.describe()
        theirs = {k: state.get(k) for k in mine}
        for key, value in mine.items():
            other = theirs[key]
            same = math.isclose(value, other, rel_tol=1e-9) if isinstance(value, float) and isinstance(other, float) else value == other
            if not same:
                raise ValueError(
                    f"the checkpoint's privacy accountant has {key}={other!r} but this run has {value!r}; resuming "
                    f"would mix two mechanisms in one epsilon. Resume with the same privacy settings (for a longer "
                    f"run with target_epsilon, set privacy.init_args.noise_multiplier: {theirs['noise_multiplier']} "
                    f"instead)."
                )
        self.rounds = int(state["rounds"])
