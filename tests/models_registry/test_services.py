from __future__ import annotations

import io
import pickle
import zipfile
from typing import Any

import numpy as np
import pytest

from core.api import ConflictError, ServiceError
from devices_agent.codecs import encode_tensors
from models_registry import selectors, services
from models_registry.models import Artifact, ModelVersion
from models_registry.signing import signing_public_key_b64, verify_digest, verify_statement
from tests.bundles import digits_bundle

pytestmark = pytest.mark.django_db


def test_upload_weights_and_onnx_stores_signed_content_addressed_artifacts(
    family: Any, mlp_safetensors: bytes, mlp_onnx: bytes
) -> None:
    import hashlib

    from django.core.files.storage import default_storage

    version = services.version_create(family=family, weights=mlp_safetensors, onnx=mlp_onnx, notes="first")
    assert version.number == 1
    assert version.stage == ModelVersion.Stage.DRAFT
    artifacts = {a.kind: a for a in version.artifacts.all()}
    assert set(artifacts) == {"weights", "onnx"}
    for artifact, data in ((artifacts["weights"], mlp_safetensors), (artifacts["onnx"], mlp_onnx)):
        assert artifact.sha256 == hashlib.sha256(data).hexdigest()
        assert artifact.size == len(data)
        extension = ".onnx" if artifact.kind == "onnx" else ".safetensors"
        assert artifact.file.name.endswith(artifact.sha256 + extension)
        with default_storage.open(artifact.file.name, "rb") as handle:
            assert handle.read() == data
        assert verify_digest(artifact.sha256, artifact.signature, signing_public_key_b64())
    assert artifacts["onnx"].opset == 17
    ref: dict[str, Any] = dict(selectors.artifact_ref(selectors.version_get(version.pk)) or {})
    statement, statement_signature = ref.pop("statement"), ref.pop("statement_signature")
    assert ref == {
        "kind": "onnx",
        "url": f"/api/agent/v1/artifacts/{artifacts['onnx'].sha256}",
        "sha256": artifacts["onnx"].sha256,
        "size": len(mlp_onnx),
        "signature": artifacts["onnx"].signature,
    }
    # Served with a statement signed now, naming the version as the registry has it.
    assert (statement["version_id"], statement["number"], statement["kind"]) == (version.pk, 1, "onnx")
    assert statement["family"] == family.name and statement["sha256"] == artifacts["onnx"].sha256
    assert verify_statement(statement, statement_signature, signing_public_key_b64())
    assert selectors.artifact_by_sha256(artifacts["weights"].sha256.upper()) == artifacts["weights"]
    assert b"".join(selectors.artifact_chunks(artifacts["onnx"])) == mlp_onnx
    assert b"".join(selectors.artifact_chunks(artifacts["onnx"], start=10, end=20)) == mlp_onnx[10:20]


def test_versions_number_up_and_same_bytes_are_stored_once(
    family: Any, mlp_safetensors: bytes, stored_files: Any
) -> None:
    first = services.version_create(family=family, weights=mlp_safetensors)
    second = services.version_create(family=family, weights=mlp_safetensors, parent=first)
    assert (first.number, second.number) == (1, 2)
    assert len(stored_files()) == 1
    assert [v.pk for v in selectors.version_lineage(second)] == [first.pk]
    assert [v.pk for v in selectors.version_children(first)] == [second.pk]


def _torch_save_bytes(weights: dict[str, np.ndarray]) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, buffer)
    return buffer.getvalue()


def test_a_truncated_file_left_under_the_content_address_is_replaced(
    family: Any, mlp_safetensors: bytes
) -> None:
    import hashlib

    from django.core.files.base import ContentFile
    from django.core.files.storage import default_storage

    name = services.artifact_storage_name(sha256=hashlib.sha256(mlp_safetensors).hexdigest(), kind="weights")
    default_storage.save(name, ContentFile(mlp_safetensors[:100]))
    version = services.version_create(family=family, weights=mlp_safetensors)
    artifact = version.artifacts.get()
    assert artifact.file.name == name
    with default_storage.open(name, "rb") as handle:
        assert handle.read() == mlp_safetensors


