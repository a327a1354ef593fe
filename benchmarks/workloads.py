"""The benchmark workloads (W1, the issue-2 workload, W2) and the runners that time them.

Every runner trains the same FedAvg rounds (same data, same initial weights, same cohorts, same number
of SGD steps) and returns a :class:`Timing`: the wall time of each round, measured from the start of one
round to the start of the next, so everything the loop does between rounds is counted.

* :func:`run_plain` - the floor: a plain PyTorch loop with one reused ``nn.Module``, batches
  pre-tensorised once, a fresh ``torch.optim.SGD`` per client visit, a running weighted sum.
* :func:`run_lightfed` - :class:`lightfed.FederatedTrainer` with the given executor.
"""

from __future__ import annotations

import copy
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import median
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightfed import FederatedTrainer
from lightfed.data.datamodule import FederatedArrays, FederatedDataModule
from lightfed.data.datasets import DigitsDataModule, stratified_split
from lightfed.data.partition import IID, Dirichlet, Partitioner
from lightfed.evaluation import Evaluation
from lightfed.models import CNNClassifier, MLPClassifier
from lightfed.sampling import UniformSampler
from lightfed.seeding import derive_seed, make_generator


# ---------------------------------------------------------------------------------------- data
class UpsampledDigits(FederatedDataModule):
    """W2's data: sklearn digits upsampled to ``size`` x ``size`` and tiled ``copies`` times.

    The 8x8 images are resized bilinearly; each training copy is shifted by a seeded random offset of
    up to two pixels in each direction (so the copies are not identical). 1,437 training digits x 14
    copies = 20,118 training images; the 360 test digits are upsampled once, unshifted.
    """

    def __init__(self, partitioner: Partitioner, copies: int = 14, size: int = 32, seed: int = 0) -> None:
        super().__init__(partitioner, val_fraction=0.0, seed=seed)
        self.copies, self.size = copies, size

    def load(self) -> FederatedArrays:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.as_tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        y = torch.as_tensor(digits.target, dtype=torch.int64)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        train, test = stratified_split(y, 0.2, self.seed, "digits")
        gen = make_generator(self.seed, "upsampled_digits")
        shifts = torch.randint(-2, 3, (self.copies, 2), generator=gen).tolist()
        xs = [torch.roll(x[train], shifts=(a, b), dims=(2, 3)) for a, b in shifts]
        x_train = torch.cat(xs).contiguous()
        y_train = y[train].repeat(self.copies)
        return FederatedArrays(train=(x_train, y_train), test=(x[test], y[test]), labels=y_train, num_classes=10)


class TiledDigits(FederatedDataModule):
    """Flat 8x8 digits repeated ``copies`` times (a larger population with W1's client sizes)."""

    def __init__(self, partitioner: Partitioner, copies: int = 10, seed: int = 0) -> None:
        super().__init__(partitioner, val_fraction=0.0, seed=seed)
        self.copies = copies

    def load(self) -> FederatedArrays:
        base = DigitsDataModule(IID(num_clients=1), seed=self.seed).load()
        x, y = base.train
        return FederatedArrays(
            train=(x.repeat(self.copies, 1), y.repeat(self.copies)), test=base.test, labels=y.repeat(self.copies),
            num_classes=10,
        )


@dataclass
class Workload:
    """One FedAvg workload: data, model, cohort and local-training settings."""

    name: str
    make_data: Callable[[], FederatedDataModule]
    make_model: Callable[[], L.LightningModule]
    clients_per_round: int
    local_epochs: int
    batch_size: int
    rounds: int
    warmup: int
    lr: float
    description: str = ""


def w1(rounds: int = 20, warmup: int = 5) -> Workload:
    """W1: digits, MLP 64-64-10, 100 clients of 3-29 examples (Dirichlet(0.5)), 10 per round, batch 16."""
    return Workload(
        "W1", lambda: DigitsDataModule(Dirichlet(num_clients=100, alpha=0.5), val_fraction=0.0),
        lambda: MLPClassifier(in_features=64, hidden=[64], lr=0.1), clients_per_round=10, local_epochs=1,
        batch_size=16, rounds=rounds, warmup=warmup, lr=0.1,
        description="digits, MLP 64-64-10, 100 clients Dirichlet(0.5) of 3-29 examples, 10/round, 1 epoch, batch 16",
    )


