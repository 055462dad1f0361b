"""Reading uploaded data set files: ``.npz``, CSV and Parquet, never pickle.

Formats, told apart by their first bytes (the file name only breaks ties):

- ``.npz`` (a zip, ``PK``): arrays ``x`` (examples, ``[n, *input_shape]`` or flattened
  ``[n, prod(input_shape)]``) and ``y`` (labels ``[n]``, or targets ``[n, output_size]``).
  Read with ``allow_pickle=False``: an object array is refused, never unpickled.
- Parquet (``PAR1``) and CSV (text with a header row): one example per row, the
  flattened input values in their columns and then, for classification, one label
  column named ``y`` or ``label``; for regression the last ``output_size`` columns are
  the targets. Every cell must be a number.

Everything here only parses: what the arrays must satisfy (shape, dtype, finite values,
label range, target width) is the family's contract, checked by
:func:`models_registry.datasets.dataset_register`. Failures are ``ServiceError`` with
code ``invalid_dataset`` (or ``wrong_shape``, ``too_large``) and a message naming the
row, column or array at fault.
"""

from __future__ import annotations

import codecs
import csv
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from rest_framework import status

from core.api import ServiceError
from devices_agent.family import FamilySpec

__all__ = ["FORMATS", "ParsedDataset", "read_dataset_file"]

FORMATS = ("npz", "csv", "parquet")
LABEL_COLUMNS = ("y", "label")


@dataclass(frozen=True)
class ParsedDataset:
    """The arrays of an uploaded file, not yet checked against the family."""

    x: npt.NDArray[Any]
    y: npt.NDArray[Any]
    format: str


def _invalid(message: str, *, code: str = "invalid_dataset", **details: Any) -> ServiceError:
    return ServiceError(message, code=code, details={"field": "file", **details})


def _too_large(limit: int) -> ServiceError:
    return ServiceError(
        f"The data set holds more than the {limit}-byte limit once unpacked.",
        code="too_large",
        status_code=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
        details={"field": "file", "limit": limit},
    )


def _format_of(path: Path, filename: str) -> str:
    with path.open("rb") as handle:
        head = handle.read(4)
    suffix = Path(filename).suffix.lower()
    if head == b"PK\x03\x04":
        return "npz"
    if head == b"PAR1":
        return "parquet"
    if head[:1] == b"\x80" or suffix in (".pkl", ".pickle", ".pt", ".pth", ".npy"):
        raise _invalid(
            "The file is not an .npz, CSV or Parquet data set (pickles and bare .npy files are not "
            "accepted); save arrays x and y with numpy.savez.",
            code="invalid_dataset",
        )
    return "csv"


