from __future__ import annotations

import hashlib
import pickle
from typing import Any

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from models_registry.models import Artifact, ModelVersion
from models_registry.signing import verify_digest

pytestmark = pytest.mark.django_db


def _upload(client: Any, family_id: int, **files: bytes | str) -> Any:
    body: dict[str, Any] = {"family": family_id}
    for name, value in files.items():
        body[name] = SimpleUploadedFile(f"{name}.bin", value) if isinstance(value, bytes) else value
    return client.post("/api/v1/model-versions/", body, format="multipart")


def test_family_crud_and_roles(viewer_client: Any, operator_client: Any) -> None:
    body = {"name": "digits-cnn", "arch": "cnn", "input_shape": [64], "num_classes": 10}
    assert viewer_client.post("/api/v1/models/", body, format="json").status_code == 403
    created = operator_client.post("/api/v1/models/", body, format="json")
    assert created.status_code == 201, created.content
    family_id = created.json()["id"]
    again = operator_client.post("/api/v1/models/", body, format="json")
    assert again.status_code == 409 and again.json()["error"]["code"] == "family_exists"
    listing = viewer_client.get("/api/v1/models/").json()
    assert [f["name"] for f in listing["results"]] == ["digits-cnn"]
    patched = operator_client.patch(f"/api/v1/models/{family_id}/", {"description": "d"}, format="json")
    assert patched.status_code == 200 and patched.json()["description"] == "d"
    assert operator_client.delete(f"/api/v1/models/{family_id}/").status_code == 204