def test_pickle_is_rejected_raw_and_as_torch_save_zip(
    family: Any, mlp_weights: dict[str, np.ndarray], stored_files: Any
) -> None:
    raw = pickle.dumps(mlp_weights, protocol=4)
    archive = _torch_save_bytes(mlp_weights)
    assert zipfile.is_zipfile(io.BytesIO(archive))
    for payload in (raw, archive):
        for field in ("weights", "onnx"):
            with pytest.raises(ServiceError) as caught:
                services.version_create(family=family, **{field: payload})  # type: ignore[arg-type]
            assert caught.value.code == "pickle_rejected"
            assert "safetensors" in caught.value.message
    assert not ModelVersion.objects.exists()
    assert stored_files() == set()


def test_declared_digest_must_match(family: Any, mlp_safetensors: bytes) -> None:
    with pytest.raises(ServiceError) as caught:
        services.version_create(family=family, weights=mlp_safetensors, declared_sha256={"weights": "0" * 64})
    assert caught.value.code == "digest_mismatch"
    assert not ModelVersion.objects.exists()


def test_size_limit_is_413(family: Any, mlp_safetensors: bytes, settings: Any) -> None:
    settings.MODEL_UPLOAD_MAX_BYTES = len(mlp_safetensors) - 1
    with pytest.raises(ServiceError) as caught:
        services.version_create(family=family, weights=mlp_safetensors)
    assert (caught.value.code, caught.value.status_code) == ("too_large", 413)


def test_temporary_uploaded_file_over_the_limit_is_413(
    family: Any, mlp_safetensors: bytes, settings: Any
) -> None:
    from django.core.files.uploadedfile import TemporaryUploadedFile

    upload = TemporaryUploadedFile("w.safetensors", "application/octet-stream", len(mlp_safetensors), None)
    upload.write(mlp_safetensors)
    upload.flush()
    settings.MODEL_UPLOAD_MAX_BYTES = 1024
    with pytest.raises(ServiceError) as caught:
        services.version_create(family=family, weights=upload)
    assert caught.value.status_code == 413
    settings.MODEL_UPLOAD_MAX_BYTES = 1 << 20
    version = services.version_create(family=family, weights=upload)
    assert version.artifacts.get().size == len(mlp_safetensors)
    upload.close()


