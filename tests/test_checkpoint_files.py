"""The run-directory lock (atomic, holder identified beyond its pid) and bounded checkpoint retention."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys

import pytest
import torch

from lightfed import checkpoint as ckpt_io


def _claim(root, barrier, results, hold):
    barrier.wait()
    try:
        ckpt_io.claim_directory(root, resumed=False)
        results.put("won")
    except ValueError:
        results.put("refused")
    hold.wait()  # keep the process (the holder) alive until every claimer has tried


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("claimers", "trials"),
    [(2, 10), (3, 10), pytest.param(2, 60, marks=pytest.mark.slow), pytest.param(3, 60, marks=pytest.mark.slow)],
)
def test_exactly_one_of_many_simultaneous_claimers_takes_the_lock(tmp_path, claimers, trials):
    """10 races per claimer count on CI; the slow run repeats 60 (a rare race needs many trials to show)."""
    ctx = mp.get_context("fork")
    for trial in range(trials):
        root = tmp_path / f"t{trial}"
        barrier, results, hold = ctx.Barrier(claimers), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=_claim, args=(root, barrier, results, hold)) for _ in range(claimers)]
        for p in procs:
            p.start()
        outcomes = sorted(results.get(timeout=30) for _ in procs)
        hold.set()
        for p in procs:
            p.join(timeout=30)
        assert outcomes == ["refused"] * (claimers - 1) + ["won"], (trial, outcomes)
        holder = json.loads((root / ".lightfed.lock").read_text())  # never empty: written before it is visible
        assert {"pid", "start", "host", "boot", "token"} <= set(holder)


def _write_lock(root, **fields):
    root.mkdir(parents=True, exist_ok=True)
    holder = {**ckpt_io.lock_identity(), **fields}
    (root / ".lightfed.lock").write_text(json.dumps(holder))
    return holder


def test_a_live_holder_is_refused_with_its_pid_and_host(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, pid=sleeper.pid, start=ckpt_io._start_time(sleeper.pid))
        with pytest.raises(ValueError, match=rf"in use by another lightfed run \(pid {sleeper.pid} on host"):
            ckpt_io.claim_directory(tmp_path, resumed=False)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_reused_pid_is_stale(tmp_path):
    # the lock's pid is alive, but it is another process now: its start time differs from the holder's
    _write_lock(tmp_path, pid=os.getppid(), start=ckpt_io._start_time(os.getppid()) + 1)
    lock = ckpt_io.claim_directory(tmp_path, resumed=False)
    assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_our_own_pid_from_before_a_restart_is_stale(tmp_path):
    # a container restart: the new run gets the dead run's pid (here: ours), with another start time
    _write_lock(tmp_path, start=ckpt_io._start_time(os.getpid()) - 1)
    lock = ckpt_io.claim_directory(tmp_path, resumed=False)
    assert json.loads(lock.read_text())["start"] == ckpt_io._start_time(os.getpid())


def test_another_boot_and_a_dead_pid_are_stale_and_another_host_is_not_judged(tmp_path):
    _write_lock(tmp_path / "a", boot="another-boot", pid=os.getppid())
    ckpt_io.claim_directory(tmp_path / "a", resumed=False)
    _write_lock(tmp_path / "b", pid=999_999_999)
    ckpt_io.claim_directory(tmp_path / "b", resumed=False)
    _write_lock(tmp_path / "c", host="elsewhere", pid=999_999_999)
    with pytest.raises(ValueError, match="on host elsewhere"):
        ckpt_io.claim_directory(tmp_path / "c", resumed=False)


def test_the_same_live_process_is_not_stale():
    me = ckpt_io.lock_identity()
    assert ckpt_io.stale_reason({**me, "token": "other"}, me) is None
    assert ckpt_io.stale_reason({"pid": os.getpid()}, me) == f"pid {os.getpid()} is this process"  # legacy lock


def test_retention_keeps_the_newest_and_never_the_target_away(tmp_path):
    for r in (1, 2, 3, 4, 9):  # round 9: left by a later run this one resumed before
        torch.save({}, tmp_path / f"round-{r:05d}.ckpt")
    target = tmp_path / "round-00005.ckpt"
    ckpt_io.write_checkpoint({"x": 1}, target, keep=1)
    assert sorted(p.name for p in tmp_path.glob("round-*.ckpt")) == ["round-00005.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True) == {"x": 1}  # last.ckpt points to a kept file


def test_checkpoints_are_bounded_by_default():
    import inspect

    from lightfed import FederatedTrainer

    default = inspect.signature(FederatedTrainer).parameters["keep_checkpoints"].default
    assert default == ckpt_io.DEFAULT_KEEP_CHECKPOINTS == 3
