"""Executors beyond the sequential one (``trainer.executor: <name>``).

Importing this package registers them in :data:`lightfed.registry.EXECUTORS`:

* ``vmap`` - :class:`~lightfed.executors.vmap.VmapExecutor`, a whole cohort trained at once with
  ``torch.func`` (same result as ``sequential``, for models and strategies it can vectorise).
"""

from lightfed.executors.sgd import SGDHyper, sgd_hypers
from lightfed.executors.support import VmapUnsupportedError, check_vectorisable
from lightfed.executors.vmap import VmapExecutor

__all__ = ["SGDHyper", "VmapExecutor", "VmapUnsupportedError", "check_vectorisable", "sgd_hypers"]
