"""Federated data: partitions of real datasets into clients, held on the device once.

Imported on first use (PEP 562), so ``lightfed strategies`` and ``--help`` do not import torch or Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ClientData": "lightfed.data.client_data", "Partition": "lightfed.data.client_data",
    "FederatedArrays": "lightfed.data.datamodule", "FederatedDataModule": "lightfed.data.datamodule",
    "DigitsDataModule": "lightfed.data.datasets", "FashionMNISTDataModule": "lightfed.data.datasets",
    "TensorDataModule": "lightfed.data.datasets", "read_idx": "lightfed.data.datasets",
    "IID": "lightfed.data.partition", "Dirichlet": "lightfed.data.partition", "Natural": "lightfed.data.partition",
    "Partitioner": "lightfed.data.partition", "QuantitySkew": "lightfed.data.partition", "Shards": "lightfed.data.partition",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'lightfed.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
