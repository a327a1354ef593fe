"""Device traces: how fast each client computes and communicates, and when it is online.

A trace answers three questions about client ``k`` (a pure function of the trace, ``k`` and the time, so
the same trace gives the same answers in every process and after a resume):

* :meth:`Trace.profile` -- its :class:`DeviceProfile`: milliseconds per training sample, download and
  upload bandwidth (kbit/s), and its availability windows;
* :meth:`DeviceProfile.available` -- whether it is online at virtual time ``t``;
* :meth:`DeviceProfile.online_until` -- when its current online window ends (it drops out then).

Two sources: :class:`FedScaleTrace` reads FedScale's device files (Lai et al. 2022, "FedScale:
Benchmarking Model and System Performance of Federated Learning at Scale"; the format is written out in
docs/time.md), and :class:`SyntheticTrace` draws a heterogeneous population from a seed (lognormal speeds,
one diurnal online window per day). Nothing is downloaded: a FedScale trace is a file the user has.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import pickle
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightfed.checks import check_positive, check_range, require
from lightfed.seeding import derive_seed

#: A day, in virtual seconds: the period of the synthetic diurnal availability.
DAY = 86400.0
#: How many recently asked-for synthetic devices are kept (each is recomputed from the seed when evicted).
_RECENT = 4096


@dataclass(frozen=True)
class DeviceProfile:
    """One client's device: speed, bandwidth and (periodic) availability.

    Attributes:
        ms_per_sample: Milliseconds of training compute per example (FedScale's ``computation``, before its
            forward-plus-backward factor, see :attr:`Trace.compute_factor`).
        down_kbps: Download bandwidth in kbit/s.
        up_kbps: Upload bandwidth in kbit/s.
        active: Sorted start times (seconds, within a period) of the online windows.
        inactive: End times of the same windows (``active[i] <= inactive[i]``).
        period: The windows repeat every ``period`` seconds (FedScale's ``finish_time``); ``None``: always
            online.
    """

    ms_per_sample: float
    down_kbps: float
    up_kbps: float
    active: tuple[float, ...] = ()
    inactive: tuple[float, ...] = ()
    period: float | None = None

    def _window(self, t: float) -> tuple[float, float] | None:
        """The online window ``[start, end)`` (absolute seconds) that contains ``t``, or ``None``."""
        if self.period is None:
            return (-math.inf, math.inf)
        base = math.floor(t / self.period) * self.period
        u = t - base
        i = bisect.bisect_right(self.active, u) - 1
        if i >= 0 and u < self.inactive[i]:
            return base + self.active[i], base + self.inactive[i]
        return None

    def available(self, t: float) -> bool:
        """Whether the client is online at virtual time ``t``."""
        return self._window(t) is not None

    def online_until(self, t: float) -> float:
        """End of the online window containing ``t`` (``inf``: never goes offline); ``t`` if offline now."""
        window = self._window(t)
        return t if window is None else window[1]

    def seconds(
        self, *, samples: int, bytes_down: int, bytes_up: int, compute_factor: float = 1.0
    ) -> VisitTime:
        """The virtual duration of a visit that trains on ``samples`` examples (steps x batch size)."""
        return VisitTime(
            download=bytes_down * 8 / 1000 / self.down_kbps,
            compute=compute_factor * samples * self.ms_per_sample / 1000,
            upload=bytes_up * 8 / 1000 / self.up_kbps,
        )


@dataclass(frozen=True)
class VisitTime:
    """A visit's virtual duration: ``download + compute + upload`` (seconds)."""

    download: float
    compute: float
    upload: float

    @property
    def total(self) -> float:
        return self.download + self.compute + self.upload


class Trace:
    """Base class: a population's devices. Subclasses implement :meth:`profile`."""

    #: FedScale's ``computation`` is an inference latency; FedScale multiplies it by 3 for forward + backward.
    compute_factor: float = 1.0

    def profile(self, client_id: int) -> DeviceProfile:
        """The device of ``client_id`` (a pure function of the trace and the id)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for logs and docs."""
        return type(self).__name__

    def config(self) -> dict[str, Any]:
        """What defines the trace (its public scalar settings): a resume refuses a trace that differs."""
        scalars = (int, float, str, bool, type(None))
        public = {k: v for k, v in sorted(vars(self).items()) if not k.startswith("_") and isinstance(v, scalars)}
        return {"class": type(self).__name__, "compute_factor": float(self.compute_factor), **public}


class SyntheticTrace(Trace):
    """A seeded heterogeneous population: lognormal compute and bandwidth, one diurnal online window a day.

    Client ``k``'s device is drawn from ``random.Random(derive_seed(seed, "simtime/trace", k))``, so a
    population of any size costs no memory until a client is asked about (memory flat in the clients):

    * ``ms_per_sample = median_ms_per_sample * exp(compute_sigma * g)``, ``g ~ N(0, 1)`` (lognormal: the
      slowest percent of devices is ``exp(2.33 sigma)`` times the median, ~10x for ``sigma = 1``, the 10-100x
      spread of phones the FedScale and Papaya measurements report);
    * ``down_kbps = median_kbps * exp(bandwidth_sigma * g')``, upload ``upload_ratio`` times that;
    * online one window a day of length ``online_fraction * DAY`` starting at a uniform phase (time zones);
      ``online_fraction = 1`` keeps everyone online.

    Args:
        seed: The trace's seed (independent of the run's seed, so two runs can share a population).
        median_ms_per_sample: Median training milliseconds per example.
        compute_sigma: Lognormal sigma of compute speed (the tail's weight).
        median_kbps: Median download bandwidth, kbit/s.
        bandwidth_sigma: Lognormal sigma of bandwidth.
        upload_ratio: Upload bandwidth over download bandwidth.
        online_fraction: Fraction of each day a client is online, in (0, 1].
    """

    def __init__(
        self,
        seed: int = 0,
        median_ms_per_sample: float = 5.0,
        compute_sigma: float = 1.0,
        median_kbps: float = 20000.0,
        bandwidth_sigma: float = 1.0,
        upload_ratio: float = 0.25,
        online_fraction: float = 1.0,
    ) -> None:
        key = "trainer.clock.init_args.trace.init_args."
        check_positive(median_ms_per_sample, key + "median_ms_per_sample")
        check_positive(median_kbps, key + "median_kbps")
        check_positive(upload_ratio, key + "upload_ratio")
        require(compute_sigma >= 0 and bandwidth_sigma >= 0,
                f"{key}compute_sigma and bandwidth_sigma must be >= 0, got {compute_sigma} and "
                f"{bandwidth_sigma}.")
        check_range(online_fraction, key + "online_fraction", 0.0, 1.0, True, False)
        self.seed = int(seed)
        self.median_ms_per_sample = float(median_ms_per_sample)
        self.compute_sigma = float(compute_sigma)
        self.median_kbps = float(median_kbps)
        self.bandwidth_sigma = float(bandwidth_sigma)
        self.upload_ratio = float(upload_ratio)
        self.online_fraction = float(online_fraction)
        self._recent: dict[int, DeviceProfile] = {}

    def profile(self, client_id: int) -> DeviceProfile:
        cached = self._recent.get(client_id)
        if cached is None:
            if len(self._recent) >= _RECENT:  # a bounded memo: memory stays flat in the population
                self._recent.clear()
            cached = self._recent[client_id] = self._draw(client_id)
        return cached

    def _draw(self, client_id: int) -> DeviceProfile:
        rng = random.Random(derive_seed(self.seed, "simtime/trace", client_id))
        ms = self.median_ms_per_sample * math.exp(self.compute_sigma * rng.gauss(0.0, 1.0))
        down = self.median_kbps * math.exp(self.bandwidth_sigma * rng.gauss(0.0, 1.0))
        phase = rng.random() * DAY
        if self.online_fraction >= 1.0:
            return DeviceProfile(ms, down, down * self.upload_ratio)
        end = phase + self.online_fraction * DAY
        if end <= DAY:
            active, inactive = (phase,), (end,)
        else:  # the window wraps past midnight: two windows within the period
            active, inactive = (0.0, phase), (end - DAY, DAY)
        return DeviceProfile(ms, down, down * self.upload_ratio, active, inactive, DAY)

    def describe(self) -> str:
        return (
            f"SyntheticTrace(seed={self.seed}, median {self.median_ms_per_sample} ms/sample sigma "
            f"{self.compute_sigma}, "
            f"median {self.median_kbps:g} kbit/s down sigma {self.bandwidth_sigma}, up x{self.upload_ratio}, "
            f"online {self.online_fraction:.0%} of the day)"
        )


class FedScaleTrace(Trace):
    """FedScale's device traces: a capacity dict and an (optional) availability dict.

    * capacity: ``{client_key: {'computation': ms_per_sample, 'communication': kbps}}`` (FedScale's
      ``client_device_capacity``); FedScale uses one bandwidth both ways, and so does this trace;
    * availability: ``{client_key: {'active': [t...], 'inactive': [t...], 'finish_time': T, ...}}``
      (FedScale's ``client_behave_trace``): online in ``[active[i], inactive[i]]``, periodic with period
      ``finish_time``; other keys (``duration``, ``model``) are ignored.

    lightfed client ``k`` gets the ``k``-th key of each dict in sorted order (cycling when the population is
    larger than the trace). Each argument is a path (pickle as FedScale ships it, or ``.json``) or a dict.

    Args:
        capacity: The capacity dict or its file.
        availability: The availability dict or its file; ``None``: always online.
        compute_factor: Multiplier of ``computation`` (FedScale's 3: backward is about twice the forward).
    """

    def __init__(
        self,
        capacity: str | dict[Any, Any],
        availability: str | dict[Any, Any] | None = None,
        compute_factor: float = 3.0,
    ) -> None:
        key = "trainer.clock.init_args.trace.init_args."
        self.compute_factor = check_positive(compute_factor, key + "compute_factor")
        cap = _load(capacity, "capacity")
        self._capacity = [cap[k] for k in sorted(cap, key=_key)]
        for key, entry in zip(sorted(cap, key=_key), self._capacity, strict=True):
            require(
                isinstance(entry, Mapping) and "computation" in entry and "communication" in entry,
                f"trainer.clock.init_args.trace.init_args.capacity[{key!r}] must hold 'computation' and "
                f"'communication', got {entry!r}.",
            )
        avail = _load(availability, "availability") if availability is not None else None
        self._availability = [avail[k] for k in sorted(avail, key=_key)] if avail else None
        for entry in self._availability or []:
            require(
                "active" in entry and "inactive" in entry and "finish_time" in entry
                and len(entry["active"]) == len(entry["inactive"]),
                f"{key}availability entries need 'active' and 'inactive' lists of "
                "equal length and 'finish_time' (FedScale's client_behave_trace format, see docs/time.md).",
            )

    def profile(self, client_id: int) -> DeviceProfile:
        cap = self._capacity[client_id % len(self._capacity)]
        kbps = float(cap["communication"])
        if self._availability is None:
            return DeviceProfile(float(cap["computation"]), kbps, kbps)
        av = self._availability[client_id % len(self._availability)]
        period = float(av["finish_time"])
        pairs = sorted((float(a), float(b)) for a, b in zip(av["active"], av["inactive"], strict=True))
        return DeviceProfile(
            float(cap["computation"]), kbps, kbps, tuple(a for a, _ in pairs), tuple(b for _, b in pairs),
            period,
        )

    def describe(self) -> str:
        avail = f"{len(self._availability)} availability traces" if self._availability else "always online"
        return f"FedScaleTrace({len(self._capacity)} devices, {avail}, compute x{self.compute_factor})"

    def config(self) -> dict[str, Any]:
        """The base's settings plus a SHA-256 of the capacity and availability tables as read."""
        tables = repr((self._capacity, self._availability)).encode()
        return {**super().config(), "tables_sha256": hashlib.sha256(tables).hexdigest()}


def _key(key: Any) -> tuple[int, Any]:
    """Sort FedScale's client keys numerically (JSON turns them into strings)."""
    try:
        return (0, int(key))
    except (TypeError, ValueError):
        return (1, str(key))


def _load(source: str | dict[Any, Any], what: str) -> dict[Any, Any]:
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        path = Path(source)
        require(path.is_file(), f"trainer.clock.init_args.trace.init_args.{what}: no file {str(path)!r}.")
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        else:  # FedScale ships pickles; only load files you trust
            with path.open("rb") as fh:
                data = pickle.load(fh)  # noqa: S301
    require(isinstance(data, Mapping) and len(data) > 0,
            f"trainer.clock.init_args.trace.init_args.{what} holds no clients.")
    return data


__all__ = ["DAY", "DeviceProfile", "FedScaleTrace", "SyntheticTrace", "Trace", "VisitTime"]
