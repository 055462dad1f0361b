"""The drift reference of a model version: the sketch of its family's reference data.

What the boards' input sketches are compared with. The inputs are the family's newest
``reference`` data set, else its newest ``train`` set; their features are the ones the
agent sketches (:func:`devices_agent.drift.drift_features`, the same function on both
sides). For classification the reference also holds the histogram of the version's
top-1 confidence on those inputs, from its ONNX graph; regression has no confidence, so
its reference has no histogram and scoring leaves PSI out. A family without such data
has no reference, and its boards' sketches are stored without a score.

`reference_sketch` is pure (numpy); `drift_reference_compute` stores the reference in
`ModelVersion.metrics["drift_reference"]`, computed lazily the first time a device
reports a sketch for the version.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import numpy.typing as npt

from devices_agent.drift import DriftSketch, drift_features

__all__ = ["drift_reference_compute", "reference_sketch"]

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
    return result


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
