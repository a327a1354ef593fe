r"""One-run audit of sample-level DP (Steinke, Nasr & Jagielski, NeurIPS 2023, "Privacy Auditing with One (1)
Training Run"), black-box on the final model.

``m`` canary examples are drawn from the run's test set and given a wrong label (seeded; a mislabelled example
is one the model can only fit by memorising it). Each is included in the training data independently with
probability 1/2 (the included ones are appended to the training set, before the config's partitioner deals it to
clients) and removed from the test set. After one ordinary ``lightfed fit`` of the config, each canary is scored by
``-loss`` of its wrong label under the final model; :func:`~lightfed.audit.estimators.best_one_run_bound` guesses
"in" for the highest scores and "out" for the lowest, abstaining on the rest, and turns the number of correct
guesses into an epsilon lower bound at 95% confidence (the paper's Theorem 3.1, Bonferroni over its grid).

This is a **lower bound**: above the accountant's epsilon it proves the mechanism is not what it claims. Below,
it says only that this attack (one run, black-box, final model) learned no more; the paper's black-box
bounds are far below the true epsilon. The same run also reports its accountant's epsilon and accuracy.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from typing import Any

import torch
import torch.nn.functional as F

from lightfed.audit.estimators import best_one_run_bound
from lightfed.seeding import make_generator


def one_run_audit(
    config: str, *, canaries: int = 200, seed: int = 0, extra_args: list[str] = (), beta: float = 0.05,
) -> dict[str, Any]:
    """Train ``config`` once with ``canaries`` mislabelled canaries, each included with probability 1/2.

    Args:
        config: A ``lightfed fit`` config of a classifier (DP-SGD, ``privacy: lightfed.privacy.DPSGD``, is the
            mechanism this audits; any run works).
        canaries: ``m``, drawn from the test set (which keeps the rest).
        seed: Seed of the canaries, their wrong labels and their inclusion.
        extra_args: Further CLI arguments for the run (``["--privacy", "null"]``).
        beta: One minus the bound's confidence.

    Returns:
        ``epsilon_lower_bound`` (with the guesses behind it), the run's ``accountant_epsilon`` and ``delta``
        (``inf`` / the bound at ``delta = 0`` without privacy), ``test_acc`` and the counts.

    Raises:
        ValueError: for more canaries than half the test set, or data that are not ``(inputs, class ids)``.
    """
    from lightfed.audit.cli import quiet_cli
    from lightfed.data.datamodule import FederatedArrays

    with tempfile.TemporaryDirectory() as scratch:
        cli = quiet_cli(config, scratch, list(extra_args))
        original = cli.datamodule.load
        arrays = original()
        x_test, y_test = arrays.test[0], arrays.test[-1]
        if y_test.is_floating_point() or y_test.dim() != 1:
            raise ValueError(f"the one-run audit needs class-id labels; the test labels are {y_test.dtype} {tuple(y_test.shape)}.")
        if not 0 < canaries <= len(y_test) // 2:
            raise ValueError(f"canaries must be in [1, {len(y_test) // 2}] (half the {len(y_test)} test examples), got {canaries}.")
        classes = int(arrays.num_classes or int(y_test.max()) + 1)
        gen = make_generator(seed, "one_run_canaries")
        pick = torch.randperm(len(y_test), generator=gen)[:canaries]
        x_can = x_test[pick]
        y_can = (y_test[pick] + torch.randint(1, classes, (canaries,), generator=gen)) % classes  # a wrong label
        included = torch.rand(canaries, generator=gen) < 0.5
        keep = torch.ones(len(y_test), dtype=torch.bool)
        keep[pick] = False

        def load() -> FederatedArrays:
            train = (torch.cat([arrays.train[0], x_can[included]]), torch.cat([arrays.train[-1], y_can[included]]))
            test = (x_test[keep], y_test[keep])
            return FederatedArrays(train=train, test=test, labels=train[-1], groups=None,
                                   num_classes=arrays.num_classes)

        if arrays.groups is not None or len(arrays.train) != 2:
            raise ValueError("the one-run audit appends canaries to (inputs, labels) data without natural groups.")
        cli.datamodule.load = load
        with contextlib.redirect_stdout(io.StringIO()):
            history = cli.trainer.fit(cli.model, cli.datamodule)
        trainer = cli.trainer
        trainer.local.spec.assign(trainer.local.tensors, trainer.global_params)
        module = trainer.module
        was_training = module.training
        module.eval()
        with torch.no_grad():
            scores = -F.cross_entropy(module(x_can), y_can, reduction="none")
        module.train(was_training)
    final = dict(history[-1]) if history else {}
    delta = float(final.get("privacy/delta", 0.0))
    bound = best_one_run_bound(scores.tolist(), included.tolist(), delta=delta, beta=beta)
    return {
        "audit": "one-run, black-box final model (Steinke, Nasr & Jagielski 2023)",
        **bound, "canaries": canaries, "included": int(included.sum()), "delta": delta, "confidence": 1 - beta,
        "accountant_epsilon": float(final.get("privacy/epsilon", float("inf"))),
        "test_acc": float(final.get("central/test_acc", float("nan"))),
    }


__all__ = ["one_run_audit"]
