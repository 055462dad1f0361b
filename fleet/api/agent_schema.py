"""The device API (`/api/agent/v1/`) in the OpenAPI schema.

The device views are plain Django views (see :mod:`fleet.api.agent_views`), which
drf-spectacular cannot see; their operations are written here, from the message shapes of
:mod:`devices_agent.wire`, and added by the postprocessing hook :func:`add_device_api`
under the tag ``device`` with the ``deviceAuth`` scheme of :mod:`fleet.auth`. The
training app adds its rounds the same way (``training.api.agent_schema``). The error
answers every operation shares are added afterwards by :func:`core.openapi.add_error_responses`.
"""

from __future__ import annotations

from typing import Any

from core.openapi import error_response
from devices_agent.wire import (
    API_PREFIX,
    AUTH_SCHEME,
    DEPLOYMENT_STATES,
    DRIFT_CONFIDENCE_BINS,
    DRIFT_MAX_FEATURES,
    MAX_BATCH_ID_LENGTH,
    MAX_METRIC_SAMPLES_PER_BATCH,
    METRIC_NAMES,
    TRAINING_BACKENDS,
)

TAG = "device"
SECURITY_SCHEME = "deviceAuth"
DEVICE_SECURITY: list[dict[str, list[str]]] = [{SECURITY_SCHEME: []}]
# The largest id or counter the device API takes (the views refuse anything above).
MAX_INT = 2**62

SECURITY_SCHEME_OBJECT = {
    "type": "apiKey",
    "in": "header",
    "name": "Authorization",
    "description": (
        f"`Authorization: {AUTH_SCHEME} <secret>`: the secret `POST enroll` answered once. The "
        "server keeps only an HMAC-SHA256 of it and checks it before reading any body; a "
        "decommissioned device's secret is refused (401)."
    ),
}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = required
    return schema


def integer(minimum: int = 0, **extra: Any) -> dict[str, Any]:
    return {"type": "integer", "minimum": minimum, "maximum": MAX_INT, **extra}


def string(max_length: int, min_length: int = 0, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "minLength": min_length, "maxLength": max_length, **extra}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


