"""Registered data sets of a family: test sets, training sets and drift references.

A data set is a safetensors file with two tensors, ``x`` (a batch of the family's input
examples) and ``y`` (int64 class labels, or float32 targets ``[n, output_size]`` for
regression), stored through Django's storage API under its content address. Its
``split`` says what it is for: ``test`` sets measure versions; ``train`` sets calibrate
quantisation and fine-tune pruned or distilled variants, never measure; a ``reference``
set (or, without one, the newest ``train`` set) is what drift on the boards is compared
with.

Uploads (``.npz``, CSV or Parquet, see :mod:`models_registry.dataset_files`) are spooled
to disk under ``DATASET_MAX_BYTES``, parsed, checked against the family's contract and
stored; a refused upload leaves no row and no file.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import numpy.typing as npt
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction

from core.api import ConflictError, ServiceError
from core.audit.services import audit_record
from devices_agent.codecs import WireError, decode_tensors, encode_tensors
from devices_agent.family import SpecError
from models_registry.models import EvaluationDataset, ModelFamily

__all__ = [
    "DEFAULT_DATASET_MAX_BYTES",
    "dataset_get",
    "dataset_load",
    "dataset_register",
    "dataset_upload",
    "family_dataset",
    "reference_dataset",
]

Split = EvaluationDataset.Split
DEFAULT_DATASET_MAX_BYTES = 256 * 1024 * 1024


def dataset_max_bytes() -> int:
    """The upload limit for data set files (``DATASET_MAX_BYTES``, default 256 MiB)."""
    return int(getattr(settings, "DATASET_MAX_BYTES", DEFAULT_DATASET_MAX_BYTES))


def _check_data(
    *, family: ModelFamily | None, x: npt.ArrayLike, y: npt.ArrayLike, num_classes: int | None
) -> tuple[npt.NDArray[Any], npt.NDArray[Any], int | None]:
    if family is not None:
        spec = family.spec
        try:
            xs = spec.inputs(x)
            ys = spec.labels(y, count=len(xs))
        except SpecError as exc:
            raise ServiceError(
                f"The data does not fit family {family.name}: {exc.message}", code=exc.code
            ) from None
        return xs, ys, spec.num_classes
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
    return xs, ys.astype(np.int64), num_classes


def _discard(name: str | None) -> None:
    # Content-addressed: another data set may hold the same bytes under this name.
    if name is None or EvaluationDataset.objects.filter(file=name).exists():
        return
    try:
        default_storage.delete(name)
    except OSError:  # pragma: no cover - best effort; the row never existed
        pass


def dataset_register(
    *,
    name: str,
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    num_classes: int | None = None,
    split: str = Split.TEST,
    description: str = "",
    actor: Any = None,
    family: ModelFamily | None = None,
    exists_ok: bool = True,
    source: dict[str, Any] | None = None,
) -> EvaluationDataset:
    """Store ``(x, y)`` as a data set named ``name``.

    An existing name is returned unchanged (``exists_ok``, for seeds) or is a 409
    ``dataset_exists``. With ``family``, the data is checked against the family's
    contract (input shape and dtype, finite values, labels in range or targets of the
    right width) and belongs to it; without one, ``x`` must be finite and ``y`` integer
    labels in ``[0, num_classes)``. Refusals are a 400 with the contract's code
    (``wrong_shape``, ``non_finite``, ``label_out_of_range``, ``invalid_label``, ...) or
    ``invalid_dataset``, saying why. The file and the row appear together or not at all.
    """
    existing = EvaluationDataset.objects.filter(name=name).first()
    if existing is not None:
        if exists_ok:
            return existing
        raise ConflictError(f"A data set named {name!r} already exists.", code="dataset_exists")
    if split not in Split.values:
        raise ServiceError(f"split must be one of {', '.join(Split.values)}.", code="invalid_split")
    xs, ys, classes = _check_data(family=family, x=x, y=y, num_classes=num_classes)
    data = encode_tensors({"x": xs, "y": ys}, metadata={"name": name})
    sha = hashlib.sha256(data).hexdigest()
    storage_name = f"datasets/{sha[:2]}/{sha}.safetensors"
    created = None
    if not default_storage.exists(storage_name) or default_storage.size(storage_name) != len(data):
        if default_storage.exists(storage_name):
            default_storage.delete(storage_name)  # a short file left by a process that died
        created = default_storage.save(storage_name, ContentFile(data))
    try:
        with transaction.atomic():
            dataset = EvaluationDataset(
                family=family,
                name=name,
                description=description,
                split=split,
                input_shape=list(xs.shape[1:]),
                num_classes=classes,
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
                data={
                    "name": name,
                    "examples": len(xs),
                    "split": split,
                    "family": family.name if family is not None else None,
                    **({"source": source} if source else {}),
                },
            )
    except IntegrityError:
        _discard(created)
        # Registered concurrently by another process: the same name means the same data.
        if not exists_ok:
            raise ConflictError(f"A data set named {name!r} already exists.", code="dataset_exists") from None
        return EvaluationDataset.objects.get(name=name)
    except BaseException:
        _discard(created)
        raise
    return dataset


def dataset_upload(
    *,
    family: ModelFamily,
    name: str,
    file: Any,
    filename: str = "",
    split: str = Split.TEST,
    description: str = "",
    actor: Any = None,
) -> EvaluationDataset:
    """Register an uploaded ``.npz``, CSV or Parquet file as a data set of ``family``.

    The file is spooled to disk (413 ``too_large`` past ``DATASET_MAX_BYTES``, counted
    while it streams), read without pickle (:func:`dataset_files.read_dataset_file`),
    checked against the family (:func:`dataset_register`) and stored under its content
    address. A name already taken is a 409 ``dataset_exists``.
    """
    from models_registry.dataset_files import read_dataset_file
    from models_registry.validation import spool

    if EvaluationDataset.objects.filter(name=name).exists():
        raise ConflictError(f"A data set named {name!r} already exists.", code="dataset_exists")
    if split not in Split.values:
        raise ServiceError(f"split must be one of {', '.join(Split.values)}.", code="invalid_split")
    limit = dataset_max_bytes()
    with spool(file, field="file", max_bytes=limit) as spooled:
        parsed = read_dataset_file(spooled.path, filename=filename, spec=family.spec, max_bytes=limit)
        digest = spooled.sha256
    return dataset_register(
        name=name,
        x=parsed.x,
        y=parsed.y,
        family=family,
        split=split,
        description=description,
        actor=actor,
        exists_ok=False,
        source={"format": parsed.format, "file_sha256": digest, "filename": filename[:200]},
    )


def dataset_get(name: str) -> EvaluationDataset | None:
    """A data set by name, or None."""
    return EvaluationDataset.objects.filter(name=name).first()


def _fits(dataset: EvaluationDataset, family: ModelFamily) -> str | None:
    """Why ``dataset`` does not fit ``family``'s contract, or None when it does."""
    spec = family.spec
    expected = f"shape {list(family.input_shape)}"
    if spec.task == "classification":
        expected += f" and {spec.num_classes} classes"
    else:
        expected += f" and {spec.outputs} regression targets"
    owner = dataset.family
    if list(dataset.input_shape) != list(spec.input_shape):
        problem = True
    elif owner is not None:
        theirs = owner.spec
        problem = (theirs.task, theirs.outputs) != (spec.task, spec.outputs)
    else:
        # Registered before data sets belonged to a family: class labels only.
        problem = spec.task != "classification" or dataset.num_classes != spec.num_classes
    if not problem:
        return None
    what = f"{dataset.num_classes} classes" if dataset.num_classes else "regression targets"
    return (
        f"Data set {dataset.name} has examples of shape {dataset.input_shape} and {what}; "
        f"family {family.name} expects {expected}."
    )


