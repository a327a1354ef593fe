"""Secure aggregation: the server learns only the sum of the cohort's updates."""

from lightfed.secagg.base import SecureAggregation

__all__ = ["SecureAggregation"]
