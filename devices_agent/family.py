"""What a model family declares, and the metrics that follow from its task.

A family is a contract, not an architecture: a *task* (``classification`` with
``num_classes`` classes, or ``regression`` with ``output_size`` outputs), the shape and
dtype of one input example, and from the task the loss a board trains with and the
metrics everyone judges by. Both sides use this module: the server to check data sets
and evaluate versions, the agent to check what its application sends, train, and report
metrics. Pure numpy; torch only inside :func:`torch_loss`.

Metrics by task, all computed on model outputs (logits or probabilities for
classification, values for regression):

- classification: ``accuracy``, ``loss`` (cross-entropy), ``confusion`` (rows = true
  class), ``macro_auc`` (one-vs-rest); on-device feedback records ``correct`` (0 or 1);
- regression: ``mae``, ``rmse``, ``loss`` (mean squared error); on-device feedback
  records ``abs_error`` (the mean absolute error of that prediction).

The *primary metric* (``accuracy``, higher is better; ``mae``, lower is better) is what
"best version", gates, experiments and drift flags compare.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "INPUT_DTYPES",
    "MAX_INPUT_ELEMENTS",
    "TASKS",
    "FamilySpec",
    "SpecError",
    "feedback_metric",
    "outputs_metrics",
]

TASKS = ("classification", "regression")
INPUT_DTYPES = ("float32", "int64", "uint8")
# One example may hold at most this many values: enough for a small image or a window of
# sensor readings, far below what would let a caller exhaust a board's memory.
MAX_INPUT_ELEMENTS = 1 << 20
MAX_CLASSES = 10_000
MAX_OUTPUTS = 4096


class SpecError(ValueError):
    """Input, labels or a family declaration that do not fit the family's contract."""

    def __init__(self, message: str, *, code: str = "invalid_input") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class FamilySpec:
    """A family's task and input contract (see the module docstring)."""

    task: str
    input_shape: tuple[int, ...]
    input_dtype: str = "float32"
    num_classes: int | None = None
    output_size: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise SpecError(f"task must be one of {TASKS}, got {self.task!r}", code="invalid_family")
        if not self.input_shape or any(not isinstance(d, int) or d < 1 for d in self.input_shape):
            raise SpecError("input_shape must be a list of positive integers", code="invalid_family")
        if math.prod(self.input_shape) > MAX_INPUT_ELEMENTS:
            raise SpecError(
                f"an input example may hold at most {MAX_INPUT_ELEMENTS} values", code="invalid_family"
            )
        if self.input_dtype not in INPUT_DTYPES:
            raise SpecError(f"input_dtype must be one of {INPUT_DTYPES}", code="invalid_family")
        if self.task == "classification":
            if not isinstance(self.num_classes, int) or not 2 <= self.num_classes <= MAX_CLASSES:
                raise SpecError(
                    f"a classification family needs num_classes in [2, {MAX_CLASSES}]", code="invalid_family"
                )
        elif not isinstance(self.output_size, int) or not 1 <= self.output_size <= MAX_OUTPUTS:
            raise SpecError(
                f"a regression family needs output_size in [1, {MAX_OUTPUTS}]", code="invalid_family"
            )

    # --- facts that follow from the task ---------------------------------------------
    @property
    def outputs(self) -> int:
        """Values the model returns per example."""
        value = self.num_classes if self.task == "classification" else self.output_size
        return int(value or 1)

    @property
    def primary_metric(self) -> str:
        """``accuracy`` for classification, ``mae`` for regression."""
        return "accuracy" if self.task == "classification" else "mae"

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger primary metric is better."""
        return self.task == "classification"

    @property
    def feedback_metric(self) -> str:
        """The metric a labelled prediction records on the board: ``correct`` or ``abs_error``."""
        return "correct" if self.task == "classification" else "abs_error"

    def better(self, a: float | None, b: float | None) -> bool:
        """Whether primary metric ``a`` beats ``b`` (a missing value never beats anything)."""
        if a is None:
            return False
        if b is None:
            return True
        return a > b if self.higher_is_better else a < b

    # --- wire form --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``wire.FamilySpec``)."""
        out: dict[str, Any] = {
            "task": self.task,
            "input_shape": list(self.input_shape),
            "input_dtype": self.input_dtype,
        }
        if self.task == "classification":
            out["num_classes"] = self.num_classes
        else:
            out["output_size"] = self.output_size
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FamilySpec:
        """Parse the JSON form; :class:`SpecError` when it is malformed."""
        try:
            shape = tuple(int(d) for d in data["input_shape"])
            task = str(data.get("task", "classification"))
            return cls(
                task=task,
                input_shape=shape,
                input_dtype=str(data.get("input_dtype", "float32")),
                num_classes=int(data["num_classes"]) if data.get("num_classes") is not None else None,
                output_size=int(data["output_size"]) if data.get("output_size") is not None else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, SpecError):
                raise
            raise SpecError(f"malformed family: {exc}", code="invalid_family") from None

    # --- checking what an application or a data set sends ------------------------------
    def inputs(self, x: Any, *, max_batch: int | None = None) -> npt.NDArray[Any]:
        """``x`` as a batch of examples of this family (one example or many), or SpecError.

        One example (``input_shape``) becomes a batch of one; a batch has a leading axis.
        Floats must be finite; integer dtypes must hold integers.
        """
        if isinstance(x, np.ndarray) and x.dtype == np.float32 and self.input_dtype == "float32":
            # The common case (the local API's raw tensors): only the shape and finiteness to check.
            batch = x.reshape(1, *self.input_shape) if x.shape == self.input_shape else x
            if batch.shape[1:] == self.input_shape and batch.shape[0] >= 1:
                if max_batch is not None and batch.shape[0] > max_batch:
                    raise SpecError(f"a batch may hold at most {max_batch} examples", code="batch_too_large")
                if not np.isfinite(batch).all():
                    raise SpecError("inputs hold NaN or infinite values", code="non_finite")
                return np.ascontiguousarray(batch)
        try:
            array = np.asarray(x)
        except (ValueError, TypeError) as exc:
            raise SpecError(f"inputs are not an array: {exc}") from None
        if array.dtype == object:
            raise SpecError("inputs are ragged or not numbers")
        if tuple(array.shape) == self.input_shape:
            array = array.reshape(1, *self.input_shape)
        if tuple(array.shape[1:]) != self.input_shape or array.shape[0] < 1:
            raise SpecError(
                f"inputs have shape {list(array.shape)}; this family takes {list(self.input_shape)} "
                f"or a batch [n, {', '.join(str(d) for d in self.input_shape)}]",
                code="wrong_shape",
            )
        if max_batch is not None and array.shape[0] > max_batch:
            raise SpecError(f"a batch may hold at most {max_batch} examples", code="batch_too_large")
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise SpecError(f"inputs must be numbers, got {array.dtype}")
        if self.input_dtype == "float32":
            out = np.ascontiguousarray(array, dtype=np.float32)
            if not np.all(np.isfinite(out)):
                raise SpecError("inputs hold NaN or infinite values", code="non_finite")
            return out
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.equal(np.mod(array, 1), 0)):
            raise SpecError(f"inputs must be integers for dtype {self.input_dtype}")
        info = np.iinfo(np.dtype(self.input_dtype))
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise SpecError(f"inputs out of range for {self.input_dtype}")
        return np.ascontiguousarray(array, dtype=np.dtype(self.input_dtype))

    def labels(self, y: Any, *, count: int | None = None) -> npt.NDArray[Any]:
        """``y`` as labels of this task (int64 classes, or float32 targets), or SpecError."""
        try:
            array = np.asarray(y)
        except (ValueError, TypeError) as exc:
            raise SpecError(f"labels are not an array: {exc}", code="invalid_label") from None
        if self.task == "classification":
            if array.ndim == 0:
                array = array.reshape(1)
            if array.ndim != 1 or not (
                np.issubdtype(array.dtype, np.integer)
                or (np.issubdtype(array.dtype, np.floating) and np.all(np.mod(array, 1) == 0))
            ):
                raise SpecError("labels must be class indices (integers)", code="invalid_label")
            assert self.num_classes is not None
            if array.size and (array.min() < 0 or array.max() >= self.num_classes):
                raise SpecError(
                    f"labels must lie in [0, {self.num_classes}); got {int(array.min())}..{int(array.max())}",
                    code="label_out_of_range",
                )
            out = array.astype(np.int64)
        else:
            size = self.outputs
            if array.ndim <= 1 and size == 1:
                array = array.reshape(-1, 1)
            elif array.ndim == 1 and array.shape[0] == size:
                array = array.reshape(1, size)
            if array.ndim != 2 or array.shape[1] != size:
                raise SpecError(f"targets must have shape [n, {size}]", code="invalid_label")
            out = np.ascontiguousarray(array, dtype=np.float32)
            if not np.all(np.isfinite(out)):
                raise SpecError("targets hold NaN or infinite values", code="non_finite")
        if count is not None and len(out) != count:
            raise SpecError(f"{len(out)} labels for {count} examples", code="invalid_label")
        return out


