"""Secure aggregation: the server learns only the sum of the cohort's updates.

``SecAggPlus`` (registered as ``"SecAggPlus"``) simulates SecAgg+ (Bonawitz et al. 2017; Bell et al.
2020) faithfully, with dropouts and distributed DP noise. Its primitives come from ``cryptography``,
imported on first use (``pip install -e ".[secagg]"`` in a checkout), so importing lightfed never needs it.
"""

from lightfed.secagg.aggregator import SecAggPlusAggregator
from lightfed.secagg.base import SecureAggregation
from lightfed.secagg.dropout import STAGES, DropoutModel, ScheduledDropout, StageDropout
from lightfed.secagg.protocol import SecAggClient, SecAggServer
from lightfed.secagg.quantize import FixedPoint, Layout
from lightfed.secagg.secagg_plus import SecAggPlus
from lightfed.secagg.view import ServerView

__all__ = [
    "STAGES", "DropoutModel", "FixedPoint", "Layout", "ScheduledDropout", "SecAggClient", "SecAggPlus",
    "SecAggPlusAggregator", "SecAggServer", "SecureAggregation", "ServerView", "StageDropout",
]
