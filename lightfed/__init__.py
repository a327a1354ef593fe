"""lightfed: privacy-preserving federated fine-tuning simulation on PyTorch Lightning.

The public API: the trainer that runs rounds, the strategy contract and FedAvg, the registries that
plugins use, samplers, the federated datamodule, and the typed messages between them.
"""

from lightfed.aggregation import Aggregator, CollectAll, StreamingSum
from lightfed.callbacks import Callback
from lightfed.context import ClientContext
from lightfed.data.client_data import ClientData, Partition
from lightfed.data.datamodule import FederatedArrays, FederatedDataModule
from lightfed.executor import Executor, SequentialExecutor
from lightfed.messages import ClientUpdate, RoundAggregate, RoundResult
from lightfed.params import ParamSpec
from lightfed.privacy.base import PrivacyMechanism
from lightfed.registry import EXECUTORS, PRIVACY, SECURE_AGGREGATION, STRATEGIES, Registry
from lightfed.sampling import ClientSampler, FullParticipation, PoissonSampler, UniformSampler
from lightfed.secagg.base import SecureAggregation
from lightfed.seeding import derive_seed, make_generator
from lightfed.strategy import FedAvg, Strategy
from lightfed.trainer import FederatedTrainer

__version__ = "0.1.0"

__all__ = [
    "EXECUTORS", "PRIVACY", "SECURE_AGGREGATION", "STRATEGIES",
    "Aggregator", "Callback", "ClientContext", "ClientData", "ClientSampler", "ClientUpdate", "CollectAll", "Executor",
    "FedAvg", "FederatedArrays", "FederatedDataModule", "FederatedTrainer", "FullParticipation", "ParamSpec",
    "Partition", "PoissonSampler", "PrivacyMechanism", "Registry", "RoundAggregate", "RoundResult",
    "SecureAggregation", "SequentialExecutor", "StreamingSum", "Strategy", "UniformSampler",
    "derive_seed", "make_generator",
]