def issue2(rounds: int = 20, warmup: int = 5) -> Workload:
    """The issue-2 workload: digits, MLP 64-64-10, 100 IID clients of 14-15 examples, 10 per round, batch 16."""
    return Workload(
        "issue2", lambda: DigitsDataModule(IID(num_clients=100), val_fraction=0.0),
        lambda: MLPClassifier(in_features=64, hidden=[64], lr=0.1), clients_per_round=10, local_epochs=1,
        batch_size=16, rounds=rounds, warmup=warmup, lr=0.1,
        description="digits, MLP 64-64-10, 100 IID clients of 14-15 examples, 10/round, 1 epoch, batch 16",
    )


def w2(rounds: int = 4, warmup: int = 1, channels_last: bool = False) -> Workload:
    """W2: digits upsampled to 32x32 (20k), CNN conv32-conv64-fc128, 20 clients, 5 per round, 2 epochs, batch 32."""
    return Workload(
        "W2", lambda: UpsampledDigits(IID(num_clients=20)),
        lambda: CNNClassifier(in_channels=1, image_size=32, width=32, hidden=128, lr=0.05, channels_last=channels_last),
        clients_per_round=5, local_epochs=2, batch_size=32, rounds=rounds, warmup=warmup, lr=0.05,
        description="digits upsampled to 32x32 (20,118 train), CNN conv32-conv64-fc128 (GroupNorm), 20 IID "
        "clients, 5/round, 2 epochs, batch 32",
    )


WORKLOADS: dict[str, Callable[..., Workload]] = {"W1": w1, "issue2": issue2, "W2": w2}


