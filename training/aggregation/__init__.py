"""Pure aggregation strategies for federated rounds (numpy only; no Django, no ORM).

An aggregator is created with the global weights, ``accept``s one decoded delta at a
time, may ``merge`` with another partial aggregate of the same kind (and ``checkpoint``
and ``resume``) when ``mergeable``, and ``finalize``s into the new global weights.
Order-statistics rules are not mergeable and can read updates chunk by chunk from an
:class:`UpdateSource`. Everything a strategy decides (server state across rounds, where
privacy noise goes) stays behind the :class:`Aggregator` interface.
"""

from .base import (
    DEFAULT_CHUNK,
    Aggregator,
    InMemoryUpdateSource,
    NoServerState,
    SafetensorsFileSource,
    UpdateFileReader,
    UpdateSource,
    Weights,
)
from .mean import WeightedMeanAggregator, partial_from_bytes, partial_to_bytes
from .privacy import Privacy
from .registry import AGGREGATORS, make_aggregator
from .robust import CoordinateMedianAggregator, KrumAggregator, TrimmedMeanAggregator
from .server_opt import (
    FedAdam,
    FedYogi,
    ServerOptAggregator,
    ServerOptState,
    state_from_bytes,
    state_to_bytes,
)

__all__ = [
    "AGGREGATORS",
    "DEFAULT_CHUNK",
    "Aggregator",
    "CoordinateMedianAggregator",
    "FedAdam",
    "FedYogi",
    "InMemoryUpdateSource",
    "KrumAggregator",
    "NoServerState",
    "Privacy",
    "SafetensorsFileSource",
    "ServerOptAggregator",
    "ServerOptState",
    "TrimmedMeanAggregator",
    "UpdateFileReader",
    "UpdateSource",
    "WeightedMeanAggregator",
    "Weights",
    "make_aggregator",
    "partial_from_bytes",
    "partial_to_bytes",
    "state_from_bytes",
    "state_to_bytes",
]