def test_upload_detail_download_and_signature(
    operator_client: Any, viewer_client: Any, family: Any, mlp_safetensors: bytes, mlp_onnx: bytes
) -> None:
    response = _upload(
        operator_client,
        family.pk,
        weights=mlp_safetensors,
        onnx=mlp_onnx,
        notes="baseline",
        weights_sha256=hashlib.sha256(mlp_safetensors).hexdigest(),
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["label"] == "digits-mlp:v1" and body["stage"] == "draft"
    kinds = {a["kind"]: a for a in body["artifacts"]}
    assert set(kinds) == {"weights", "onnx"}

    public = viewer_client.get("/api/v1/signing-key/").json()["public_key"]
    for artifact in kinds.values():
        assert verify_digest(artifact["sha256"], artifact["signature"], public)
        assert not verify_digest(hashlib.sha256(b"tampered").hexdigest(), artifact["signature"], public)

    download = viewer_client.get(f"/api/v1/model-versions/{body['id']}/artifacts/onnx/")
    assert download.status_code == 200
    assert b"".join(download.streaming_content) == mlp_onnx
    assert download["ETag"] == f'"{kinds["onnx"]["sha256"]}"'
    assert viewer_client.get(f"/api/v1/model-versions/{body['id']}/artifacts/int8/").status_code == 404

    detail = viewer_client.get(f"/api/v1/model-versions/{body['id']}/").json()
    assert detail["children"] == [] and detail["latest_evaluation"] is None
    listing = viewer_client.get(f"/api/v1/model-versions/?family={family.pk}&stage=draft").json()
    assert [v["id"] for v in listing["results"]] == [body["id"]]
    assert viewer_client.get("/api/v1/model-versions/?stage=production").json()["results"] == []


def test_viewer_cannot_upload(viewer_client: Any, family: Any, mlp_safetensors: bytes) -> None:
    response = _upload(viewer_client, family.pk, weights=mlp_safetensors)
    assert response.status_code == 403
    assert not ModelVersion.objects.exists()


def test_upload_errors_use_the_error_shape(
    operator_client: Any, family: Any, mlp_weights: dict[str, np.ndarray], mlp_safetensors: bytes
) -> None:
    pickled = _upload(operator_client, family.pk, weights=pickle.dumps(mlp_weights, protocol=4))
    assert pickled.status_code == 400
    assert pickled.json()["error"]["code"] == "pickle_rejected"
    mismatch = _upload(operator_client, family.pk, weights=mlp_safetensors, weights_sha256="ab" * 32)
    assert mismatch.status_code == 400 and mismatch.json()["error"]["code"] == "digest_mismatch"
    nothing = _upload(operator_client, family.pk)
    assert nothing.status_code == 400 and nothing.json()["error"]["code"] == "validation_error"
    bad_onnx = _upload(operator_client, family.pk, onnx=b"\x08\x07garbage")
    assert bad_onnx.status_code == 400 and bad_onnx.json()["error"]["code"] == "invalid_onnx"
    assert not ModelVersion.objects.exists() and not Artifact.objects.exists()


def test_oversized_upload_is_413_while_streaming(
    operator_client: Any, family: Any, mlp_safetensors: bytes, settings: Any
) -> None:
    settings.MODEL_UPLOAD_MAX_BYTES = 1000
    response = _upload(operator_client, family.pk, weights=mlp_safetensors)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"
    assert not ModelVersion.objects.exists()


def test_promotion_roles_and_transitions(
    operator_client: Any, admin_client_api: Any, family: Any, mlp_safetensors: bytes
) -> None:
    version_id = _upload(operator_client, family.pk, weights=mlp_safetensors).json()["id"]
    url = f"/api/v1/model-versions/{version_id}/promote/"
    skip = operator_client.post(url, {"stage": "archived"}, format="json")
    assert skip.status_code == 200
    invalid = operator_client.post(url, {"stage": "production"}, format="json")
    assert invalid.status_code == 403  # role is checked before the transition
    invalid = admin_client_api.post(url, {"stage": "production"}, format="json")
    assert invalid.status_code == 409 and invalid.json()["error"]["code"] == "invalid_transition"
    assert operator_client.post(url, {"stage": "staging"}, format="json").status_code == 200
    assert operator_client.post(url, {"stage": "bogus"}, format="json").status_code == 400
    promoted = admin_client_api.post(url, {"stage": "production"}, format="json")
    assert promoted.status_code == 200 and promoted.json()["stage"] == "production"


def test_lineage(operator_client: Any, family: Any, mlp_safetensors: bytes) -> None:
    first = _upload(operator_client, family.pk, weights=mlp_safetensors).json()["id"]
    second = _upload(operator_client, family.pk, weights=mlp_safetensors, parent=str(first)).json()["id"]
    third = _upload(operator_client, family.pk, weights=mlp_safetensors, parent=str(second)).json()["id"]
    lineage = operator_client.get(f"/api/v1/model-versions/{second}/lineage/").json()
    assert [v["id"] for v in lineage["ancestors"]] == [first]
    assert [v["id"] for v in lineage["children"]] == [third]
    deep = operator_client.get(f"/api/v1/model-versions/{third}/lineage/").json()
    assert [v["number"] for v in deep["ancestors"]] == [2, 1]
    detail = operator_client.get(f"/api/v1/model-versions/{second}/").json()
    assert [v["id"] for v in detail["ancestors"]] == [first]
    assert [v["id"] for v in detail["children"]] == [third]


def test_version_list_query_count_does_not_grow(
    viewer_client: Any, family: Any, mlp_safetensors: bytes, django_assert_max_num_queries: Any
) -> None:
    from models_registry.services import version_create

    parent = None
    for _ in range(6):
        parent = version_create(family=family, weights=mlp_safetensors, parent=parent)
    # auth token + user role + count + page + artifacts prefetch, whatever the page size
    with django_assert_max_num_queries(6):
        response = viewer_client.get("/api/v1/model-versions/")
    assert response.json()["count"] == 6


def test_family_with_versions_cannot_be_deleted(
    operator_client: Any, family: Any, mlp_safetensors: bytes
) -> None:
    _upload(operator_client, family.pk, weights=mlp_safetensors)
    response = operator_client.delete(f"/api/v1/models/{family.pk}/")
    assert response.status_code == 409


def test_schema_builds_with_registry_paths(client: Any) -> None:
    from drf_spectacular.generators import SchemaGenerator

    generator = SchemaGenerator()
    schema = generator.get_schema(request=None, public=True)
    paths = schema["paths"]
    for path in (
        "/api/v1/models/",
        "/api/v1/model-versions/",
        "/api/v1/model-versions/{id}/promote/",
        "/api/v1/model-versions/{id}/lineage/",
        "/api/v1/model-versions/{id}/artifacts/{kind}/",
        "/api/v1/signing-key/",
    ):
        assert path in paths, path


def test_large_upload_spooled_to_disk_by_django_is_hashed_in_place(
    operator_client: Any, family: Any, mlp_safetensors: bytes, settings: Any
) -> None:
    # Above this size Django writes the upload to a temporary file; the registry then
    # hashes and validates that file instead of copying it.
    settings.FILE_UPLOAD_MAX_MEMORY_SIZE = 1024
    digest = hashlib.sha256(mlp_safetensors).hexdigest()
    response = _upload(operator_client, family.pk, weights=mlp_safetensors, weights_sha256=digest)
    assert response.status_code == 201, response.content
    assert response.json()["artifacts"][0]["sha256"] == digest
    download = operator_client.get(f"/api/v1/model-versions/{response.json()['id']}/artifacts/weights/")
    assert b"".join(download.streaming_content) == mlp_safetensors


def test_bundle_uploads_and_their_refusals(
    operator_client: Any, family: Any, mlp_bundle: Any, stored_files: Any
) -> None:
    import json

    files = {"weights": mlp_bundle.weights, "onnx": mlp_bundle.onnx}
    guarded = json.dumps({**json.loads(mlp_bundle.program), "guards_code": "x"}).encode()
    for program, code in (
        (pickle.dumps({"graph": 1}), "pickle_rejected"),
        (b"{}", "invalid_program"),
        (guarded, "unsafe_program"),
    ):
        response = _upload(operator_client, family.pk, program=program, **files)
        assert response.status_code == 400 and response.json()["error"]["code"] == code
    assert not ModelVersion.objects.exists() and not Artifact.objects.exists() and stored_files() == set()
    created = _upload(
        operator_client, family.pk, program=mlp_bundle.program, head="fc3.weight,fc3.bias", **files
    )
    assert created.status_code == 201, created.content
    assert created.json()["head"] == ["fc3.weight", "fc3.bias"]
    program = operator_client.get(f"/api/v1/model-versions/{created.json()['id']}/artifacts/program/")
    assert program.status_code == 200 and program["Content-Disposition"].endswith('.json"')
    assert json.loads(b"".join(program.streaming_content))["graph_module"]
