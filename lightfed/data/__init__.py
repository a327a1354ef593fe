"""Federated data: partitions of real datasets into clients, held on the device once.

Imported on first use (PEP 562), so ``lightfed strategies`` and ``--help`` do not import torch or Lightning.
"""

from __future__ import annotations

from lightfed._lazy import lazy_exports

_WHERE = {
    "ClientData": "lightfed.data.client_data", "Partition": "lightfed.data.client_data",
    "DatasetClientData": "lightfed.data.client_data", "LightningDataSource": "lightfed.data.datamodule",
    "Explicit": "lightfed.data.partition",
    "FederatedArrays": "lightfed.data.datamodule", "FederatedDataModule": "lightfed.data.datamodule",
    "DigitsDataModule": "lightfed.data.datasets", "FashionMNISTDataModule": "lightfed.data.datasets",
    "TensorDataModule": "lightfed.data.datasets", "read_idx": "lightfed.data.datasets",
    "IID": "lightfed.data.partition", "Dirichlet": "lightfed.data.partition", "Natural": "lightfed.data.partition",
    "Partitioner": "lightfed.data.partition", "QuantitySkew": "lightfed.data.partition", "Shards": "lightfed.data.partition",
}

__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
