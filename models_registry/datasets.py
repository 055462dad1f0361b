"""Registered evaluation and calibration data sets (services and selectors).

A data set is a safetensors file with two tensors, ``x`` (float32, one row per example)
and ``y`` (int64 labels), stored through Django's storage API under its content address.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import numpy.typing as npt
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction

from core.api import ServiceError
from core.audit.services import audit_record
from devices_agent.codecs import WireError, decode_tensors, encode_tensors
from devices_agent.family import SpecError
from models_registry.models import EvaluationDataset

__all__ = [
    "dataset_get",
    "dataset_load",
    "dataset_register",
]


def dataset_register(
    *,
    name: str,
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    num_classes: int | None = None,
    split: str = EvaluationDataset.Split.TEST,
    description: str = "",
    actor: Any = None,
    family: Any = None,
) -> EvaluationDataset:
    """Store ``(x, y)`` as a data set named ``name``; an existing name is returned unchanged.

    With ``family``, the data is checked against the family's contract (input shape and
    dtype, finite values, labels in range or targets of the right width) and belongs to
    it; without one, ``x`` must be finite and ``y`` integer labels in ``[0, num_classes)``.
    Refusals are a 400 ``invalid_dataset`` (or the contract's own code) saying why.
    """
    existing = EvaluationDataset.objects.filter(name=name).first()
    if existing is not None:
        return existing
    if family is not None:
        spec = family.spec
        try:
            xs = spec.inputs(x)
            ys = spec.labels(y, count=len(xs))
        except SpecError as exc:
            raise ServiceError(
                f"The data does not fit family {family.name}: {exc.message}", code=exc.code
            ) from None
        num_classes = spec.num_classes
    else:
        xs = np.ascontiguousarray(x, dtype=np.float32)
        ys = np.asarray(y)
        if xs.ndim < 2 or len(xs) == 0:
            raise ServiceError(
                f"x must be a non-empty batch of examples, got shape {xs.shape}.", code="invalid_dataset"
            )
        if ys.shape != (len(xs),) or not np.issubdtype(ys.dtype, np.integer):
            raise ServiceError(
                f"y must hold {len(xs)} integer labels, got {ys.shape} {ys.dtype}.", code="invalid_dataset"
            )
        if num_classes is None or ys.min() < 0 or ys.max() >= num_classes or not np.all(np.isfinite(xs)):
            raise ServiceError("labels out of range or non-finite features.", code="invalid_dataset")
        ys = ys.astype(np.int64)
    data = encode_tensors({"x": xs, "y": ys}, metadata={"name": name})
    sha = hashlib.sha256(data).hexdigest()
    storage_name = f"datasets/{sha[:2]}/{sha}.safetensors"
    created = None
    if not default_storage.exists(storage_name):
        created = default_storage.save(storage_name, ContentFile(data))
    try:
        with transaction.atomic():
            dataset = EvaluationDataset(
                family=family,
                name=name,
                description=description,
                split=split,
                input_shape=list(xs.shape[1:]),
                num_classes=num_classes,
                num_examples=len(xs),
                sha256=sha,
                size=len(data),
            )
            dataset.file.name = created or storage_name
            dataset.save()
            audit_record(
                actor=actor,
                action="evaluation_dataset.create",
                target=dataset,
                data={"name": name, "examples": len(xs), "split": split},
            )
    except IntegrityError:
        # Registered concurrently by another process: the same name means the same data.
        return EvaluationDataset.objects.get(name=name)
    return dataset


def dataset_get(name: str) -> EvaluationDataset | None:
    """A data set by name, or None."""
    return EvaluationDataset.objects.filter(name=name).first()


def dataset_load(dataset: EvaluationDataset) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Read a data set's ``(x, y)`` back from storage, checking its digest and tensors."""
    with default_storage.open(dataset.file.name, "rb") as handle:
        data = handle.read()
    if hashlib.sha256(data).hexdigest() != dataset.sha256:
        raise ServiceError(
            f"Data set {dataset.name} does not match its recorded digest.", code="dataset_corrupt"
        )
    try:
        tensors, _ = decode_tensors(data)
    except WireError as exc:
        raise ServiceError(f"Data set {dataset.name} is unreadable: {exc}", code="dataset_corrupt") from None
    if set(tensors) != {"x", "y"}:
        raise ServiceError(f"Data set {dataset.name} must hold tensors x and y.", code="dataset_corrupt")
    y = tensors["y"]
    labels = (
        np.asarray(y, dtype=np.int64) if np.issubdtype(y.dtype, np.integer) else np.asarray(y, np.float32)
    )
    return np.asarray(tensors["x"]), labels
