"""The strategy zoo: every strategy except FedAvg, registered through the ``lightfed.strategies`` entry point.

``pyproject.toml`` declares ``zoo = "lightfed_zoo.strategies"`` in the entry-point group ``lightfed.strategies``;
importing this package imports every module below, whose ``@STRATEGIES.register(...)`` decorators do the
registration -- exactly the path a third-party plugin package takes (see ``docs/plugins.md``).
"""

from lightfed_zoo.strategies.ditto import Ditto
from lightfed_zoo.strategies.fedasync import FedAsync
from lightfed_zoo.strategies.fedavgm import FedAvgM
from lightfed_zoo.strategies.fedbuff import FedBuff
from lightfed_zoo.strategies.fednova import FedNova
from lightfed_zoo.strategies.fedopt import FedAdagrad, FedAdam, FedOpt, FedYogi
from lightfed_zoo.strategies.fedprox import FedProx
from lightfed_zoo.strategies.krum import Bulyan, Krum, MultiKrum
from lightfed_zoo.strategies.lora import FedITLoRA, FedSALoRA, FFALoRA, FLoRA
from lightfed_zoo.strategies.qfedavg import QFedAvg
from lightfed_zoo.strategies.robust import FedMedian, FedTrimmedAvg
from lightfed_zoo.strategies.scaffold import SCAFFOLD

__all__ = [
    "FFALoRA", "FLoRA", "SCAFFOLD", "Bulyan", "Ditto", "FedAdagrad", "FedAdam", "FedAsync", "FedAvgM", "FedBuff",
    "FedITLoRA", "FedMedian",
    "FedNova", "FedOpt", "FedProx", "FedSALoRA", "FedTrimmedAvg", "FedYogi", "Krum", "MultiKrum", "QFedAvg",
]
