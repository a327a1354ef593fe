"""Executors beyond the sequential one (``trainer.executor: <name>``).

Importing this package registers them in :data:`lightfed.registry.EXECUTORS`:

* ``vmap`` - :class:`~lightfed.executors.vmap.VmapExecutor`, a whole cohort trained at once with
  ``torch.func`` (same result as ``sequential``, for models and strategies it can vectorise).
"""

from lightfed.executors.vmap import VmapExecutor, VmapUnsupportedError

__all__ = ["VmapExecutor", "VmapUnsupportedError"]