def _softmax(outputs: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    if outputs.size and outputs.min() >= 0.0 and float(np.abs(outputs.sum(axis=1) - 1.0).max()) <= 1e-3:
        return outputs  # already probabilities
    shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    result: npt.NDArray[np.float64] = shifted / shifted.sum(axis=1, keepdims=True)
    return result


def probabilities(outputs: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Rows of class probabilities from logits (softmax) or from probabilities as they are."""
    return _softmax(np.asarray(outputs, dtype=np.float64).reshape(np.shape(outputs)[0], -1))


def _macro_auc(probs: npt.NDArray[np.float64], y: npt.NDArray[np.int64], classes: int) -> float | None:
    """Mean one-vs-rest ROC AUC over classes present with both labels (Mann-Whitney U)."""
    aucs = []
    for c in range(classes):
        positive = y == c
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        if n_pos == 0 or n_neg == 0:
            continue
        scores = probs[:, c]
        order = np.argsort(scores, kind="mergesort")
        ranks = np.empty(len(scores), dtype=np.float64)
        sorted_scores = scores[order]
        # Average ranks for ties, so equal scores count one half each way.
        i = 0
        while i < len(scores):
            j = i
            while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
                j += 1
            ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
            i = j + 1
        u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
        aucs.append(u / (n_pos * n_neg))
    return float(np.mean(aucs)) if aucs else None


def outputs_metrics(spec: FamilySpec, outputs: npt.ArrayLike, y: npt.ArrayLike) -> dict[str, Any]:
    """The task's metrics of model ``outputs`` against labels ``y`` (see the module docstring)."""
    out = np.asarray(outputs, dtype=np.float64)
    labels = spec.labels(y, count=len(out))
    if spec.task == "classification":
        assert spec.num_classes is not None
        out = out.reshape(len(out), -1)
        probs = _softmax(out)
        predicted = probs.argmax(axis=1)
        true = labels.astype(np.int64)
        picked = np.clip(probs[np.arange(len(true)), true], 1e-12, 1.0)
        confusion = np.zeros((spec.num_classes, spec.num_classes), dtype=np.int64)
        np.add.at(confusion, (true, predicted), 1)
        return {
            "examples": int(len(true)),
            "accuracy": float((predicted == true).mean()) if len(true) else 0.0,
            "loss": float(-np.log(picked).mean()) if len(true) else 0.0,
            "confusion": confusion.tolist(),
            "macro_auc": _macro_auc(probs, true, spec.num_classes),
        }
    values = out.reshape(len(out), -1)
    error = values - labels.astype(np.float64)
    return {
        "examples": int(len(values)),
        "mae": float(np.abs(error).mean()) if error.size else 0.0,
        "rmse": float(math.sqrt((error**2).mean())) if error.size else 0.0,
        "loss": float((error**2).mean()) if error.size else 0.0,
    }


def feedback_metric(spec: FamilySpec, output: npt.ArrayLike, label: Any) -> tuple[str, float]:
    """What one labelled prediction records: ``("correct", 0|1)`` or ``("abs_error", e)``."""
    row = np.asarray(output, dtype=np.float64).reshape(1, -1)
    if spec.task == "classification":
        true = int(spec.labels([label])[0])
        return "correct", 1.0 if int(row.argmax(axis=1)[0]) == true else 0.0
    target = spec.labels(label, count=1)
    return "abs_error", float(np.abs(row - target).mean())


def torch_loss(spec: FamilySpec) -> Any:
    """The training loss of the task as a torch function ``loss(outputs, targets)``."""
    import torch

    if spec.task == "classification":
        return torch.nn.functional.cross_entropy

    def mse(outputs: Any, targets: Any) -> Any:
        return torch.nn.functional.mse_loss(outputs.reshape(targets.shape), targets)

    return mse
