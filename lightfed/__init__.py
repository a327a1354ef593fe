"""lightfed: privacy-preserving federated fine-tuning simulation on PyTorch Lightning.

The public API: the trainer that runs rounds, the strategy contract and FedAvg, the registries that
plugins use, samplers, the federated datamodule, and the typed messages between them.

The names are imported on first use (PEP 562 module ``__getattr__``), so ``import lightfed`` and
commands that need no model -- ``lightfed --help``, ``lightfed strategies`` -- do not pay for importing
Lightning; ``from lightfed import FederatedTrainer`` works as before.
"""

from __future__ import annotations

from lightfed._lazy import lazy_exports

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_WHERE = {
    "Aggregator": "lightfed.aggregation",
    "CollectAll": "lightfed.aggregation",
    "StreamingSum": "lightfed.aggregation",
    "Callback": "lightfed.callbacks",
    "ClientContext": "lightfed.context",
    "ClientData": "lightfed.data.client_data",
    "Partition": "lightfed.data.client_data",
    "FederatedArrays": "lightfed.data.datamodule",
    "FederatedDataModule": "lightfed.data.datamodule",
    "Executor": "lightfed.executors.base",
    "SequentialExecutor": "lightfed.executors.base",
    "ClientUpdate": "lightfed.messages",
    "RoundAggregate": "lightfed.messages",
    "RoundResult": "lightfed.messages",
    "ParamSpec": "lightfed.params",
    "PrivacyMechanism": "lightfed.privacy.base",
    "EXECUTORS": "lightfed.registry",
    "PRIVACY": "lightfed.registry",
    "SECURE_AGGREGATION": "lightfed.registry",
    "STRATEGIES": "lightfed.registry",
    "Registry": "lightfed.registry",
    "ClientSampler": "lightfed.sampling",
    "FullParticipation": "lightfed.sampling",
    "PoissonSampler": "lightfed.sampling",
    "UniformSampler": "lightfed.sampling",
    "SecureAggregation": "lightfed.secagg.base",
    "derive_seed": "lightfed.seeding",
    "make_generator": "lightfed.seeding",
    "FedAvg": "lightfed.strategy",
    "Strategy": "lightfed.strategy",
    "FederatedTrainer": "lightfed.trainer",
}

__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
