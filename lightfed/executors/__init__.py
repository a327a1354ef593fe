"""Executors: how a process trains its shard of a round's cohort (``trainer.executor: <name>``).

:mod:`lightfed.executors.base` holds the contract and the default ``sequential`` executor. Importing this
package registers the others in :data:`lightfed.registry.EXECUTORS`:

* ``vmap`` - :class:`~lightfed.executors.vmap.VmapExecutor`, a whole cohort trained at once with
  ``torch.func`` (same result as ``sequential``, for models and strategies it can vectorise).
"""

from lightfed.executors.base import Executor, SequentialExecutor
from lightfed.executors.sgd import SGDHyper, sgd_hypers
from lightfed.executors.support import VmapUnsupportedError, check_vectorisable
from lightfed.executors.vmap import VmapExecutor

__all__ = ["Executor", "SGDHyper", "SequentialExecutor", "VmapExecutor", "VmapUnsupportedError", "check_vectorisable", "sgd_hypers"]
