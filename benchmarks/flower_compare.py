"""Optional: W1 through Flower's simulation engine (only when ``flwr[simulation]`` is installed).

The same data (W1's Dirichlet(0.5) partition of the digits, so the same clients), the same model and
initial weights, FedAvg with 10 of 100 clients per round, one local epoch of batch 16, plain SGD. Flower
samples its own cohorts (its client manager's RNG), so cohorts differ from lightfed's; seconds per round
are measured between the strategy's ``aggregate_fit`` calls (steady state). Start-up is reported in two
parts: importing Flower, and the call of ``run_simulation`` to the end of the first round (Ray's start,
the virtual SuperNodes, the first cohort's ClientApps), against ~0.3 s for lightfed's set-up and first
round.

``run.py`` imports this module only if ``importlib.util.find_spec("flwr")`` finds Flower; lightfed never
depends on it. Written against Flower's ``ClientApp`` / ``ServerApp`` / ``run_simulation`` API (1.8 and
later); run with Flower 1.42.0 and Ray 2.55.1 (``pip install "flwr[simulation]==1.42.0"``).
"""

from __future__ import annotations

import time
from statistics import median
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def run(rounds: int = 20, warmup: int = 5, seed: int = 0) -> dict[str, Any]:
    """Seconds per round (median of the steady rounds) and start-up seconds of Flower's simulation."""
    t_import = time.perf_counter()
    import flwr
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation
    import_seconds = time.perf_counter() - t_import
    from workloads import prepared, w1

    workload = w1(rounds=rounds, warmup=warmup)
    dm, module = prepared(workload, seed)
    net = module.net
    x_all, y_all = dm.arrays.train
    start = [p.detach().cpu().numpy().copy() for p in net.parameters()]
    marks: dict[str, list[float]] = {"configure": [], "aggregate": []}

    class Client(NumPyClient):
        def __init__(self, cid: int) -> None:
            self.cid = cid

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
            torch.set_num_threads(1)
            with torch.no_grad():
                for p, v in zip(net.parameters(), parameters):
                    p.copy_(torch.from_numpy(v))
            idx = dm.train_part.client(self.cid)
            idx = idx[torch.randperm(len(idx))]
            opt = torch.optim.SGD(net.parameters(), lr=workload.lr)
            for i in range(0, len(idx), workload.batch_size):
                b = idx[i:i + workload.batch_size]
                opt.zero_grad()
                F.cross_entropy(net(x_all[b]), y_all[b]).backward()
                opt.step()
            return [p.detach().numpy().copy() for p in net.parameters()], len(idx), {}

    def client_fn(context: Context):  # type: ignore[no-untyped-def]
        return Client(int(context.node_config["partition-id"])).to_client()

    class TimedFedAvg(FedAvg):
        def configure_fit(self, *args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
            marks["configure"].append(time.perf_counter())
            return super().configure_fit(*args, **kwargs)

        def aggregate_fit(self, *args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
            out = super().aggregate_fit(*args, **kwargs)
            marks["aggregate"].append(time.perf_counter())
            return out

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = TimedFedAvg(
            fraction_fit=workload.clients_per_round / dm.num_clients, min_fit_clients=workload.clients_per_round,
            fraction_evaluate=0.0, min_evaluate_clients=0, min_available_clients=dm.num_clients,
            initial_parameters=ndarrays_to_parameters(start),
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    t0 = time.perf_counter()
    run_simulation(
        server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
        num_supernodes=dm.num_clients, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    ends = marks["aggregate"]
    per_round = [b - a for a, b in zip(ends[:-1], ends[1:])][max(0, warmup - 1):]
    return {
        "label": f"Flower {flwr.__version__} run_simulation",
        "seconds_per_round": median(per_round) if per_round else float("nan"),
        "import_seconds": import_seconds,
        "first_round_seconds": (ends[0] - t0) if ends else float("nan"),
    }
