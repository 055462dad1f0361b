"""The federated rounds' device operations in the OpenAPI schema (tag ``device``).

Plain Django views like the fleet's device API, so written here from
:mod:`devices_agent.wire` (``RoundTask``, ``RoundFailure``) and added by the
postprocessing hook :func:`add_round_api` next to :func:`fleet.api.agent_schema.add_device_api`.
"""

from __future__ import annotations

from typing import Any

from core.openapi import error_response
from devices_agent.wire import API_PREFIX
from fleet.api.agent_schema import (
    ANY_OBJECT,
    add_paths,
    binary_answer,
    header,
    integer,
    json_answer,
    json_body,
    obj,
    operation,
    path_id,
    ref,
    string,
)

ROUND_TASK = obj(
    {
        "round_id": {"type": "integer"},
        "job_id": {"type": "integer"},
        "round_number": {"type": "integer"},
        "base_version_id": {"type": "integer"},
        "spec": ref("DeviceFamilySpec"),
        "program": {"allOf": [ref("DeviceArtifactRef")], "nullable": True},
        "trainable": {"type": "array", "items": {"type": "string"}},
        "backends": {"type": "array", "items": {"type": "string"}},
        "ort_training": {"allOf": [ref("DeviceArtifactRef")], "nullable": True},
        "weights_url": {"type": "string"},
        "weights_sha256": {"type": "string"},
        "weights_size": {"type": "integer"},
        "update_url": {"type": "string"},
        "failure_url": {"type": "string"},
        "deadline": {"type": "string", "nullable": True},
        "seed": {"type": "integer"},
        "train": ANY_OBJECT,
        "clip_norm": {"type": "number", "nullable": True},
        "codec": {"type": "string"},
        "topk_fraction": {"type": "number"},
        "max_update_bytes": {"type": "integer"},
    },
    ["round_id", "job_id", "round_number", "weights_url", "update_url"],
)

SCHEMAS: dict[str, dict[str, Any]] = {
    "DeviceRoundTask": ROUND_TASK,
    "DeviceRoundsOpen": obj(
        {
            "tasks": {
                "type": "array",
                "items": {"allOf": [ref("DeviceTrainingTask"), obj({"config": ref("DeviceRoundTask")})]},
            }
        },
        ["tasks"],
    ),
    "DeviceRoundUpdateResponse": obj(
        {
            "id": {"type": "integer"},
            "status": {"type": "string"},
            "duplicate": {"type": "boolean"},
            "norm": {"type": "number", "nullable": True},
        },
        ["id", "status", "duplicate"],
    ),
    "DeviceRoundEvaluationRequest": obj(
        {"metrics": obj({}, additionalProperties={"type": "number"})}, ["metrics"]
    ),
    "DeviceRoundEvaluationResponse": obj(
        {"id": {"type": "integer"}, "duplicate": {"type": "boolean"}}, ["id", "duplicate"]
    ),
    "DeviceRoundFailureRequest": obj(
        {
            "code": string(40, 1, pattern=r"^[a-z][a-z0-9_]*$"),
            "message": string(2000, 1, pattern=r"\S"),
            "backend": {"type": "string"},
        },
        ["code", "message"],
    ),
    "DeviceRoundFailureResponse": obj(
        {"id": {"type": "integer"}, "status": {"type": "string"}, "duplicate": {"type": "boolean"}},
        ["id", "status", "duplicate"],
    ),
}

NOT_SELECTED = error_response("403", "`not_selected`: the device is not in the round.")
CLOSED = error_response("409", "`round_closed` (not collecting) or `duplicate_update`.")
ROUND = [path_id("round_id")]


def _paths() -> dict[str, dict[str, Any]]:
    p = f"{API_PREFIX}rounds/"
    return {
        p: {
            "get": operation(
                "device_rounds_open",
                "The device's open training tasks; with `wait` a long poll (at most 30 s).",
                {"200": json_answer("Open tasks, each with its round task.", ref("DeviceRoundsOpen"))},
                parameters=[
                    {
                        "name": "wait",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "number", "minimum": 0},
                        "description": "Seconds to wait for a task (more than 30 count as 30).",
                    }
                ],
            )
        },
        f"{p}{{round_id}}/task": {
            "get": operation(
                "device_round_task",
                "What a selected device needs to train for the round.",
                {"200": json_answer("The round task.", ref("DeviceRoundTask")), "403": NOT_SELECTED},
                parameters=ROUND,
            )
        },
        f"{p}{{round_id}}/weights": {
            "get": operation(
                "device_round_weights",
                "The round's global weights (safetensors bytes).",
                {
                    "200": binary_answer("safetensors bytes.", {"ETag": header("Their SHA-256, quoted.")}),
                    "304": {"description": "`If-None-Match` names these weights."},
                    "403": NOT_SELECTED,
                },
                parameters=[
                    *ROUND,
                    {
                        "name": "If-None-Match",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                ],
            )
        },
        f"{p}{{round_id}}/update": {
            "post": operation(
                "device_round_update",
                "Upload the device's encoded delta (safetensors bytes).",
                {
                    "200": json_answer(
                        "The same bytes were already accepted.", ref("DeviceRoundUpdateResponse")
                    ),
                    "201": json_answer("Stored.", ref("DeviceRoundUpdateResponse")),
                    "403": NOT_SELECTED,
                    "409": CLOSED,
                    "422": error_response(
                        "422", "`norm_too_large`: the delta's norm is past the job's bound."
                    ),
                },
                body={
                    "required": True,
                    "content": {
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                    },
                },
                parameters=[
                    *ROUND,
                    {"name": "X-Num-Examples", "in": "header", "required": False, "schema": integer()},
                    {"name": "X-Metrics", "in": "header", "required": False, "schema": {"type": "string"}},
                    {"name": "X-Backend", "in": "header", "required": False, "schema": {"type": "string"}},
                ],
            )
        },
        f"{p}{{round_id}}/evaluation": {
            "post": operation(
                "device_round_evaluation",
                "A board's holdout numbers for an evaluation round.",
                {
                    "200": json_answer("The same numbers again.", ref("DeviceRoundEvaluationResponse")),
                    "201": json_answer("Stored.", ref("DeviceRoundEvaluationResponse")),
                    "403": NOT_SELECTED,
                    "409": CLOSED,
                },
                body=json_body(ref("DeviceRoundEvaluationRequest")),
                parameters=ROUND,
            )
        },
        f"{p}{{round_id}}/failure": {
            "post": operation(
                "device_round_failure",
                "Why the device cannot take part; the round stops waiting for it.",
                {
                    "200": json_answer("The same report again.", ref("DeviceRoundFailureResponse")),
                    "201": json_answer("Recorded.", ref("DeviceRoundFailureResponse")),
                    "403": NOT_SELECTED,
                    "409": CLOSED,
                },
                body=json_body(ref("DeviceRoundFailureRequest")),
                parameters=ROUND,
            )
        },
    }


def add_round_api(result: dict[str, Any], **_: Any) -> dict[str, Any]:
    """Postprocessing hook: the rounds' device operations."""
    add_paths(result, _paths(), SCHEMAS)
    return result
