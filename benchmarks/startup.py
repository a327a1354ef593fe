"""Start-up: a fresh interpreter, the imports, W1's data and model, and the first FedAvg round.

``run.py`` times this script from the outside (interpreter start included) in two modes:

* ``plain`` - torch + scikit-learn only: load digits, build the MLP, cut the batches, train one round
  of 10 clients with a plain loop;
* ``plain+lightning`` - the same plain loop in a script that also imports ``lightning`` (as any script
  whose model is a ``LightningModule`` does);
* ``lightfed`` - ``import lightfed`` and ``FederatedTrainer.fit`` of one round (no logger, no
  evaluation; the checkpoint and export at the end are skipped by timing up to the end of the round).

The script prints the seconds from its first line to the end of the first round (the parent adds the
interpreter's own start-up by timing the whole process).
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import sys  # noqa: E402


def plain(with_lightning: bool = False) -> float:
    if with_lightning:
        import lightning  # noqa: F401
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torch import nn

    torch.set_num_threads(1)
    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(digits.target)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=gen)
    clients = perm.chunk(100)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    params = list(net.parameters())
    global_vec = torch.cat([p.detach().reshape(-1) for p in params])
    delta_sum = torch.zeros_like(global_vec)
    for cid in range(10):
        idx = clients[cid]
        opt = torch.optim.SGD(params, lr=0.1)
        for i in range(0, len(idx), 16):
            opt.zero_grad()
            F.cross_entropy(net(x[idx[i:i + 16]]), y[idx[i:i + 16]]).backward()
            opt.step()
        delta_sum += torch.cat([p.detach().reshape(-1) for p in params]) - global_vec
    return time.perf_counter() - T0


def lightfed_round() -> float:
    import torch

    torch.set_num_threads(1)
    import tempfile

    import lightning as L

    from lightfed import FederatedTrainer
    from lightfed.data.datasets import DigitsDataModule
    from lightfed.data.partition import IID
    from lightfed.evaluation import Evaluation
    from lightfed.models import MLPClassifier

    L.seed_everything(0, verbose=False)
    ends: list[float] = []

    class NoEvaluation(Evaluation):
        def evaluate(self, trainer: FederatedTrainer, round_idx: int) -> dict[str, float]:
            return {}

    class Trainer(FederatedTrainer):
        def run_round(self, round_idx: int):  # type: ignore[no-untyped-def]
            result = super().run_round(round_idx)
            ends.append(time.perf_counter())
            return result

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            rounds=1, clients_per_round=10, batch_size=16, eval_every=2, fed_eval_fraction=0.0, checkpoint_every=0,
            logger=False, enable_progress_bar=False, default_root_dir=tmp,
        )
        trainer.evaluation = NoEvaluation()
        trainer.fit(MLPClassifier(in_features=64, hidden=[64], lr=0.1), DigitsDataModule(IID(num_clients=100), val_fraction=0.0))
    return ends[0] - T0


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "lightfed"
    seconds = lightfed_round() if mode == "lightfed" else plain(with_lightning=mode == "plain+lightning")
    print(f"{seconds:.4f}")