def test_invalid_files_are_refused(family: Any, mlp_safetensors: bytes, mlp_onnx: bytes) -> None:
    cases = [
        ({"onnx": b"not an onnx model at all"}, "invalid_onnx"),
        ({"onnx": mlp_onnx[: len(mlp_onnx) // 2]}, "invalid_onnx"),
        ({"weights": b"\x00" * 4}, "invalid_safetensors"),
        ({"weights": mlp_safetensors[:-10]}, "invalid_safetensors"),
        ({"weights": mlp_safetensors + b"junk"}, "invalid_safetensors"),
    ]
    for kwargs, code in cases:
        with pytest.raises(ServiceError) as caught:
            services.version_create(family=family, **kwargs)  # type: ignore[arg-type]
        assert caught.value.code == code, kwargs.keys()


def test_non_finite_weights_are_refused(family: Any, mlp_weights: dict[str, np.ndarray]) -> None:
    for bad_value in (np.nan, np.inf):
        broken = dict(mlp_weights)
        broken["fc2.weight"] = mlp_weights["fc2.weight"].copy()
        broken["fc2.weight"][3, 4] = bad_value
        with pytest.raises(ServiceError) as caught:
            services.version_create(family=family, weights=encode_tensors(broken))
        assert caught.value.code == "non_finite" and caught.value.details["tensor"] == "fc2.weight"
    assert not ModelVersion.objects.exists()


def _refused(family: Any, code: str, stored_files: Any, **files: Any) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        services.version_create(family=family, **files)
    assert caught.value.code == code, (caught.value.code, caught.value.message)
    assert caught.value.status_code == 400
    # Nothing is half-written: no version, no artifact row, no stored file.
    assert not ModelVersion.objects.exists() and not Artifact.objects.exists()
    assert stored_files() == set()
    return caught.value


def test_a_full_bundle_is_accepted_with_its_head(family: Any, mlp_bundle: Any, stored_files: Any) -> None:
    version = services.version_create(
        family=family, weights=mlp_bundle.weights, onnx=mlp_bundle.onnx, program=mlp_bundle.program
    )
    assert set(version.artifacts.values_list("kind", flat=True)) == {"weights", "onnx", "program"}
    assert version.head == ["fc3.weight", "fc3.bias"]  # the default head: the last layer
    assert len(stored_files()) == 3


def test_weights_must_fit_the_program(
    family: Any, mlp_weights: dict[str, np.ndarray], mlp_onnx: bytes, mlp_program: bytes, stored_files: Any
) -> None:
    wrong_shape = dict(mlp_weights)
    wrong_shape["fc3.weight"] = np.zeros((5, 64), dtype=np.float32)
    missing = {k: v for k, v in mlp_weights.items() if k != "fc3.bias"}
    extra = {**mlp_weights, "fc4.weight": np.zeros((2, 2), dtype=np.float32)}
    for bad, needle in ((wrong_shape, "fc3.weight is (5, 64)"), (missing, "missing"), (extra, "fc4.weight")):
        error = _refused(
            family,
            "shape_mismatch",
            stored_files,
            weights=encode_tensors(bad),
            onnx=mlp_onnx,
            program=mlp_program,
        )
        assert needle in error.message
    as_float64 = {**mlp_weights, "fc1.weight": mlp_weights["fc1.weight"].astype(np.float64)}
    error = _refused(
        family,
        "invalid_weights",
        stored_files,
        weights=encode_tensors(as_float64),
        onnx=mlp_onnx,
        program=mlp_program,
    )
    assert "float32" in error.message and "fc1.weight" in error.message


def test_programs_that_do_not_load_or_need_pickle_are_refused(
    family: Any,
    mlp_weights: dict[str, np.ndarray],
    mlp_safetensors: bytes,
    mlp_onnx: bytes,
    stored_files: Any,
) -> None:
    import torch

    from config.demo.nets import build_model

    files = {"weights": mlp_safetensors, "onnx": mlp_onnx}
    _refused(family, "invalid_program", stored_files, program=b'{"not": "a program"}', **files)
    _refused(family, "invalid_program", stored_files, program=b"\x00\x01 binary junk", **files)
    # torch.save output: a zip of pickled members.
    _refused(family, "pickle_rejected", stored_files, program=_torch_save_bytes(mlp_weights), **files)
    _refused(family, "pickle_rejected", stored_files, program=pickle.dumps({"graph": 1}), **files)
    # A program exported for a fixed batch of two does not run on other batches.
    fixed = torch.export.export(build_model("mlp").eval(), (torch.zeros(2, 64),), strict=False)
    fixed_json = io.BytesIO()
    torch.export.save(fixed, fixed_json)
    error = _refused(family, "invalid_program", stored_files, program=fixed_json.getvalue(), **files)
    assert "dynamic batch" in error.message
    # A torch.export.save archive whose JSON was taken out: only pickled tensors remain.
    batch = torch.export.Dim("batch", min=1, max=4096)
    model = build_model("mlp").eval()
    exported = torch.export.export(model, (torch.zeros(2, 64),), dynamic_shapes=({0: batch},), strict=False)
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    stripped = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, zipfile.ZipFile(stripped, "w") as out:
        for name in source.namelist():
            if not name.endswith(".json"):
                out.writestr(name, source.read(name))
    error = _refused(family, "pickle_rejected", stored_files, program=stripped.getvalue(), **files)
    assert "never loads" in error.message
    # The whole archive is fine: only its JSON is read (and stored).
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    with pytest.raises(ServiceError) as other_weights:
        services.version_create(
            family=family, program=buffer.getvalue(), weights=encode_tensors(state), onnx=mlp_onnx
        )
    assert other_weights.value.code == "onnx_mismatch"  # the ONNX holds the bundle's weights
    version = services.version_create(
        family=family, program=buffer.getvalue(), weights=encode_tensors(mlp_weights), onnx=mlp_onnx
    )
    assert version.artifacts.get(kind="program").size < len(buffer.getvalue())


def test_programs_with_guard_code_or_foreign_operators_are_refused(
    family: Any, mlp_safetensors: bytes, mlp_onnx: bytes, mlp_program: bytes, stored_files: Any
) -> None:
    import json

    files = {"weights": mlp_safetensors, "onnx": mlp_onnx}
    doc = json.loads(mlp_program)
    guarded = dict(doc, guards_code="def guard(L): return __import__('os').system('true')")
    error = _refused(family, "unsafe_program", stored_files, program=json.dumps(guarded).encode(), **files)
    assert "guard code" in error.message
    foreign = json.loads(mlp_program)
    foreign["graph_module"]["graph"]["nodes"][0]["target"] = "builtins.eval"
    error = _refused(family, "unsafe_program", stored_files, program=json.dumps(foreign).encode(), **files)
    assert "builtins.eval" in error.message


def test_an_onnx_that_disagrees_with_its_program_is_refused_with_the_numbers(
    family: Any, mlp_bundle: Any, stored_files: Any
) -> None:
    other = digits_bundle("mlp", seed=1)
    error = _refused(
        family,
        "onnx_mismatch",
        stored_files,
        weights=mlp_bundle.weights,
        onnx=other.onnx,
        program=mlp_bundle.program,
    )
    assert "max |diff|" in error.message
    assert error.details["max_abs_diff"] > 1e-3 and error.details["atol"] == 1e-4


def test_an_onnx_without_named_initializers_is_refused(
    family: Any, mlp_bundle: Any, stored_files: Any
) -> None:
    from models_registry.ml.optimise import compact_onnx

    renamed = compact_onnx(mlp_bundle.onnx)  # same computation, initializers renamed t0, t1, ...
    error = _refused(
        family,
        "onnx_mismatch",
        stored_files,
        weights=mlp_bundle.weights,
        onnx=renamed,
        program=mlp_bundle.program,
    )
    assert "fc1.weight" in error.message and "do_constant_folding=False" in error.message


def test_onnx_input_shape_must_match_the_family(db: Any, mlp_onnx: bytes) -> None:
    other = services.family_create(name="wide", arch="custom", input_shape=[32], num_classes=10)
    with pytest.raises(ServiceError) as caught:
        services.version_create(family=other, onnx=mlp_onnx)
    assert caught.value.code == "shape_mismatch"


def test_failure_after_storing_leaves_no_rows_and_no_files(
    family: Any, mlp_safetensors: bytes, mlp_onnx: bytes, stored_files: Any, monkeypatch: Any
) -> None:
    # The failure is injected at the audit write, the last step inside the transaction,
    # after both files were stored and the artifact rows created.
    def broken_audit(**_: Any) -> None:
        raise RuntimeError("audit log unavailable")

    monkeypatch.setattr(services, "audit_record", broken_audit)
    with pytest.raises(RuntimeError):
        services.version_create(family=family, weights=mlp_safetensors, onnx=mlp_onnx)
    assert not ModelVersion.objects.exists()
    assert not Artifact.objects.exists()
    assert stored_files() == set()


def test_failure_keeps_files_other_versions_use(
    family: Any, mlp_safetensors: bytes, mlp_onnx: bytes, stored_files: Any, monkeypatch: Any
) -> None:
    services.version_create(family=family, weights=mlp_safetensors)
    before = stored_files()
    monkeypatch.setattr(services, "audit_record", lambda **_: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        services.version_create(family=family, weights=mlp_safetensors, onnx=mlp_onnx)
    assert stored_files() == before
    assert ModelVersion.objects.count() == 1


def test_promote_transitions(family: Any, mlp_safetensors: bytes) -> None:
    version = services.version_create(family=family, weights=mlp_safetensors)
    with pytest.raises(ConflictError) as caught:
        services.version_promote(version=version, stage="production")
    assert caught.value.code == "invalid_transition"
    with pytest.raises(ServiceError) as bad:
        services.version_promote(version=version, stage="gold")
    assert bad.value.code == "invalid_stage"
    services.version_promote(version=version, stage="staging")
    with pytest.raises(ConflictError):
        services.version_promote(version=version, stage="staging")
    services.version_promote(version=version, stage="production")
    version.refresh_from_db()
    assert version.stage == "production"

    second = services.version_create(family=family, weights=mlp_safetensors)
    services.version_promote(version=second, stage="staging")
    services.version_promote(version=second, stage="production")
    version.refresh_from_db()
    assert version.stage == "production"  # not exclusive: both stay in production
    third = services.version_create(family=family, weights=mlp_safetensors)
    services.version_promote(version=third, stage="staging")
    services.version_promote(version=third, stage="production", exclusive=True)
    stages = dict(ModelVersion.objects.values_list("number", "stage"))
    assert stages == {1: "archived", 2: "archived", 3: "production"}
    services.version_archive(version=third)
    with pytest.raises(ConflictError):
        services.version_promote(version=third, stage="production")


def test_every_write_is_audited(family: Any, mlp_safetensors: bytes) -> None:
    from core.audit.models import AuditEvent

    version = services.version_create(family=family, weights=mlp_safetensors)
    services.version_promote(version=version, stage="staging")
    actions = list(AuditEvent.objects.order_by("id").values_list("action", flat=True))
    assert actions == ["model_family.create", "model_version.create", "model_version.promote"]


def test_family_names_are_unique(family: Any) -> None:
    with pytest.raises(ConflictError):
        services.family_create(name="digits-mlp", arch="mlp", input_shape=[64], num_classes=10)


def test_version_list_is_two_queries(
    family: Any, mlp_safetensors: bytes, django_assert_num_queries: Any
) -> None:
    for _ in range(3):
        services.version_create(family=family, weights=mlp_safetensors)
    with django_assert_num_queries(2):
        refs = [selectors.artifact_ref(v, "weights") for v in selectors.version_list({"stage": "draft"})]
    assert len(refs) == 3 and all(refs)


def _onnx_with(mlp_onnx: bytes, change: Any) -> bytes:
    import onnx

    model = onnx.load_model_from_string(mlp_onnx)
    change(model)
    return bytes(model.SerializeToString())


def test_onnx_reaching_outside_the_file_is_refused_before_any_load(
    family: Any, mlp_onnx: bytes, tmp_path: Any
) -> None:
    """External data would make the server read a file of its own choosing; sparse tensors too."""
    import onnx
    from onnx import helper, numpy_helper

    secret = tmp_path / "server-secret.bin"
    secret.write_bytes(b"\x00" * 4096)

    def external(model: Any) -> None:
        tensor = model.graph.initializer[0]
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", str(secret)), ("offset", "0"), ("length", "4096")):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value

    def sparse(model: Any) -> None:
        values = numpy_helper.from_array(np.ones(1, np.float32), name="sp")
        indices = numpy_helper.from_array(np.zeros(1, np.int64), name="sp_idx")
        model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))

    for change in (external, sparse):
        with pytest.raises(ServiceError) as caught:
            services.version_create(family=family, onnx=_onnx_with(mlp_onnx, change))
        assert caught.value.code == "invalid_onnx" and "outside the file" in caught.value.message
    assert not ModelVersion.objects.exists()


def test_a_safetensors_header_cannot_claim_what_the_file_does_not_hold(family: Any) -> None:
    """A zero-size dimension or a shape beyond the bytes is refused before anything is allocated."""
    import json
    import struct

    def file_with(header: dict[str, Any], data: bytes) -> bytes:
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + data

    cases = [
        {"w": {"dtype": "F32", "shape": [0, 10**12], "data_offsets": [0, 0]}},
        {"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}},
        {
            "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "v": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
        },
    ]
    for header in cases:
        with pytest.raises(ServiceError) as caught:
            services.version_create(family=family, weights=file_with(header, b"\x00" * 16))
        assert caught.value.code == "invalid_safetensors", header
    assert not ModelVersion.objects.exists()


@pytest.mark.parametrize(
    "fields",
    [
        {"task": "classification", "input_shape": [10**5, 10**5], "num_classes": 10},
        {"task": "classification", "input_shape": [0], "num_classes": 10},
        {"task": "classification", "input_shape": [64], "num_classes": 10**9},
        {"task": "regression", "input_shape": [64], "output_size": 10**9},
        {"task": "classification", "input_shape": [64], "num_classes": 10, "input_dtype": "float64"},
    ],
)
def test_family_contracts_are_bounded(db: Any, fields: dict[str, Any]) -> None:
    from models_registry.models import ModelFamily

    with pytest.raises(ServiceError):
        services.family_create(name="too-big", actor=None, **fields)
    assert not ModelFamily.objects.exists()


def test_registering_a_trainable_graph_queues_its_ort_build_after_commit(
    family: Any, mlp_bundle: Any, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """The registry hears its own ``model_version.created`` and queues the training artifacts."""
    from models_registry.models import ModelJob

    settings.ORT_TRAINING_AUTO = True
    with django_capture_on_commit_callbacks(execute=True):
        version = services.version_create(
            family=family, weights=mlp_bundle.weights, onnx=mlp_bundle.onnx, program=mlp_bundle.program
        )
    job = ModelJob.objects.get(version=version)
    assert job.kind == "ort_training" and job.status == "queued"
    version.refresh_from_db()
    assert version.ort_training["status"] == "pending"
    # A graph without a program (nothing to train from) queues nothing.
    with django_capture_on_commit_callbacks(execute=True):
        services.version_create(family=family, onnx=mlp_bundle.onnx)
    assert ModelJob.objects.count() == 1
