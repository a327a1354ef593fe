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
    """Epsilon at ``delta`` after ``rounds`` rounds (``inf`` for ``z = 0``, ``0`` for no round)."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    dpa = require_dp_accounting()
    acc = make_accountant(scheme, accountant, pld_discretization)
    with _quiet_absl():
        acc.compose(dpa.SelfComposedDpEvent(round_event(noise_multiplier, scheme, accountant), int(rounds)))
        return float(acc.get_epsilon(delta))


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


class RoundAccountant:
    """Client-level accountant: composes one event per round; checkpointable.

    The state is the number of rounds composed plus the description of the mechanism; epsilon is
    recomputed from it by dp-accounting, so a resumed run continues exactly where it stopped, and a
    checkpoint written for another mechanism (noise, sampler, delta, accountant) is refused.

    Args:
        noise_multiplier: ``z`` of every round.
        scheme: The sampling scheme.
        delta: The delta at which epsilon is reported.
        accountant: ``"pld"`` (default, tight) or ``"rdp"``.
        pld_discretization: Grid width of the PLD.
    """

    def __init__(
        self,
        noise_multiplier: float,
        scheme: SamplingScheme,
        delta: float,
        accountant: AccountantName = "pld",
        pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
    ) -> None:
        _check_accountant(accountant)
        self.noise_multiplier = float(noise_multiplier)
        self.scheme = scheme
        self.delta = float(delta)
        self.accountant = accountant
        self.pld_discretization = pld_discretization
        self.rounds = 0
        self._cache: dict[int, float] = {}

    def epsilon(self, rounds: int | None = None) -> float:
        """Epsilon after ``rounds`` rounds (default: the rounds composed so far)."""
        t = self.rounds if rounds is None else int(rounds)
        if t not in self._cache:
            self._cache[t] = epsilon_for(
                self.noise_multiplier, self.scheme, t, self.delta, self.accountant, self.pld_discretization
            )
        return self._cache[t]

    def step(self, rounds: int = 1) -> float:
        """Compose ``rounds`` more rounds; return the epsilon spent so far."""
        self.rounds += int(rounds)
        return self.epsilon()

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
