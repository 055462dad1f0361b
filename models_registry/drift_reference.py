"""The drift reference of a model version: the sketch of its family's reference data.

What the boards' input sketches are compared with. The inputs are the family's newest
``reference`` data set, else its newest ``train`` set; their features are the ones the
agent sketches (:func:`devices_agent.drift.drift_features`, the same function on both
sides). For classification the reference also holds the histogram of the version's
top-1 confidence on those inputs, from its ONNX graph; regression has no confidence, so
its reference has no histogram and scoring leaves PSI out. The reference also holds the
bins per-feature PSI is counted over (``feature_bins``: the deciles of the features the
reference spreads most, and the reference's counts in them), which the server hands to
the boards. A family without such data has no reference, and its boards' sketches are
stored without a score.

`reference_sketch` is pure (numpy); `drift_reference_compute` stores the reference in
`ModelVersion.metrics["drift_reference"]`, computed lazily the first time a device
reports a sketch for the version.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import numpy as np
import numpy.typing as npt

from devices_agent.drift import DriftSketch, bin_counts, drift_features
from devices_agent.wire import DRIFT_FEATURE_BINS, DRIFT_PSI_MAX_FEATURES

__all__ = ["drift_reference_compute", "reference_feature_bins", "reference_sketch"]

log = logging.getLogger(__name__)

# A reference needs the data's distribution, not all of it.
MAX_REFERENCE_EXAMPLES = 5000


def reference_sketch(
    *,
    inputs: npt.ArrayLike,
    input_shape: tuple[int, ...] | list[int] | None = None,
    probabilities: npt.ArrayLike | None = None,
) -> dict[str, Any]:
    """The sketch (`wire.DriftSketch` shape) of reference inputs and, if given, their top-1 confidences.

    With ``input_shape`` the features are :func:`drift_features` of the inputs (what the
    boards sketch); without it, each row as it is. Without ``probabilities`` the result
    has no ``confidence_hist``.
    """
    x = np.asarray(inputs, dtype=np.float64)
    features = drift_features(x, input_shape) if input_shape is not None else x.reshape(len(x), -1)
    sketch = DriftSketch(num_features=features.shape[1])
    confidence = np.zeros(0) if probabilities is None else np.asarray(probabilities).max(axis=1)
    sketch.update(inputs=features, confidence=confidence)
    result = sketch.to_dict()
    if probabilities is None:
        del result["confidence_hist"]
    result["feature_bins"] = reference_feature_bins(features=features)
    return result


def reference_feature_bins(
    *,
    features: npt.ArrayLike,
    max_features: int = DRIFT_PSI_MAX_FEATURES,
    bins: int = DRIFT_FEATURE_BINS,
) -> dict[str, Any]:
    """The bins per-feature PSI is counted over, and the reference's own counts in them.

    The followed features are the ``max_features`` the reference spreads most (a feature
    that never varies, like a digit's border pixel, has one value and no distribution to
    compare); each is cut at its reference quantiles into ``bins`` bins of about equal
    reference mass (repeated edges of a feature with few distinct values merge). The
    ``etag`` names the bins, so a board's counts are only compared with the bins they were
    counted over.
    """
    x = np.asarray(features, dtype=np.float64)
    x = x.reshape(len(x), -1)
    spread = x.std(axis=0) if len(x) else np.zeros(x.shape[1])
    order = [int(i) for i in np.argsort(-spread, kind="stable") if spread[i] > 0][:max_features]
    chosen = sorted(order)
    quantiles = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    edges: list[list[float]] = []
    counts: list[list[int]] = []
    for feature in chosen:
        cut = np.unique(np.round(np.quantile(x[:, feature], quantiles), 6))
        edges.append([float(v) for v in cut])
        counts.append([int(v) for v in bin_counts(values=x[:, feature], edges=cut)])
    digest = hashlib.sha256(json.dumps([chosen, edges], separators=(",", ":")).encode()).hexdigest()[:16]
    return {"etag": digest, "features": chosen, "edges": edges, "counts": counts}


def _onnx_probabilities(*, version: Any, inputs: npt.NDArray[Any]) -> npt.NDArray[np.float64] | None:
    """Class probabilities of the version's ONNX graph on `inputs`, or None if it cannot run."""
    from devices_agent.family import probabilities
    from models_registry.evaluation import version_graph
    from models_registry.ml.evaluate import run_onnx

    try:
        outputs = run_onnx(version_graph(version), inputs)
    except Exception as exc:  # noqa: BLE001 - a graph that does not run leaves PSI out, not the endpoint down
        log.warning("no confidence histogram for %s: %s", version.label, exc)
        return None
    return probabilities(outputs)


def drift_reference_compute(*, version_id: int) -> dict[str, Any] | None:
    """Compute and store the reference sketch of a version; None when its family has no such data."""
    from django.db import transaction

    from models_registry.datasets import dataset_load, reference_dataset
    from models_registry.models import ModelVersion

    version = ModelVersion.objects.select_related("family").get(pk=version_id)
    family = version.family
    dataset = reference_dataset(family=family)
    if dataset is None:
        return None
    x, _ = dataset_load(dataset)
    if len(x) > MAX_REFERENCE_EXAMPLES:
        chosen = np.sort(np.random.default_rng(0).choice(len(x), MAX_REFERENCE_EXAMPLES, replace=False))
        x = x[chosen]
    spec = family.spec
    probs = _onnx_probabilities(version=version, inputs=x) if spec.task == "classification" else None
    reference = reference_sketch(inputs=x, input_shape=spec.input_shape, probabilities=probs)
    reference["dataset"] = dataset.name
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=version_id)
        locked.metrics = {**locked.metrics, "drift_reference": reference}
        locked.save(update_fields=["metrics"])
    return reference