def family_dataset(*, family: ModelFamily, split: str, name: str | None = None) -> EvaluationDataset | None:
    """The family's data set of ``split``: the one named ``name``, else its newest; None without one.

    Raises ``ServiceError`` when ``name`` is not registered (``no_dataset``), is of
    another split (``wrong_split``), or does not fit the family (``dataset_mismatch``).
    """
    if name is None:
        return (
            EvaluationDataset.objects.filter(family=family, split=split)
            .select_related("family")
            .order_by("-created_at", "-id")
            .first()
        )
    dataset = EvaluationDataset.objects.select_related("family").filter(name=name).first()
    if dataset is None:
        raise ServiceError(f"No data set named {name!r} is registered.", code="no_dataset")
    if dataset.split != split:
        raise ServiceError(
            f"Data set {dataset.name} is a {dataset.split} set; this step needs a {split} set.",
            code="wrong_split",
        )
    problem = _fits(dataset, family)
    if problem:
        raise ServiceError(problem, code="dataset_mismatch")
    return dataset


def reference_dataset(*, family: ModelFamily) -> EvaluationDataset | None:
    """What drift is measured against: the family's newest reference set, else its newest train set."""
    return family_dataset(family=family, split=Split.REFERENCE) or family_dataset(
        family=family, split=Split.TRAIN
    )


def dataset_load(dataset: EvaluationDataset) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
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
