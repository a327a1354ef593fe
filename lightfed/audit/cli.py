"""``lightfed audit``: attacks on a finished model, from the run's config and checkpoint.

    lightfed audit --ckpt_path runs/.../checkpoints/last.ckpt        # the config is read from the checkpoint
    lightfed audit --ckpt_path ... --attack all --shadows 8         # also offline LiRA
    lightfed audit --ckpt_path ... --attack reconstruction          # one client's update, inverted

Runs the loss-threshold membership inference attack (Yeom et al. 2018) and, with ``--attack lira`` or ``all``,
offline LiRA (Carlini et al. 2022) with ``--shadows`` shadow models, example-level and client-level, on the
checkpoint's global model; prints AUC and TPR at 0.1% / 1% FPR with 95% Clopper-Pearson intervals (an FPR
below 1 / non-members is not measured), and writes ``audit_membership.json`` and
``audit_membership_roc.png`` next to the checkpoint's run (or ``--out``). ``--attack reconstruction`` sends one
example of each of the first ``--clients`` clients as a one-step update from the checkpoint's model through the
run's clip and noise (a cohort of one) and reconstructs it (analytic first layer and gradient inversion):
``audit_reconstruction.json``, ``audit_reconstruction.png`` and TensorBoard images under ``tensorboard/``. The
canary audits run inside
``lightfed fit`` (``trainer.callbacks``); see docs/auditing.md.

LiRA's shadow models are the run itself, repeated: the same config through the same ``lightfed fit`` pipeline
(strategy, privacy, secure aggregation and executor as configured, or ``--shadow_executor vmap``), each on a
seeded random subset of the pool (the run's training examples and its test set) of ``min(n_train, n_pool / 2)``
examples, partitioned by the config's partitioner.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from lightfed.audit.membership import (
    client_level,
    client_level_scores,
    example_losses,
    lira_attack,
    lira_offline,
    logit_confidences,
    loss_threshold,
    plot_roc,
    roc_curve,
)
from lightfed.messages import RunInfo
from lightfed.seeding import derive_seed, make_generator


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lightfed audit", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    parser.add_argument("--config", default=None,
                        help="the run's config (default: the resolved config stored in the checkpoint)")
    parser.add_argument("--ckpt_path", required=True, help="a lightfed checkpoint of that run")
    parser.add_argument("--out", default=None, help="folder of the report (default: the checkpoint's run folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pseudo-clients and of LiRA's shadow subsets")
    parser.add_argument("--attack", choices=("loss", "lira", "all", "reconstruction"), default="loss",
                        help="loss threshold (default), offline LiRA, both (LiRA trains --shadows runs), or "
                             "reconstruction of single clients' updates")
    parser.add_argument("--clients", type=int, default=5, help="reconstruction: clients attacked (one example each)")
    parser.add_argument("--shadows", type=int, default=8, help="LiRA's shadow models (each a full training run)")
    parser.add_argument("--per_example_variance", action="store_true",
                        help="LiRA: fit each example's OUT variance (default: one pooled variance, the paper's "
                             "choice for few shadows)")
    parser.add_argument("--shadow_executor", default=None,
                        help="LiRA: train shadows with this trainer.executor (e.g. vmap) instead of the config's")
    args = parser.parse_args(argv)
    if args.attack in ("lira", "all") and args.shadows < 2:
        parser.error(f"--shadows must be >= 2 for LiRA (each example needs OUT shadows), got {args.shadows}.")
    return args


def quiet_cli(config: str, root: str, extra: list[str] = ()) -> Any:
    """A ``LightFedCLI`` of ``config`` without logger, progress bar, callbacks, audits or checkpoints, not yet run."""
    from lightfed.cli_lightning import LightFedCLI

    with contextlib.redirect_stdout(io.StringIO()), mock.patch.object(sys, "argv", sys.argv[:1]):
        return LightFedCLI(args=["--config", config, "--trainer.logger", "false", "--trainer.enable_progress_bar",
                                 "false", "--trainer.callbacks", "[]", "--audit", "null", "--trainer.checkpoint_every", "0",
                                 "--trainer.default_root_dir", root, *extra], run=False)


def main(argv: list[str]) -> None:
    """Entry point of ``lightfed audit`` (``argv`` without the command name)."""
    args = parse(argv)
    ckpt = Path(args.ckpt_path)
    if not ckpt.is_file():
        raise SystemExit(f"lightfed: error: --ckpt_path {str(ckpt)!r} does not exist; point it at a lightfed checkpoint.")
    out = Path(args.out) if args.out else (ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent)
    if args.config is None:
        from lightfed.cli_lightning import config_from_checkpoint

        args.config = config_from_checkpoint(str(ckpt))  # jsonargparse's --config takes the YAML itself
    with tempfile.TemporaryDirectory() as scratch:
        cli = quiet_cli(args.config, scratch)
        trainer = cli.trainer
        with contextlib.redirect_stdout(io.StringIO()), _no_resume_notice():
            central = trainer.test(cli.model, cli.datamodule, ckpt_path=str(ckpt))
        if args.attack == "reconstruction":
            from torch.utils.tensorboard import SummaryWriter

            out.mkdir(parents=True, exist_ok=True)
            with SummaryWriter(str(out / "tensorboard")) as writer:
                rec = reconstruction_report(trainer, args.seed, args.clients, writer=writer, png=out / "audit_reconstruction.png")
            rec.update({"checkpoint": str(ckpt), "config": args.config})
            (out / "audit_reconstruction.json").write_text(json.dumps(rec, indent=2) + "\n")
            print(f"reconstruction of {args.clients} one-example updates ({rec['privacy']}): analytic PSNR "
                  f"{rec['analytic_psnr']:.1f} dB, inversion PSNR {rec['inversion_psnr']:.1f} dB, labels "
                  f"{100 * rec['label_accuracy']:.0f}%")
            print(f"report: {out / 'audit_reconstruction.json'}")
            return
        report = membership_report(trainer, args.seed)
        curves = report.pop("_curves")
        if args.attack in ("lira", "all"):
            lira = lira_report(args.config, trainer, shadows=args.shadows, seed=args.seed,
                               fix_variance=not args.per_example_variance, executor=args.shadow_executor)
            curves.update(lira.pop("_curves"))
            report["lira"] = lira
            if args.attack == "lira":
                curves = {k: v for k, v in curves.items() if k.startswith("LiRA")}
    report.update({"checkpoint": str(ckpt), "config": args.config, "central": central})
    out.mkdir(parents=True, exist_ok=True)
    report["roc_plot"] = str(plot_roc(curves, out / "audit_membership_roc.png"))
    (out / "audit_membership.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = [("loss threshold", report)] if args.attack != "lira" else []
    rows += [("LiRA", report["lira"])] if "lira" in report else []
    for name, part in rows:
        for level in ("example", "client"):
            r = part[level]
            print(f"{level}-level {name}: AUC {r['auc']:.3f}, TPR@0.1%FPR {_tpr(r, '0.1%', 1000)}, "
                  f"TPR@1%FPR {_tpr(r, '1%', 100)} ({int(r['members'])} members, "
                  f"{int(r['non_members'])} non-members)")
    print(f"report: {out / 'audit_membership.json'}")


def _tpr(result: dict[str, Any], level: str, needed: int) -> str:
    """``0.0500 [0.0165, 0.1128]`` (95% Clopper-Pearson), or why that FPR cannot be measured."""
    value, ci = result[f"tpr@{level}fpr"], result[f"tpr@{level}fpr_ci95"]
    if value is None:
        return f"n/a (an FPR of {level} needs >= {needed} non-members)"
    return f"{value:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"


@contextlib.contextmanager
def _no_resume_notice() -> Any:
    """The audit loads the checkpoint with its own settings (no logger, no checkpoints): that is no resume, so
    the resume check's "resuming ... with changed settings" notice is not shown."""
    import logging

    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not record.getMessage().startswith("resuming")

    drop, logger = Drop(), logging.getLogger("lightfed")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _global_model(trainer: Any) -> Any:
    """The trainer's module holding its (final or restored) global weights."""
    trainer.local.spec.assign(trainer.local.tensors, trainer.global_params)
    return trainer.module


