"""Federated data: partitions of real datasets into clients, held on the device once."""

from lightfed.data.client_data import ClientData, Partition
from lightfed.data.datamodule import FederatedDataModule

__all__ = ["ClientData", "FederatedDataModule", "Partition"]