TIMESTAMP = string(40, 1, format="date-time", description="ISO 8601 with a time zone.")
BACKENDS = {"type": "array", "items": {"type": "string", "enum": list(TRAINING_BACKENDS)}, "maxItems": 8}
ANY_OBJECT: dict[str, Any] = {"type": "object", "additionalProperties": True}


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def json_answer(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def binary_answer(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
    if headers:
        answer["headers"] = headers
    return answer


def header(description: str) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string"}}


def path_id(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": integer(1)}


def operation(
    operation_id: str,
    summary: str,
    responses: dict[str, Any],
    *,
    body: dict[str, Any] | None = None,
    parameters: list[dict[str, Any]] | None = None,
    secured: bool = True,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "tags": [TAG],
        "security": DEVICE_SECURITY if secured else [],
        "responses": responses,
    }
    if body is not None:
        op["requestBody"] = body
    if parameters:
        op["parameters"] = parameters
    return op


# --- message shapes (devices_agent.wire) -------------------------------------------------

ARTIFACT_REF = obj(
    {
        "kind": {"type": "string"},
        "url": {"type": "string"},
        "sha256": {"type": "string"},
        "size": {"type": "integer"},
        "signature": {"type": "string", "description": "base64 Ed25519 signature of the digest"},
    },
    ["kind", "url", "sha256", "size", "signature"],
)
FAMILY_SPEC = obj(
    {
        "task": {"type": "string", "enum": ["classification", "regression"]},
        "input_shape": {"type": "array", "items": {"type": "integer"}},
        "input_dtype": {"type": "string"},
        "num_classes": {"type": "integer"},
        "output_size": {"type": "integer"},
    },
    ["task", "input_shape", "input_dtype"],
)

SCHEMAS: dict[str, dict[str, Any]] = {
    "DeviceArtifactRef": ARTIFACT_REF,
    "DeviceFamilySpec": FAMILY_SPEC,
    "DeviceHardware": obj(
        {
            "arch": string(50),
            "cores": integer(),
            "ram_mb": integer(),
            "accelerator": string(100),
            "os": string(150),
            "agent_version": string(50),
            "python": string(20),
            "training_backends": BACKENDS,
            "extra": ANY_OBJECT,
        }
    ),
    "DeviceEnrollRequest": obj(
        {
            "token": string(200, 1),
            "name": string(150, 1, pattern=r"\S"),
            "hardware": ref("DeviceHardware"),
            "tags": {
                "type": "array",
                "items": string(64, 1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:=/-]{0,63}$"),
                "maxItems": 50,
            },
        },
        ["token", "name", "hardware"],
    ),
    "DeviceEnrollResponse": obj(
        {
            "device_id": {"type": "string"},
            "secret": {"type": "string", "description": "Shown once; send it as `Device <secret>`."},
            "signing_public_key": {"type": "string", "description": "base64 raw Ed25519 key to pin"},
            "heartbeat_interval_s": {"type": "integer"},
            "server_time": {"type": "string", "format": "date-time"},
        },
        ["device_id", "secret", "signing_public_key", "heartbeat_interval_s", "server_time"],
    ),
    "DeviceHeartbeatRequest": obj(
        {
            "seq": nullable(integer()),
            "sent_at": nullable(TIMESTAMP),
            "agent_version": nullable(string(50)),
            "running_version_id": nullable(integer()),
            "policy_etag": nullable(string(64)),
            "desired_etag": nullable(string(64)),
            "deployment": nullable(
                obj(
                    {"id": integer(1), "state": {"type": "string", "enum": list(DEPLOYMENT_STATES)}},
                    ["id", "state"],
                )
            ),
            "state": nullable(
                obj(
                    {
                        "charging": {"type": "boolean"},
                        "idle": {"type": "boolean"},
                        "battery_percent": {"type": "number"},
                        "local_examples": integer(),
                        "holdout_examples": integer(),
                        "training_backends": BACKENDS,
                        "cpu_percent": {"type": "number"},
                        "ram_mb": {"type": "number"},
                        "disk_free_mb": {"type": "number"},
                    },
                    description="Board facts; other plain-named keys carry a string, a boolean or a number.",
                )
            ),
        }
    ),
    "DeviceHeartbeatResponse": obj(
        {
            "device_id": {"type": "string"},
            "server_time": {"type": "string", "format": "date-time"},
            "heartbeat_interval_s": {"type": "integer"},
            "desired": nullable(
                obj(
                    {
                        "version_id": {"type": "integer"},
                        "label": {"type": "string"},
                        "family": {"type": "string"},
                        "deployment_id": {"type": "integer", "nullable": True},
                        "artifact": ref("DeviceArtifactRef"),
                        "weights": {"allOf": [ref("DeviceArtifactRef")], "nullable": True},
                        "spec": ref("DeviceFamilySpec"),
                        "program": {"allOf": [ref("DeviceArtifactRef")], "nullable": True},
                        "head": {"type": "array", "items": {"type": "string"}},
                    },
                    ["version_id", "label", "family", "deployment_id", "artifact", "weights"],
                )
            ),
            "desired_etag": {"type": "string"},
            "policy": nullable(ANY_OBJECT),
            "policy_etag": {"type": "string"},
            "in_window": {"type": "boolean"},
            "tasks": {"type": "array", "items": ref("DeviceTrainingTask")},
            "commands": {
                "type": "array",
                "items": obj(
                    {"id": {"type": "integer"}, "kind": {"type": "string"}, "args": ANY_OBJECT},
                    ["id", "kind", "args"],
                ),
            },
        },
        ["device_id", "server_time", "heartbeat_interval_s"],
    ),
    "DeviceTrainingTask": obj(
        {
            "kind": {"type": "string", "enum": ["train"]},
            "round_id": {"type": "integer"},
            "task_url": {"type": "string"},
            "deadline": {"type": "string", "nullable": True},
        },
        ["kind", "round_id", "task_url"],
    ),
    "DeviceMetricsRequest": obj(
        {
            "batch_id": string(MAX_BATCH_ID_LENGTH, 1, description="Idempotency key."),
            "samples": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_METRIC_SAMPLES_PER_BATCH,
                "items": obj(
                    {
                        "name": {"type": "string", "enum": sorted(METRIC_NAMES)},
                        "value": {"type": "number", "description": "Within wire.METRIC_RANGES[name]."},
                        "ts": TIMESTAMP,
                        "version_id": nullable(integer(1)),
                    },
                    ["name", "value", "ts"],
                ),
            },
        },
        ["batch_id", "samples"],
    ),
    "DeviceMetricsResponse": obj(
        {"accepted": {"type": "integer"}, "duplicate": {"type": "boolean"}}, ["accepted", "duplicate"]
    ),
    "DeviceDriftSketch": obj(
        {
            "count": integer(),
            "mean": {
                "type": "array",
                "items": {"type": "number"},
                "minItems": 1,
                "maxItems": DRIFT_MAX_FEATURES,
            },
            "m2": {
                "type": "array",
                "items": {"type": "number", "minimum": 0},
                "minItems": 1,
                "maxItems": DRIFT_MAX_FEATURES,
                "description": "As long as `mean`.",
            },
            "confidence_hist": {
                "type": "array",
                "items": integer(),
                "minItems": DRIFT_CONFIDENCE_BINS,
                "maxItems": DRIFT_CONFIDENCE_BINS,
            },
            "version_id": nullable(integer(1)),
            "window_start": nullable(TIMESTAMP),
            "window_end": nullable(TIMESTAMP),
        },
        ["count", "mean", "m2", "confidence_hist"],
    ),
    "DeviceDriftResponse": obj(
        {
            "id": {"type": "integer"},
            "alert": {"type": "boolean"},
            "score": {"type": "number", "nullable": True},
            "z_max": {"type": "number", "nullable": True},
            "effect_size": {"type": "number", "nullable": True},
            "feature_psi": {"type": "number", "nullable": True},
            "psi_band": {"type": "string", "nullable": True, "enum": ["none", "moderate", "major", None]},
            "baseline_score": {"type": "number", "nullable": True},
            "baseline_effect_size": {"type": "number", "nullable": True},
            "baseline_feature_psi": {"type": "number", "nullable": True},
            "feature_bins": ANY_OBJECT,
        },
        ["id", "alert", "score"],
    ),
    "DeviceDeploymentStatusRequest": obj(
        {
            "state": {"type": "string", "enum": list(DEPLOYMENT_STATES)},
            "message": string(4000),
            "detail": nullable(ANY_OBJECT),
            "reported_at": nullable(TIMESTAMP),
        },
        ["state"],
    ),
    "DeviceDeploymentStatusResponse": obj(
        {"id": {"type": "integer"}, "state": {"type": "string"}}, ["id", "state"]
    ),
    "DeviceCommandResultRequest": obj({"ok": {"type": "boolean"}, "result": ANY_OBJECT}, ["ok", "result"]),
    "DeviceCommandResultResponse": obj(
        {"id": {"type": "integer"}, "status": {"type": "string"}}, ["id", "status"]
    ),
}


def _paths() -> dict[str, dict[str, Any]]:
    p = API_PREFIX
    return {
        f"{p}enroll": {
            "post": operation(
                "device_enroll",
                "Enroll a board with a token; answers its secret (once) and the signing key to pin.",
                {
                    "200": json_answer("Enrolled.", ref("DeviceEnrollResponse")),
                    "401": error_response("401", "`token_invalid` or `token_expired`."),
                    "403": error_response("403", "`token_revoked`, `token_exhausted` or `tags_not_allowed`."),
                },
                body=json_body(ref("DeviceEnrollRequest")),
                secured=False,
            )
        },
        f"{p}heartbeat": {
            "post": operation(
                "device_heartbeat",
                "Report the board's state; answers its desired state (model, policy, tasks, commands).",
                {"200": json_answer("The desired state.", ref("DeviceHeartbeatResponse"))},
                body=json_body(ref("DeviceHeartbeatRequest")),
            )
        },
        f"{p}metrics": {
            "post": operation(
                "device_metrics",
                "Send a batch of metric samples (stored once per batch_id).",
                {
                    "200": json_answer(
                        "Stored, or a repeat of a stored batch.", ref("DeviceMetricsResponse")
                    ),
                    "429": error_response("429", "`rate_limited`: over the samples allowed an hour."),
                },
                body=json_body(ref("DeviceMetricsRequest")),
            )
        },
        f"{p}drift": {
            "post": operation(
                "device_drift",
                "Send a drift sketch of the inputs the board saw in a window.",
                {"200": json_answer("Stored and scored.", ref("DeviceDriftResponse"))},
                body=json_body(ref("DeviceDriftSketch")),
            )
        },
        f"{p}artifacts/{{sha256}}": {
            "get": operation(
                "device_artifact",
                "Download an artifact of the board's versions (binary; resumable with Range).",
                {
                    "200": binary_answer(
                        "The artifact's bytes.",
                        {"ETag": header("The SHA-256, quoted."), "Accept-Ranges": header("`bytes`.")},
                    ),
                    "206": binary_answer(
                        "The requested range.", {"Content-Range": header("`bytes first-last/size`.")}
                    ),
                    "304": {"description": "`If-None-Match` names this artifact."},
                    "404": error_response("404", "Not an artifact of this device's versions or rounds."),
                    "416": error_response("416"),
                },
                parameters=[
                    {"name": "sha256", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "Range", "in": "header", "required": False, "schema": {"type": "string"}},
                    {
                        "name": "If-None-Match",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                ],
            )
        },
        f"{p}deployments/{{deployment_id}}/status": {
            "post": operation(
                "device_deployment_status",
                "Report a deployment's state (downloading … active, failed, rolled_back).",
                {
                    "200": json_answer("The deployment's state.", ref("DeviceDeploymentStatusResponse")),
                    "409": error_response("409", "`deployment_closed`: it already reached a final state."),
                },
                body=json_body(ref("DeviceDeploymentStatusRequest")),
                parameters=[path_id("deployment_id")],
            )
        },
        f"{p}commands/{{command_id}}/result": {
            "post": operation(
                "device_command_result",
                "Answer a command (the first answer counts).",
                {"200": json_answer("The command's status.", ref("DeviceCommandResultResponse"))},
                body=json_body(ref("DeviceCommandResultRequest")),
                parameters=[path_id("command_id")],
            )
        },
    }


def add_paths(result: dict[str, Any], paths: dict[str, Any], schemas: dict[str, Any]) -> None:
    """Merge device operations and their components into a built schema."""
    components = result.setdefault("components", {})
    components.setdefault("securitySchemes", {})[SECURITY_SCHEME] = SECURITY_SCHEME_OBJECT
    components.setdefault("schemas", {}).update(schemas)
    result.setdefault("paths", {}).update(paths)
    tags = result.setdefault("tags", [])
    if not any(t.get("name") == TAG for t in tags):
        tags.append(
            {"name": TAG, "description": f"The device API ({API_PREFIX}), for the agent on each board."}
        )


def add_device_api(result: dict[str, Any], **_: Any) -> dict[str, Any]:
    """Postprocessing hook: the fleet's device operations."""
    add_paths(result, _paths(), SCHEMAS)
    return result
