"""The drift reference of a model version: the sketch of its training data.

`reference_sketch` is pure (numpy); `drift_reference_compute` stores it in
`ModelVersion.metrics["drift_reference"]`, computed lazily the first time a device
reports a sketch for the version.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from devices_agent.drift import DriftSketch


def reference_sketch(*, inputs: npt.ArrayLike, probabilities: npt.ArrayLike | None = None) -> dict[str, Any]:
    """The sketch (`wire.DriftSketch` shape) of a training set and, if given, its top-1 confidences."""
    x = np.asarray(inputs, dtype=np.float64)
    sketch = DriftSketch(num_features=x.shape[1])
    confidence = np.zeros(0) if probabilities is None else np.asarray(probabilities).max(axis=1)
    sketch.update(inputs=x, confidence=confidence)
    return sketch.to_dict()


def _onnx_probabilities(*, version: Any, inputs: npt.NDArray[np.float32]) -> npt.NDArray[np.float64] | None:
    """Top-1 probabilities of the version's ONNX artifact on `inputs`, or None if it cannot run."""
    import onnxruntime

    from devices_agent.inference import to_probabilities

    artifact = version.artifacts.filter(kind="onnx").first()
    if artifact is None:
        return None
    try:
        with artifact.file.open("rb") as handle:
            session = onnxruntime.InferenceSession(handle.read(), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        outputs = session.run(None, {name: inputs})[0]
    except Exception:  # noqa: BLE001 - an artifact that does not run leaves PSI out, not the endpoint down
        return None
    return np.asarray(to_probabilities(np.asarray(outputs)), dtype=np.float64)


def drift_reference_compute(*, version_id: int) -> dict[str, Any]:
    """Compute and store the reference sketch of a version on the digits train split."""
    from django.db import transaction

    from devices_agent.data import load_digits_split
    from models_registry.models import ModelVersion

    x_train, _, _, _ = load_digits_split()
    version = ModelVersion.objects.get(pk=version_id)
    probabilities = _onnx_probabilities(version=version, inputs=x_train)
    reference = reference_sketch(inputs=x_train, probabilities=probabilities)
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=version_id)
        locked.metrics = {**locked.metrics, "drift_reference": reference}
        locked.save(update_fields=["metrics"])
    return reference
