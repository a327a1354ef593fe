"""Differential privacy for federated learning."""

from lightfed.privacy.base import PrivacyMechanism

__all__ = ["PrivacyMechanism"]