# ---------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Per-round wall and CPU times of one run and the final central test accuracy.

    CPU time (``time.process_time``: this process only) is what the round costs when other jobs share
    the machine; wall time is what a user waits on an otherwise idle one.
    """

    label: str
    round_seconds: list[float]
    warmup: int
    accuracy: float = float("nan")
    cpu_seconds: list[float] = field(default_factory=list)

    @property
    def steady(self) -> list[float]:
        return self.round_seconds[self.warmup:] or self.round_seconds

    @property
    def per_round(self) -> float:
        """Median steady-state seconds per round (robust to other jobs on a shared machine)."""
        return median(self.steady)

    @property
    def mean(self) -> float:
        return sum(self.steady) / len(self.steady)

    @property
    def steady_cpu(self) -> list[float]:
        return self.cpu_seconds[self.warmup:] or self.cpu_seconds

    @property
    def cpu_per_round(self) -> float:
        """Median steady-state CPU seconds per round."""
        return median(self.cpu_seconds[self.warmup:] or self.cpu_seconds)


class Lockstep:
    """Runs several methods in threads that take turns, one round each, round-robin (``run.py --lockstep``).

    On a shared machine the load changes from second to second, so methods timed one after another (even
    interleaved repeats) see different machines. Here method A's round ``r`` runs right next to method B's
    round ``r``: each runner thread holds the turn for one round (from one :func:`_clock` mark to the next),
    then hands it on. Only the holder runs (the others wait on a condition), and each thread's clock skips
    the time it waited, so a round's wall and CPU time are its own. Setup and the final evaluation also run
    in turn, outside the timed rounds.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.turn = 0
        self.finished: set[str] = set()
        self.cond = threading.Condition()

    def enter(self, name: str) -> None:
        """Block until it is ``name``'s turn."""
        with self.cond:
            self.cond.wait_for(lambda: self.names[self.turn] == name)

    def pass_on(self, name: str, finished: bool = False) -> None:
        """Hand the turn to the next runner that has not finished."""
        with self.cond:
            if finished:
                self.finished.add(name)
            n = len(self.names)
            for step in range(1, n + 1):
                nxt = (self.names.index(name) + step) % n
                if self.names[nxt] not in self.finished:
                    self.turn = nxt
                    break
            self.cond.notify_all()

    def run(self, jobs: dict[str, Callable[[], Any]]) -> dict[str, Any]:
        """Run ``jobs`` (name -> callable) in lockstep; returns name -> result (exceptions re-raised)."""
        results: dict[str, Any] = {}
        errors: list[BaseException] = []

        def target(name: str, job: Callable[[], Any]) -> None:
            _LOCAL.lockstep, _LOCAL.name, _LOCAL.waited = self, name, (0.0, 0.0)
            self.enter(name)
            try:
                results[name] = job()
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(err)
            finally:
                _LOCAL.lockstep = None
                self.pass_on(name, finished=True)

        threads = [threading.Thread(target=target, args=(n, jobs[n])) for n in self.names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


_LOCAL = threading.local()


def _clock() -> tuple[float, float]:
    """Wall and CPU time; under :class:`Lockstep`, a round boundary: hand on the turn, and skip the wait."""
    step: Lockstep | None = getattr(_LOCAL, "lockstep", None)
    if step is None:
        return time.perf_counter(), time.process_time()
    wall, cpu = time.perf_counter(), time.thread_time()
    mark = (wall - _LOCAL.waited[0], cpu - _LOCAL.waited[1])  # this thread's own running time so far
    step.pass_on(_LOCAL.name)
    step.enter(_LOCAL.name)
    _LOCAL.waited = (_LOCAL.waited[0] + time.perf_counter() - wall, _LOCAL.waited[1] + time.thread_time() - cpu)
    return mark


def _round_diffs(starts: list[tuple[float, float]], end: tuple[float, float]) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds from each round's start to the next one's (the last: to ``end``)."""
    marks = [*starts, end]
    wall = [b[0] - a[0] for a, b in zip(marks[:-1], marks[1:])]
    cpu = [b[1] - a[1] for a, b in zip(marks[:-1], marks[1:])]
    return wall, cpu


def prepared(workload: Workload, seed: int = 0) -> tuple[FederatedDataModule, L.LightningModule]:
    """The set-up datamodule and a freshly initialised model (seeded, identical for every runner)."""
    dm = workload.make_data()
    dm.setup("fit")
    L.seed_everything(seed, verbose=False)
    model = workload.make_model()
    return dm, model


def cohorts(workload: Workload, num_clients: int, seed: int = 0) -> list[list[int]]:
    sampler = UniformSampler(workload.clients_per_round)
    return [sampler.sample(r, num_clients, seed) for r in range(workload.rounds)]


# ---------------------------------------------------------------------------------------- plain PyTorch
def run_plain(workload: Workload, seed: int = 0, shuffle_per_visit: bool = False) -> Timing:
    """The floor: a plain PyTorch FedAvg loop over pre-tensorised batches with one reused model.

    Every batch of every round is cut before the first round, in the order lightfed's executors use
    (``make_generator(seed, "batches", round, client, epoch)``), so the plain loop runs exactly the same
    SGD steps and must reach the same accuracy; inside the timed loop there is no shuffling, no index
    gather and no framework. A visit copies the global weights in place, builds ``torch.optim.SGD`` and
    runs forward / ``cross_entropy`` / backward / step over its batches; the server keeps a running sum
    of ``n_k * (local - global)``.

    With ``shuffle_per_visit`` the loop does what lightfed's semantics require inside the timed loop: a
    fresh seeded permutation of the client's examples per visit and epoch (``Generator.manual_seed`` +
    ``randperm``, one ``index_select`` per tensor, batches sliced from that). The difference between the two
    plain loops is the price of a new batch order per visit; the rest of lightfed's gap is the framework.
    """
    dm, module = prepared(workload, seed)
    net: nn.Module = copy.deepcopy(module.net)
    params = list(net.parameters())
    plan = cohorts(workload, dm.num_clients, seed)
    batches: dict[tuple[int, int], list[tuple[Tensor, ...]]] = {}
    for r, cohort in enumerate(plan):
        for cid in cohort:
            data = dm.client_train(cid)
            if shuffle_per_visit:
                continue
            batches[r, cid] = [
                b for e in range(workload.local_epochs)
                for b in data.batches(workload.batch_size, make_generator(seed, "batches", r, cid, e))
            ]
    client_idx = {cid: dm.client_train(cid).indices for cid in range(dm.num_clients)}
    x_all, y_all = dm.arrays.train[:2]
    gen = torch.Generator()
    bs = workload.batch_size
    sizes = {cid: len(dm.client_train(cid)) for cid in range(dm.num_clients)}
    global_vec = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    numels = [p.numel() for p in params]
    net.train()
    starts: list[tuple[float, float]] = []
    for r, cohort in enumerate(plan):
        starts.append(_clock())
        delta_sum = torch.zeros_like(global_vec)
        weight_sum = 0.0
        for cid in cohort:
            with torch.no_grad():
                for p, g in zip(params, torch.split(global_vec, numels)):
                    p.copy_(g.view_as(p))
            opt = torch.optim.SGD(params, lr=workload.lr)
            visit = [] if shuffle_per_visit else batches[r, cid]
            if shuffle_per_visit:
                for e in range(workload.local_epochs):
                    gen.manual_seed(derive_seed(seed, "batches", r, cid, e))
                    idx = client_idx[cid].index_select(0, torch.randperm(sizes[cid], generator=gen))
                    xs, ys = x_all.index_select(0, idx), y_all.index_select(0, idx)
                    visit += [(xs[i : i + bs], ys[i : i + bs]) for i in range(0, sizes[cid], bs)]
            for x, y in visit:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(x), y).backward()
                opt.step()
            local = torch.cat([p.detach().reshape(-1) for p in params])
            delta_sum.add_(local - global_vec, alpha=float(sizes[cid]))
            weight_sum += sizes[cid]
        global_vec = global_vec + delta_sum / weight_sum
    end = _clock()
    with torch.no_grad():
        for p, g in zip(params, torch.split(global_vec, numels)):
            p.copy_(g.view_as(p))
        net.eval()
        x_test, y_test = dm.arrays.test
        acc = float((net(x_test).argmax(-1) == y_test).float().mean())
    wall, cpu = _round_diffs(starts, end)
    label = "plain loop, shuffled per visit" if shuffle_per_visit else "plain PyTorch loop"
    return Timing(label, wall, workload.warmup, acc, cpu)


# ---------------------------------------------------------------------------------------- lightfed
class _TimedTrainer(FederatedTrainer):
    """A FederatedTrainer that records when each round starts (nothing else changes)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.round_starts: list[tuple[float, float]] = []

    def run_round(self, round_idx: int) -> Any:
        self.round_starts.append(_clock())
        return super().run_round(round_idx)


