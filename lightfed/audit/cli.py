"""``lightfed audit``: attacks on a finished model, from the run's config and checkpoint.

    lightfed audit --config experiments/digits_fedavg.yaml --ckpt_path runs/.../checkpoints/last.ckpt

Runs the loss-threshold membership inference attack (Yeom et al. 2018), example-level and client-level, on the
checkpoint's global model; prints AUC and TPR at 0.1% / 1% FPR, and writes ``audit_membership.json`` and
``audit_membership_roc.png`` next to the checkpoint's run (or ``--out``). The canary audits run inside
``lightfed fit`` (``trainer.callbacks``); see docs/auditing.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch

from lightfed.audit.membership import client_level, example_losses, loss_threshold, plot_roc, roc_curve


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lightfed audit", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the run's config (its resolved config.yaml, or the experiment)")
    parser.add_argument("--ckpt_path", required=True, help="a lightfed checkpoint of that run")
    parser.add_argument("--out", default=None, help="folder of the report (default: the checkpoint's run folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the client-level pseudo-clients")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    """Entry point of ``lightfed audit`` (``argv`` without the command name)."""
    from lightfed.cli import LightFedCLI

    args = parse(argv)
    ckpt = Path(args.ckpt_path)
    if not ckpt.is_file():
        raise SystemExit(f"lightfed: error: --ckpt_path {str(ckpt)!r} does not exist; point it at a lightfed checkpoint.")
    out = Path(args.out) if args.out else (ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent)
    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(io.StringIO()), \
            mock.patch.object(sys, "argv", sys.argv[:1]):
        cli = LightFedCLI(args=["--config", args.config, "--trainer.logger", "false", "--trainer.enable_progress_bar",
                                "false", "--trainer.callbacks", "[]", "--trainer.default_root_dir", scratch], run=False)
        trainer = cli.trainer
        central = trainer.test(cli.model, cli.datamodule, ckpt_path=str(ckpt))
    report = membership_report(trainer, args.seed)
    report.update({"checkpoint": str(ckpt), "config": args.config, "central": central})
    out.mkdir(parents=True, exist_ok=True)
    curves = report.pop("_curves")
    report["roc_plot"] = str(plot_roc(curves, out / "audit_membership_roc.png"))
    (out / "audit_membership.json").write_text(json.dumps(report, indent=2) + "\n")
    for level in ("example", "client"):
        r = report[level]
        print(f"{level}-level loss threshold: AUC {r['auc']:.3f}, TPR@0.1%FPR {r['tpr@0.1%fpr']:.4f}, "
              f"TPR@1%FPR {r['tpr@1%fpr']:.4f} ({int(r['members'])} members, {int(r['non_members'])} non-members)")
    print(f"report: {out / 'audit_membership.json'}")


def membership_report(trainer: object, seed: int = 0) -> dict[str, object]:
    """Loss-threshold attacks on the trainer's (restored) global model: example- and client-level."""
    local, module, data = trainer.local, trainer.module, trainer.datamodule  # type: ignore[attr-defined]
    local.spec.assign(local.tensors, trainer.global_params)  # type: ignore[attr-defined]
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
        "_curves": {"example-level": roc_curve(-members.numpy(), -non_members.numpy())},
    }


__all__ = ["main", "membership_report"]
