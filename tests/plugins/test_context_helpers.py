"""The ClientContext helpers strategies use: param_pairs() and training_loss()."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from tests.plugins.zoo_testing import Quadratic, constant_client, make_ctx


def test_param_pairs_are_live_parameters_with_their_global_values_without_buffers():
    module = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    ctx = make_ctx(module, global_params=None)
    pairs = ctx.param_pairs()
    assert len(pairs) == 4  # weight, bias of Linear and BatchNorm; running stats are payload buffers, not pairs
    assert all(local.requires_grad and not glob.requires_grad for local, glob in pairs)
    assert [tuple(p.shape) for p, _ in pairs] == [(3, 2), (3,), (3,), (3,)]
    assert pairs[0][0] is module[0].weight
    assert pairs[0][1].data_ptr() == ctx.global_params.data_ptr()  # views of the flat global payload


def test_training_loss_mutes_logging_and_restores_what_was_attached():
    module = Quadratic()  # its training_step calls self.log
    ctx = make_ctx(module, data=constant_client([1.0, 2.0], 3))
    batch = next(ctx.batches(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # LightningModule.log without a Trainer would warn
        loss = ctx.training_loss(batch, 0)
    assert float(loss) == 2.5  # 0.5 * ||0 - [1, 2]||^2
    assert "log" not in module.__dict__ and "log_dict" not in module.__dict__

    calls = []
    module.__dict__["log"] = lambda *a, **k: calls.append(a)  # e.g. the client loop's LogCapture
    ctx.training_loss(batch, 0)
    assert calls == [] and module.__dict__["log"] is not None
    module.log("x", 1.0)
    assert calls == [("x", 1.0)]


def test_training_loss_runs_in_the_forward_context():
    module = Quadratic()
    ctx = make_ctx(module, data=constant_client([1.0, 2.0], 3))
    entered = []

    class Recorder:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc):
            return False

    ctx.forward_context = Recorder
    ctx.training_loss(next(ctx.batches(0)), 0)
    assert entered == [True]
    torch.testing.assert_close(ctx.local_params(), torch.zeros(2))