def _read_npz(path: Path, spec: FamilySpec, max_bytes: int) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info for info in archive.infolist()}
    except zipfile.BadZipFile as exc:
        raise _invalid(f"The .npz file is not a valid zip archive: {exc}") from None
    if any(name.endswith(".pkl") or name.endswith("data.pkl") for name in members):
        raise _invalid(
            "The file is a torch.save/pickle archive, which is never loaded; save arrays x and y "
            "with numpy.savez.",
            code="pickle_rejected",
        )
    missing = [key for key in ("x", "y") if f"{key}.npy" not in members]
    if missing:
        raise _invalid(
            f"The .npz file must hold arrays x and y; it lacks {missing} (it holds "
            f"{sorted(n.removesuffix('.npy') for n in members)[:10]}).",
            missing=missing,
        )
    unpacked = members["x.npy"].file_size + members["y.npy"].file_size
    if unpacked > max_bytes:
        raise _too_large(max_bytes)
    arrays: dict[str, npt.NDArray[Any]] = {}
    try:
        with np.load(path, allow_pickle=False) as data:
            for key in ("x", "y"):
                arrays[key] = np.asarray(data[key])
    except ValueError as exc:
        text = str(exc)
        if "allow_pickle" in text or "Object arrays" in text:
            raise _invalid(
                "The .npz file holds Python objects, which would need pickle to load; store numeric "
                "arrays only.",
                code="pickle_rejected",
            ) from None
        raise _invalid(f"The .npz file is unreadable: {text[:300]}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise _invalid(f"The .npz file is unreadable: {str(exc)[:300]}") from None
    x, y = arrays["x"], arrays["y"]
    for key, array in (("x", x), ("y", y)):
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise _invalid(f"Array {key} must hold numbers, not {array.dtype}.", array=key)
    # Examples may come flattened: [n, prod(input_shape)] is read as [n, *input_shape].
    width = math.prod(spec.input_shape)
    if x.ndim == 2 and len(spec.input_shape) > 1 and x.shape[1] == width:
        x = x.reshape(len(x), *spec.input_shape)
    return x, y


def _columns(names: list[str], spec: FamilySpec, kind: str) -> tuple[list[int], list[int]]:
    """Indices of the input columns and of the label (or target) columns."""
    if spec.task == "classification":
        labels = [i for i, n in enumerate(names) if n.strip().lower() in LABEL_COLUMNS]
        if len(labels) != 1:
            found = "none" if not labels else ", ".join(repr(names[i]) for i in labels)
            raise _invalid(
                f"The {kind} needs exactly one label column named 'y' or 'label' (found {found}).",
                columns=names[:20],
            )
    else:
        if len(names) <= spec.outputs:
            raise _invalid(
                f"The {kind} has {len(names)} columns; a regression set needs the input values and then "
                f"the last {spec.outputs} columns as targets.",
                columns=names[:20],
            )
        labels = list(range(len(names) - spec.outputs, len(names)))
    inputs = [i for i in range(len(names)) if i not in labels]
    width = math.prod(spec.input_shape)
    if len(inputs) != width:
        raise _invalid(
            f"The {kind} has {len(inputs)} input columns; the family takes {width} values per example "
            f"(shape {list(spec.input_shape)}), flattened one per column.",
            code="wrong_shape",
            input_columns=len(inputs),
            expected=width,
        )
    return inputs, labels


def _assemble(
    values: npt.NDArray[np.float64], inputs: list[int], labels: list[int], spec: FamilySpec
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    x = values[:, inputs].reshape(len(values), *spec.input_shape)
    y = values[:, labels[0]] if spec.task == "classification" else values[:, labels]
    return x, y


def _number(cell: str) -> float:
    text = cell.strip()
    if not text:
        raise ValueError("empty")
    return float(text)


def _read_csv(path: Path, spec: FamilySpec) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    with path.open("rb") as raw:
        reader = csv.reader(codecs.iterdecode(raw, "utf-8-sig"))
        try:
            header = next(reader, None)
            if not header:
                raise _invalid("The CSV file is empty; it needs a header row and one example per row.")
            names = [h.strip() for h in header]
            numeric = 0
            for name in names:
                try:
                    _number(name)
                    numeric += 1
                except ValueError:
                    pass
            if numeric == len(names):
                raise _invalid("The CSV file's first row must name the columns (a header row).")
            inputs, labels = _columns(names, spec, "CSV file")
            rows: list[list[float]] = []
            for line, row in enumerate(reader, start=2):
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(names):
                    raise _invalid(
                        f"Row {line} of the CSV file has {len(row)} values; the header names {len(names)}.",
                        row=line,
                    )
                try:
                    rows.append([_number(c) for c in row])
                except ValueError:
                    for column, cell in zip(names, row, strict=True):
                        try:
                            _number(cell)
                        except ValueError:
                            raise _invalid(
                                f"Row {line}, column {column!r} of the CSV file: {cell[:40]!r} "
                                "is not a number.",
                                row=line,
                                column=column,
                            ) from None
                    raise
        except UnicodeDecodeError:
            raise _invalid("The CSV file is not UTF-8 text.") from None
        except csv.Error as exc:
            raise _invalid(f"The CSV file is malformed: {exc}") from None
    if not rows:
        raise _invalid("The CSV file has a header but no examples.")
    return _assemble(np.asarray(rows, dtype=np.float64), inputs, labels, spec)


def _read_parquet(path: Path, spec: FamilySpec, max_bytes: int) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        metadata = parquet.metadata
        unpacked = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
        if unpacked > max_bytes:
            raise _too_large(max_bytes)
        table = parquet.read()
    except (pa.ArrowException, OSError) as exc:
        raise _invalid(f"The Parquet file is unreadable: {str(exc)[:300]}") from None
    names = [str(n) for n in table.column_names]
    inputs, labels = _columns(names, spec, "Parquet file")
    if table.num_rows == 0:
        raise _invalid("The Parquet file holds no examples.")
    columns = []
    for name, column in zip(names, table.columns, strict=True):
        kind = column.type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
            raise _invalid(f"Column {name!r} of the Parquet file holds {kind}, not numbers.", column=name)
        if column.null_count:
            raise _invalid(
                f"Column {name!r} of the Parquet file has {column.null_count} missing values.", column=name
            )
        columns.append(column.to_numpy().astype(np.float64, copy=False))
    values = np.stack(columns, axis=1)
    return _assemble(values, inputs, labels, spec)


def read_dataset_file(path: Path, *, filename: str, spec: FamilySpec, max_bytes: int) -> ParsedDataset:
    """The arrays ``(x, y)`` of an uploaded data set file (see the module docstring)."""
    kind = _format_of(path, filename)
    if kind == "npz":
        x, y = _read_npz(path, spec, max_bytes)
    elif kind == "parquet":
        x, y = _read_parquet(path, spec, max_bytes)
    else:
        x, y = _read_csv(path, spec)
    return ParsedDataset(x=x, y=y, format=kind)
