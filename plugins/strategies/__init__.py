"""The strategy zoo: every strategy except FedAvg, registered through the ``lightfed.strategies`` entry point.

``pyproject.toml`` declares ``zoo = "plugins.strategies"`` in the entry-point group ``lightfed.strategies``;
importing this package imports every module below, whose ``@STRATEGIES.register(...)`` decorators do the
registration -- exactly the path a third-party plugin package takes (see ``docs/plugins.md``).
"""

from plugins.strategies.ditto import Ditto
from plugins.strategies.fedavgm import FedAvgM
from plugins.strategies.fednova import FedNova
from plugins.strategies.fedopt import FedAdagrad, FedAdam, FedOpt, FedYogi
from plugins.strategies.fedprox import FedProx
from plugins.strategies.krum import Bulyan, Krum, MultiKrum
from plugins.strategies.lora import FedITLoRA, FedSALoRA, FFALoRA, FLoRA
from plugins.strategies.qfedavg import QFedAvg
from plugins.strategies.robust import FedMedian, FedTrimmedAvg
from plugins.strategies.scaffold import SCAFFOLD

__all__ = [
    "FFALoRA", "FLoRA", "SCAFFOLD", "Bulyan", "Ditto", "FedAdagrad", "FedAdam", "FedAvgM", "FedITLoRA", "FedMedian",
    "FedNova", "FedOpt", "FedProx", "FedSALoRA", "FedTrimmedAvg", "FedYogi", "Krum", "MultiKrum", "QFedAvg",
]
