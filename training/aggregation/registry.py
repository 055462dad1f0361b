"""Aggregation strategies by name, as stored on a federated job."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy.typing as npt

from .base import Aggregator
from .mean import WeightedMeanAggregator
from .privacy import Privacy
from .robust import CoordinateMedianAggregator, KrumAggregator, TrimmedMeanAggregator
from .server_opt import FedAdam, FedYogi, ServerOptAggregator

AGGREGATORS = ("fedavg", "fedprox", "fedadam", "fedyogi", "median", "trimmed_mean", "krum")


def make_aggregator(name: str, *, global_weights: Mapping[str, npt.ArrayLike], **params: Any) -> Aggregator:
    """Create the aggregator called ``name`` for a round starting from ``global_weights``.

    Parameters by name: ``fedadam``/``fedyogi``: ``eta``, ``beta1``, ``beta2``, ``tau``,
    ``state`` (a ``ServerOptState`` from the previous round, or None);
    ``trimmed_mean``: ``beta``, ``chunk``; ``krum``: ``f``, ``m``, ``chunk``;
    ``median``: ``chunk``. ``fedprox`` is ``fedavg`` on the server (its proximal term is
    part of the clients' local loss). Every rule takes ``privacy``, the round's clipping
    and noise (a :class:`~.privacy.Privacy` or None); the order statistics refuse noise.
    Unknown names or parameters, and noise a rule cannot add, raise ``ValueError``.
    """
    # Set by the server for each round (like ``state``), next to the job's own parameters.
    privacy = params.pop("privacy", None)
    if privacy is not None and not isinstance(privacy, Privacy):
        raise ValueError(f"privacy must be a Privacy, not {type(privacy).__name__}")
    try:
        if name in ("fedavg", "fedprox"):
            if params:
                raise TypeError(f"unexpected parameters {sorted(params)}")
            agg = WeightedMeanAggregator(global_weights=global_weights, privacy=privacy)
            agg.name = name
            return agg
        if name in ("fedadam", "fedyogi"):
            state = params.pop("state", None)
            opt_cls = FedAdam if name == "fedadam" else FedYogi
            return ServerOptAggregator(
                global_weights=global_weights, optimizer=opt_cls(**params), state=state, privacy=privacy
            )
        if name == "median":
            return CoordinateMedianAggregator(global_weights=global_weights, privacy=privacy, **params)
        if name == "trimmed_mean":
            return TrimmedMeanAggregator(global_weights=global_weights, privacy=privacy, **params)
        if name == "krum":
            return KrumAggregator(global_weights=global_weights, privacy=privacy, **params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for aggregator {name!r}: {exc}") from None
    raise ValueError(f"unknown aggregator {name!r}; expected one of {AGGREGATORS}")
