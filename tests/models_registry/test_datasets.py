"""Data sets through /api/v1/datasets/: .npz, CSV and Parquet uploads checked against the family."""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from models_registry.models import EvaluationDataset
from tests.models_registry.conftest import regression_data

pytestmark = pytest.mark.django_db

URL = "/api/v1/datasets/"


def _npz(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _csv(x: np.ndarray, y: np.ndarray, *, label: str = "label") -> bytes:
    columns = [f"p{i}" for i in range(x.shape[1])]
    targets = [label] if y.ndim == 1 else [f"t{i}" for i in range(y.shape[1])]
    lines = [",".join(columns + targets)]
    for row, target in zip(x, y, strict=True):
        values = [repr(float(v)) for v in row] + [repr(float(t)) for t in np.atleast_1d(target)]
        lines.append(",".join(values))
    return ("\n".join(lines) + "\n").encode()


def _parquet(columns: dict[str, Any]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


def _upload(client: Any, family: Any, data: bytes, *, filename: str, name: str = "up", **fields: Any) -> Any:
    body = {"family": str(family), "name": name, "file": SimpleUploadedFile(filename, data), **fields}
    return client.post(URL, body, format="multipart")


def _digits(digits: Any, n: int = 50) -> tuple[np.ndarray, np.ndarray]:
    _, _, x_test, y_test = digits
    return x_test[:n], y_test[:n]


def test_npz_upload_registers_a_checked_data_set(
    operator_client: Any, viewer_client: Any, family: Any, digits: Any, stored_datasets: Any
) -> None:
    from models_registry.datasets import dataset_load

    x, y = _digits(digits)
    denied = _upload(viewer_client, family.pk, _npz(x=x, y=y), filename="d.npz")
    assert denied.status_code == 403
    created = _upload(
        operator_client, family.name, _npz(x=x, y=y), filename="d.npz", split="train", description="slice"
    )
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["family"] == family.pk and body["family_name"] == "digits-mlp"
    assert (body["split"], body["num_examples"], body["input_shape"], body["num_classes"]) == (
        "train",
        50,
        [64],
        10,
    )
    dataset = EvaluationDataset.objects.get(pk=body["id"])
    stored_x, stored_y = dataset_load(dataset)
    assert np.array_equal(stored_x, x.astype(np.float32)) and np.array_equal(stored_y, y)
    assert len(stored_datasets()) == 1
    # Viewers read, at the new route and the former one.
    listed = viewer_client.get(f"{URL}?split=train").json()
    assert [d["name"] for d in listed["results"]] == ["up"]
    assert viewer_client.get(f"/api/v1/evaluation-datasets/{body['id']}/").json()["sha256"] == body["sha256"]
    assert viewer_client.post("/api/v1/evaluation-datasets/", {}).status_code in (403, 405)
    again = _upload(operator_client, family.pk, _npz(x=x, y=y), filename="d.npz")
    assert again.status_code == 409 and again.json()["error"]["code"] == "dataset_exists"


def test_csv_and_parquet_uploads(operator_client: Any, family: Any, digits: Any) -> None:
    x, y = _digits(digits, 30)
    csv = _upload(operator_client, family.pk, _csv(x, y), filename="d.csv", name="as-csv")
    assert csv.status_code == 201, csv.content
    columns: dict[str, Any] = {f"p{i}": x[:, i] for i in range(64)}
    columns["y"] = y
    parquet = _upload(operator_client, family.pk, _parquet(columns), filename="d.parquet", name="as-parquet")
    assert parquet.status_code == 201, parquet.content
    assert csv.json()["num_examples"] == parquet.json()["num_examples"] == 30
    # The label column may come first: it is found by its name.
    reordered = {"label": y, **{f"p{i}": x[:, i] for i in range(64)}}
    first = _upload(operator_client, family.pk, _parquet(reordered), filename="r.parquet", name="label-first")
    assert first.status_code == 201, first.content


def test_regression_uploads_take_the_last_columns_as_targets(operator_client: Any, db: Any) -> None:
    from models_registry.datasets import dataset_load
    from models_registry.services import family_create

    family = family_create(name="regress-up", task="regression", input_shape=[4], output_size=2)
    x, y = regression_data(40, seed=0)
    response = _upload(operator_client, family.pk, _csv(x, y), filename="r.csv", name="regress-csv")
    assert response.status_code == 201, response.content
    assert response.json()["num_classes"] is None
    _, targets = dataset_load(EvaluationDataset.objects.get(name="regress-csv"))
    assert targets.shape == (40, 2) and targets.dtype == np.float32
    narrow = _upload(operator_client, family.pk, _npz(x=x, y=y[:, :1]), filename="r.npz", name="narrow")
    assert narrow.status_code == 400 and narrow.json()["error"]["code"] == "invalid_label"


@pytest.mark.parametrize(
    ("case", "code", "needle"),
    [
        ("wrong_shape_npz", "wrong_shape", "shape [50, 32]"),
        ("strings_npz", "invalid_dataset", "must hold numbers"),
        ("object_npz", "pickle_rejected", "pickle"),
        ("pickle_file", "invalid_dataset", "pickles"),
        ("nan", "non_finite", "NaN"),
        ("labels_out_of_range", "label_out_of_range", "[0, 10)"),
        ("missing_y", "invalid_dataset", "lacks ['y']"),
        ("csv_bad_cell", "invalid_dataset", "Row 3, column 'p5'"),
        ("csv_no_label", "invalid_dataset", "label column"),
        ("csv_wrong_width", "wrong_shape", "63 input columns"),
        ("csv_no_header", "invalid_dataset", "header row"),
        ("parquet_text_column", "invalid_dataset", "Column 'p0'"),
        ("parquet_nulls", "invalid_dataset", "missing values"),
        ("parquet_truncated", "invalid_dataset", "Parquet file is unreadable"),
    ],
)
def test_bad_uploads_are_refused_and_leave_nothing(
    operator_client: Any, family: Any, digits: Any, stored_datasets: Any, case: str, code: str, needle: str
) -> None:
    x, y = _digits(digits)
    columns: dict[str, Any] = {f"p{i}": x[:, i] for i in range(64)}
    columns["y"] = y
    nan = x.copy()
    nan[3, 7] = np.nan
    bad_cell = _csv(x[:5], y[:5]).decode().splitlines()
    row = bad_cell[2].split(",")
    row[5] = "seven"
    bad_cell[2] = ",".join(row)
    files: dict[str, tuple[bytes, str]] = {
        "wrong_shape_npz": (_npz(x=x[:, :32], y=y), "d.npz"),
        "strings_npz": (_npz(x=np.array([["a"] * 64] * 50), y=y), "d.npz"),
        "object_npz": (_npz(x=np.array([{"a": 1}] * 50, dtype=object), y=y), "d.npz"),
        "pickle_file": (pickle.dumps({"x": x, "y": y}), "d.pkl"),
        "nan": (_npz(x=nan, y=y), "d.npz"),
        "labels_out_of_range": (_npz(x=x, y=y + 5), "d.npz"),
        "missing_y": (_npz(x=x), "d.npz"),
        "csv_bad_cell": ("\n".join(bad_cell).encode(), "d.csv"),
        "csv_no_label": (_csv(x[:5], y[:5], label="target"), "d.csv"),
        "csv_wrong_width": (_csv(x[:5, :63], y[:5]), "d.csv"),
        "csv_no_header": (b"1,2,3\n4,5,6\n", "d.csv"),
        "parquet_text_column": (_parquet({**columns, "p0": ["a"] * 50}), "d.parquet"),
        "parquet_nulls": (_parquet({**columns, "p1": [None] + [0.5] * 49}), "d.parquet"),
        "parquet_truncated": (_parquet(columns)[:200], "d.parquet"),
    }
    data, filename = files[case]
    response = _upload(operator_client, family.pk, data, filename=filename)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == code, error
    assert needle in error["message"], error["message"]
    assert not EvaluationDataset.objects.exists()
    assert stored_datasets() == set()


def test_ragged_csv_rows_are_refused(operator_client: Any, family: Any, digits: Any) -> None:
    x, y = _digits(digits, 3)
    lines = _csv(x, y).decode().splitlines()
    lines[2] = ",".join(lines[2].split(",")[:10])
    response = _upload(operator_client, family.pk, "\n".join(lines).encode(), filename="d.csv")
    assert response.status_code == 400
    assert "Row 3 of the CSV file has 10 values; the header names 65" in response.json()["error"]["message"]


def test_integer_families_refuse_fractional_inputs(operator_client: Any, db: Any) -> None:
    from models_registry.services import family_create

    family = family_create(name="pixels", input_shape=[4], input_dtype="uint8", num_classes=2)
    fine = _upload(
        operator_client, family.pk, _npz(x=np.full((3, 4), 200), y=np.array([0, 1, 0])), filename="p.npz"
    )
    assert fine.status_code == 201, fine.content
    fractional = _upload(
        operator_client,
        family.pk,
        _npz(x=np.full((3, 4), 0.5), y=np.array([0, 1, 0])),
        filename="p.npz",
        name="f",
    )
    assert fractional.status_code == 400 and "integers" in fractional.json()["error"]["message"]
    too_big = _upload(
        operator_client,
        family.pk,
        _npz(x=np.full((3, 4), 300), y=np.array([0, 1, 0])),
        filename="p.npz",
        name="b",
    )
    assert too_big.status_code == 400 and "out of range" in too_big.json()["error"]["message"]


def test_uploads_over_the_limit_are_413_while_streaming(
    operator_client: Any, family: Any, digits: Any, settings: Any, stored_datasets: Any
) -> None:
    x, y = _digits(digits, 200)
    data = _npz(x=x, y=y)
    settings.DATASET_MAX_BYTES = len(data) // 2
    response = _upload(operator_client, family.pk, data, filename="d.npz")
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"
    # Small on the wire, large once unpacked (a compressed archive): refused as well.
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.zeros((4000, 64), dtype=np.float32), y=np.zeros(4000, dtype=np.int64))
    settings.DATASET_MAX_BYTES = 200_000
    assert len(buffer.getvalue()) < 200_000
    unpacked = _upload(operator_client, family.pk, buffer.getvalue(), filename="z.npz")
    assert unpacked.status_code == 413 and unpacked.json()["error"]["code"] == "too_large"
    assert not EvaluationDataset.objects.exists() and stored_datasets() == set()


def test_the_service_refuses_over_the_limit_too(family: Any, digits: Any, settings: Any) -> None:
    from core.api import ServiceError
    from models_registry.datasets import dataset_upload

    x, y = _digits(digits)
    settings.DATASET_MAX_BYTES = 1000
    with pytest.raises(ServiceError) as caught:
        dataset_upload(family=family, name="big", file=_npz(x=x, y=y), filename="d.npz")
    assert (caught.value.code, caught.value.status_code) == ("too_large", 413)


def test_unknown_family_and_split_are_validation_errors(
    operator_client: Any, family: Any, digits: Any
) -> None:
    x, y = _digits(digits)
    missing = _upload(operator_client, "no-such-family", _npz(x=x, y=y), filename="d.npz")
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "validation_error"
    split = _upload(operator_client, family.pk, _npz(x=x, y=y), filename="d.npz", split="holdout")
    assert split.status_code == 400
    assert not EvaluationDataset.objects.exists()


def test_a_failed_write_leaves_no_file(
    family: Any, digits: Any, stored_datasets: Any, monkeypatch: Any
) -> None:
    from models_registry import datasets

    x, y = _digits(digits)

    def broken_audit(**_: Any) -> None:
        raise RuntimeError("audit log unavailable")

    monkeypatch.setattr(datasets, "audit_record", broken_audit)
    with pytest.raises(RuntimeError):
        datasets.dataset_upload(family=family, name="lost", file=_npz(x=x, y=y), filename="d.npz")
    assert not EvaluationDataset.objects.exists() and stored_datasets() == set()


# --------------------------------------------------------------------------- drift references


def test_the_drift_reference_is_the_family_reference_set(trained_version: Any, digits: Any) -> None:
    from models_registry.datasets import dataset_register
    from models_registry.drift_reference import drift_reference_compute

    # Without a reference set, the train set serves.
    reference = drift_reference_compute(version_id=trained_version.pk)
    assert reference is not None and reference["dataset"] == "digits-mlp-train"
    assert reference["count"] == 300 and len(reference["mean"]) == 64
    assert sum(reference["confidence_hist"]) == 300
    x_train, y_train, _, _ = digits
    dataset_register(
        name="digits-mlp-reference",
        x=x_train[300:500],
        y=y_train[300:500],
        family=trained_version.family,
        split="reference",
    )
    reference = drift_reference_compute(version_id=trained_version.pk)
    assert (
        reference is not None and reference["dataset"] == "digits-mlp-reference" and reference["count"] == 200
    )
    trained_version.refresh_from_db()
    assert trained_version.metrics["drift_reference"] == reference


def test_drift_references_follow_the_agents_features(db: Any) -> None:
    from devices_agent.drift import MAX_FEATURES, DriftSketch, drift_features
    from models_registry.drift_reference import reference_sketch

    x = np.random.default_rng(0).random((10, 8, 1024)).astype(np.float32)
    reference = reference_sketch(inputs=x, input_shape=[8, 1024])
    assert MAX_FEATURES < 8 * 1024 and len(reference["mean"]) == 8  # one feature per channel
    bins = reference["feature_bins"]
    agent = DriftSketch(num_features=8, feature_bins=bins)
    agent.update(inputs=drift_features(x, (8, 1024)), confidence=np.zeros(0))
    sketch = agent.to_dict()
    moments = {k: v for k, v in reference.items() if k != "feature_bins"}
    assert moments == {k: sketch[k] for k in ("count", "mean", "m2")}
    # The agent, counting the reference inputs over the reference's bins, gets its counts.
    assert bins["features"] == list(range(8)) and sketch["feature_hist"] == bins["counts"]
    assert sketch["bins_etag"] == bins["etag"]


def test_regression_references_have_no_confidence_and_no_data_means_no_reference(
    regression_version: Any, family: Any, mlp_bundle: Any
) -> None:
    from models_registry.drift_reference import drift_reference_compute
    from models_registry.services import version_create

    reference = drift_reference_compute(version_id=regression_version.pk)
    assert reference is not None and "confidence_hist" not in reference and len(reference["mean"]) == 4
    without_data = version_create(family=family, onnx=mlp_bundle.onnx)
    assert drift_reference_compute(version_id=without_data.pk) is None
