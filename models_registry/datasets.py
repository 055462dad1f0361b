"""Registered evaluation and calibration data sets (services and selectors).

A data set is a safetensors file with two tensors, ``x`` (float32, one row per example)
and ``y`` (int64 labels), stored through Django's storage API under its content address.
The digits splits come from scikit-learn's bundled copy, so nothing is downloaded.
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
from models_registry.models import EvaluationDataset

__all__ = [
    "DIGITS_TEST",
    "DIGITS_TRAIN",
    "dataset_get",
    "dataset_load",
    "dataset_register",
    "dataset_register_digits_test",
    "dataset_register_digits_train",
]

DIGITS_TEST = "digits-test"
DIGITS_TRAIN = "digits-train-public"
# The public training slice is small on purpose: enough to calibrate int8 ranges and
# fine-tune a pruned or distilled model, far less than the devices hold between them.
DIGITS_TRAIN_EXAMPLES = 300


def dataset_register(
    *,
    name: str,
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    num_classes: int,
    split: str = EvaluationDataset.Split.TEST,
    description: str = "",
    actor: Any = None,
) -> EvaluationDataset:
    """Store ``(x, y)`` as a data set named ``name``; an existing name is returned unchanged.

    ``x`` is cast to float32 and must be finite; ``y`` must be integer labels in
    ``[0, num_classes)`` with one per row of ``x``.
    """
    existing = EvaluationDataset.objects.filter(name=name).first()
    if existing is not None:
        return existing
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
    if ys.min() < 0 or ys.max() >= num_classes or not np.all(np.isfinite(xs)):
        raise ServiceError("labels out of range or non-finite features.", code="invalid_dataset")
    data = encode_tensors({"x": xs, "y": ys.astype(np.int64)}, metadata={"name": name})
    sha = hashlib.sha256(data).hexdigest()
    storage_name = f"datasets/{sha[:2]}/{sha}.safetensors"
    created = None
    if not default_storage.exists(storage_name):
        created = default_storage.save(storage_name, ContentFile(data))
    try:
        with transaction.atomic():
            dataset = EvaluationDataset(
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


def dataset_register_digits_test(*, seed: int = 0, actor: Any = None) -> EvaluationDataset:
    """Register (once) the held-out test split of scikit-learn's digits as ``digits-test``."""
    from devices_agent.data import load_digits_split

    _, _, x_test, y_test = load_digits_split(seed=seed)
    return dataset_register(
        name=DIGITS_TEST,
        x=x_test,
        y=y_test,
        num_classes=10,
        split=EvaluationDataset.Split.TEST,
        description=f"scikit-learn digits, stratified 20% test split (seed {seed}), pixels / 16.",
        actor=actor,
    )


def dataset_register_digits_train(*, seed: int = 0, actor: Any = None) -> EvaluationDataset:
    """Register (once) a small public slice of the digits training split for calibration."""
    from devices_agent.data import load_digits_split

    x_train, y_train, _, _ = load_digits_split(seed=seed)
    return dataset_register(
        name=DIGITS_TRAIN,
        x=x_train[:DIGITS_TRAIN_EXAMPLES],
        y=y_train[:DIGITS_TRAIN_EXAMPLES],
        num_classes=10,
        split=EvaluationDataset.Split.TRAIN,
        description=(
            f"First {DIGITS_TRAIN_EXAMPLES} examples of the digits training split (seed {seed}): "
            "calibration and fine-tuning data for optimised variants."
        ),
        actor=actor,
    )


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
    return np.asarray(tensors["x"], dtype=np.float32), np.asarray(tensors["y"], dtype=np.int64)