def run_lightfed(workload: Workload, executor: str = "sequential", seed: int = 0, **trainer_kwargs: Any) -> Timing:
    """The same rounds through :class:`FederatedTrainer` (no per-round evaluation, logging or checkpoints).

    The central test set is evaluated once, after the last round (not timed: the last round's time is
    measured to the start of that evaluation).
    """
    dm, model = prepared(workload, seed)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _TimedTrainer(
            rounds=workload.rounds, clients_per_round=workload.clients_per_round, local_epochs=workload.local_epochs,
            batch_size=workload.batch_size, eval_every=workload.rounds + 1, fed_eval_fraction=0.0,
            checkpoint_every=0, logger=False, enable_progress_bar=False, default_root_dir=tmp, executor=executor,
            seed=seed, **trainer_kwargs,
        )
        ends: list[tuple[float, float]] = []

        class TimedEvaluation(Evaluation):
            def evaluate(self, trainer: FederatedTrainer, round_idx: int) -> dict[str, float]:
                ends.append(_clock())
                return super().evaluate(trainer, round_idx)

        trainer.evaluation = TimedEvaluation()
        history = trainer.fit(model, dm)
    acc = history[-1].get("central/test_acc", float("nan"))
    label = f"lightfed {executor}"
    wall, cpu = _round_diffs(trainer.round_starts, ends[0])
    return Timing(label, wall, workload.warmup, acc, cpu)
