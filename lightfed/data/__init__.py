"""Federated data: partitions of real datasets into clients, held on the device once."""

from lightfed.data.client_data import ClientData, Partition
from lightfed.data.datamodule import FederatedArrays, FederatedDataModule
from lightfed.data.datasets import DigitsDataModule, FashionMNISTDataModule, TensorDataModule, read_idx
from lightfed.data.partition import IID, Dirichlet, Natural, Partitioner, QuantitySkew, Shards

__all__ = [
    "IID", "ClientData", "DigitsDataModule", "Dirichlet", "FashionMNISTDataModule", "FederatedArrays",
    "FederatedDataModule", "Natural", "Partition", "Partitioner", "QuantitySkew", "Shards", "TensorDataModule",
    "read_idx",
]