def membership_report(trainer: object, seed: int = 0) -> dict[str, object]:
    """Loss-threshold attacks on the trainer's (restored) global model: example- and client-level."""
    module, data = _global_model(trainer), trainer.datamodule  # type: ignore[attr-defined]
    test = data.test_data()
    x_test, y_test = (t.index_select(0, test.indices) for t in test.tensors[:2])
    non_members = example_losses(module, x_test, y_test)
    by_client = []
    for cid in range(data.num_clients):
        part = data.client_train(cid)
        if len(part):
            x, y = (t.index_select(0, part.indices) for t in part.tensors[:2])
            by_client.append(example_losses(module, x, y))
    members = torch.cat(by_client)
    example, client = loss_threshold(members, non_members), client_level(by_client, non_members, seed)
    return {
        "attack": "loss threshold (Yeom et al. 2018)",
        "example": example.as_dict(), "client": client.as_dict(),
        "train_loss_mean": float(members.mean()), "test_loss_mean": float(non_members.mean()),
        "_curves": {"loss threshold, example-level": roc_curve(-members.numpy(), -non_members.numpy())},
    }


def lira_report(
    config: str, trainer: Any, *, shadows: int = 8, seed: int = 0, fix_variance: bool = True,
    executor: str | None = None, extra_args: list[str] = (),
) -> dict[str, Any]:
    """Offline LiRA on the trainer's global model, with ``shadows`` re-runs of ``config`` as shadow models.

    The pool is the run's training examples followed by its test set; members are the clients' training
    splits, non-members the test set. Shadow ``k`` trains on the pool subset drawn from ``(seed, k)`` and is IN
    for the examples that land in its clients' training splits. ``extra_args`` are CLI arguments the target run
    was given beyond ``config`` (``["--privacy", "null"]``); the shadows get them too.

    Raises:
        ValueError: for data with natural groups (a random subset cannot keep them).
    """
    data = trainer.datamodule
    arrays = data.arrays
    if arrays.groups is not None:
        raise ValueError(
            "LiRA's shadow models re-partition random subsets of the pool with the config's partitioner; data "
            "partitioned by natural groups (arrays.groups) cannot be subset that way. Use the loss-threshold attack."
        )
    n_train = len(arrays.train[0])
    pool = tuple(torch.cat([a, b]) for a, b in zip(arrays.train, arrays.test))
    by_client = [data.client_train(c).indices for c in range(data.num_clients)]
    members = torch.cat(by_client)
    query = torch.cat([members, n_train + data.test_data().indices])
    is_member = torch.arange(len(query)) < len(members)
    x, y = pool[0][query], pool[-1][query]
    target = logit_confidences(_global_model(trainer), x, y)
    n_pool = len(pool[0])
    size = min(len(members), n_pool // 2)
    phis, ins, seconds = [], [], []
    for k in range(shadows):
        subset = torch.randperm(n_pool, generator=make_generator(seed, "lira_subset", k))[:size].sort().values
        with tempfile.TemporaryDirectory() as scratch:
            extra = [*extra_args, "--seed_everything", str(derive_seed(seed, "lira_shadow", k) % 2**31)]
            extra += ["--trainer.executor", executor] if executor else []
            cli = quiet_cli(config, scratch, extra)
            cli.datamodule.load = _subset_loader(pool, arrays, subset)
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                cli.trainer.fit(cli.model, cli.datamodule)
            seconds.append(time.perf_counter() - start)
            shadow = cli.datamodule
            trained = subset[torch.cat([shadow.client_train(c).indices for c in range(shadow.num_clients)])]
            ins.append(torch.isin(query, trained))
            phis.append(logit_confidences(_global_model(cli.trainer), x, y))
    scores = lira_offline(target, torch.stack(phis), torch.stack(ins), fix_variance=fix_variance)
    example = lira_attack(scores, is_member)
    member_scores = [s[~torch.isnan(s)] for s in scores[: len(members)].split([len(c) for c in by_client])]
    non_members = scores[len(members):]
    client = client_level_scores(member_scores, non_members[~torch.isnan(non_members)], seed)
    ok = ~torch.isnan(scores)
    return {
        "attack": "offline LiRA (Carlini et al. 2022)",
        "example": example.as_dict(), "client": client.as_dict(),
        "shadows": shadows, "shadow_train_size": size, "pool": n_pool, "fix_variance": fix_variance,
        "out_shadows_per_example": float((~torch.stack(ins)).sum(0).float().mean()),
        "scored_examples": int(ok.sum()), "shadow_seconds": [round(s, 2) for s in seconds],
        "_curves": {"LiRA, example-level": roc_curve(scores[ok & is_member].numpy(), scores[ok & ~is_member].numpy())},
    }


def reconstruction_report(
    trainer: Any, seed: int = 0, clients: int = 5, *, writer: Any = None, png: Path | None = None,
) -> dict[str, Any]:
    """Reconstruct one example of each of the first ``clients`` clients from its one-step update.

    The update starts from the trainer's global model and goes through a fresh copy of the run's client-level
    mechanism (same clip and noise multiplier; a cohort of one, the attacker isolating the client), or none.
    Images are ``(1, s, s)`` for flat inputs of ``s * s`` features, else the inputs' own shape; the pixel box is
    the training inputs' range. Scored by PSNR (analytic first layer and gradient inversion) and label accuracy.

    The analytic attack needs a fully connected layer on the input among the sent parameters; where there is none
    (a CNN, a frozen first layer) it is skipped and ``analytic_psnr`` is NaN.

    Raises:
        TypeError: for inputs that are not images (flat of a square size, or ``(c, h, w)``).
    """
    import math as _math

    from lightfed.audit.reconstruction import (
        AnalyticNotApplicable,
        attack_update,
        log_reconstructions,
        released_update,
        save_png,
    )
    from lightfed.privacy import DPFixedClipping
    from lightfed.strategy import FedAvg

    local, data = trainer.local, trainer.datamodule
    global_params = trainer.global_params.detach().clone()
    x_all = data.arrays.train[0]
    shape = tuple(x_all.shape[1:])
    side = _math.isqrt(shape[0]) if len(shape) == 1 else 0
    if len(shape) == 3:
        image = shape
    elif len(shape) == 1 and side * side == shape[0]:
        image = (1, side, side)
    else:
        raise TypeError(f"reconstruction attacks image inputs (flat of a square size, or (c, h, w)); got inputs of shape {shape}.")
    box = (float(x_all.min()), float(x_all.max()))
    lr = float(trainer.module.hparams.get("lr", 0.1))
    privacy, mechanism = trainer.privacy, None
    if privacy is not None:
        if not isinstance(privacy, DPFixedClipping):
            raise TypeError(
                f"reconstruction replays client-level DP (DPFixedClipping and its subclasses); this run uses "
                f"{type(privacy).__name__}. Audit the same config with --privacy null for the undefended case."
            )
        mechanism = DPFixedClipping(clip_norm=privacy.current_clip, noise_multiplier=privacy.z, verbose=False)
        mechanism.setup(RunInfo(num_clients=data.num_clients, sampler=trainer.sampler, rounds=trainer.rounds,
                                strategy=FedAvg(weighted=False), seed=seed))
    rows: dict[str, list[Any]] = {"truth": [], "analytic": [], "inversion": []}
    scores: dict[str, list[float]] = {"analytic": [], "inversion": [], "labels": []}
    for cid in range(min(clients, data.num_clients)):
        part = data.client_train(cid)
        one = type(part)(part.tensors, part.indices[:1])
        truth = tuple(t.index_select(0, one.indices) for t in one.tensors[:2])
        observed = released_update(local.module, local.spec, global_params, [one], privacy=mechanism, round_idx=cid, seed=seed)
        rows["truth"].append(truth[0].reshape(1, -1))
        for method in ("analytic", "inversion"):
            try:
                r = attack_update(local.module, local.spec, global_params, observed, lr=lr, method=method,
                                  image_shape=image, box=box, truth=truth, seed=seed)
            except AnalyticNotApplicable:  # no fully connected layer on the input is sent (a CNN, a frozen first layer)
                continue
            scores[method].append(r.psnr)
            rows[method].append(r.images.reshape(1, -1))
        scores["labels"].append(r.label_accuracy)
    local.spec.assign(local.tensors, global_params)
    grids = {k: torch.cat(v) for k, v in rows.items() if v}
    if writer is not None:
        for method in ("analytic", "inversion"):
            if method in grids:
                log_reconstructions(writer, f"reconstruction/{method}", grids[method], grids["truth"], image, box)
    if png is not None:
        save_png(grids, png, image, box)
    mean = lambda v: sum(v) / len(v) if v else _math.nan  # noqa: E731
    return {
        "attack": "analytic first layer and gradient inversion (Geiping et al. 2020), one-example one-step updates",
        "privacy": "none" if mechanism is None else f"DPFixedClipping C={mechanism.clip_norm:.3g} z={mechanism.z:.3g}",
        "analytic_psnr": mean(scores["analytic"]), "inversion_psnr": mean(scores["inversion"]),
        "label_accuracy": mean(scores["labels"]), "per_client": {k: [round(x, 2) for x in v] for k, v in scores.items()},
        "png": str(png) if png is not None else None,
    }


def _subset_loader(pool: tuple[torch.Tensor, ...], arrays: Any, subset: torch.Tensor) -> Any:
    """A ``load`` for a shadow's datamodule: the pool's ``subset`` as training data, the run's test set."""
    from lightfed.data.datamodule import FederatedArrays

    def load() -> FederatedArrays:
        train = tuple(t[subset] for t in pool)
        return FederatedArrays(train=train, test=arrays.test, labels=train[-1], groups=None,
                               num_classes=arrays.num_classes)

    return load


__all__ = ["lira_report", "main", "membership_report", "reconstruction_report"]
