"""The device API (`/api/agent/v1/`), as plain Django views.

These views skip DRF on purpose: the heartbeat is the busiest endpoint of the system and
DRF's request wrapping, negotiation and parser machinery cost more than the work itself.
Authentication is `fleet.auth.device_endpoint` (`Authorization: Device <secret>`, one
indexed lookup of the keyed hash, before any body is read), shared with the training
rounds' views, and every error leaves in the one error shape. Message shapes are
`devices_agent.wire`; bodies are validated here, by hand, before any service runs, so a
bad request never writes anything.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.files.storage import default_storage
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from core.api import ServiceError, error_response
from devices_agent.wire import (
    DEPLOYMENT_STATES,
    MAX_BATCH_ID_LENGTH,
    MAX_METRIC_SAMPLES_PER_BATCH,
    METRIC_NAMES,
    METRIC_RANGES,
    TRAINING_BACKENDS,
)
from fleet.auth import device_endpoint, seen_buffered
from fleet.models import Device
from fleet.selectors.shadows import shadow_artifact
from fleet.services.commands import device_command_record_result
from fleet.services.deployments import deployment_record_status
from fleet.services.devices import tags_validate
from fleet.services.enrollment import device_enroll
from fleet.services.heartbeat import device_heartbeat
from fleet.services.metrics import Sample, metrics_ingest

# Metrics may be queued offline for a long time, but not come from the future; a little
# slack absorbs boards whose clocks drift.
MAX_FUTURE_SKEW = timedelta(hours=1)
MAX_STATE_BYTES = 8192


def _invalid(message: str, field: str | None = None) -> ServiceError:
    return ServiceError(message, code="validation_error", details={"field": field} if field else {})


# --- small validators ------------------------------------------------------------------


def _str(
    body: dict[str, Any], key: str, *, max_length: int, required: bool = True, min_length: int = 0
) -> str:
    value = body.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise _invalid(f"{key} must be a string.", key)
    if not min_length <= len(value) <= max_length:
        raise _invalid(f"{key} must be {min_length}..{max_length} characters.", key)
    return value


def _int(value: Any, key: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or value > 2**62:
        raise _invalid(f"{key} must be an integer >= {minimum}.", key)
    return value


def _finite(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(f"{key} must be a finite number.", key)
    return float(value)


def _dict(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(f"{key} must be an object.", key)
    return value


def _timestamp(value: Any, key: str) -> datetime:
    if not isinstance(value, str) or len(value) > 40:
        raise _invalid(f"{key} must be an ISO 8601 time with a zone.", key)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise _invalid(f"{key} must be an ISO 8601 time with a zone.", key) from exc
    if parsed.tzinfo is None:
        raise _invalid(f"{key} must carry a time zone.", key)
    return parsed


_HARDWARE_STR = {"arch": 50, "accelerator": 100, "os": 150, "agent_version": 50}
_HARDWARE_INT = ("cores", "ram_mb")
_STATE_BOOL = ("charging", "idle")
_STATE_INT = ("local_examples", "holdout_examples")
_STATE_NUMBER = ("battery_percent", "cpu_percent", "ram_mb", "disk_free_mb")
_STATE_KEY = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


def _hardware(value: Any) -> dict[str, Any]:
    hardware = _dict(value, "hardware")
    clean: dict[str, Any] = {}
    for key, limit in _HARDWARE_STR.items():
        if key in hardware:
            clean[key] = _str(hardware, key, max_length=limit)
    for key in _HARDWARE_INT:
        if hardware.get(key) is not None:
            clean[key] = _int(hardware[key], f"hardware.{key}")
    if "extra" in hardware:
        clean["extra"] = _dict(hardware["extra"], "hardware.extra")
    if hardware.get("training_backends") is not None:
        clean["training_backends"] = _backends(hardware["training_backends"], "hardware.training_backends")
    if hardware.get("python") is not None:
        clean["python"] = _str(hardware, "python", max_length=20)
    return clean


def _backends(value: Any, key: str) -> list[str]:
    """A board's training backends: a short list of known names."""
    if not isinstance(value, list) or len(value) > 8 or not all(v in TRAINING_BACKENDS for v in value):
        raise _invalid(f"{key} must be a list of {', '.join(TRAINING_BACKENDS)}.", key)
    return sorted(set(value))


def _device_state(value: Any) -> dict[str, Any]:
    state = _dict(value, "state")
    clean: dict[str, Any] = {}
    for key, item in state.items():
        if not isinstance(key, str) or not _STATE_KEY.match(key):
            raise _invalid(f"state key {key!r} is not a plain name.", "state")
        if key in _STATE_BOOL:
            if not isinstance(item, bool):
                raise _invalid(f"state.{key} must be true or false.", f"state.{key}")
            clean[key] = item
        elif key in _STATE_INT:
            clean[key] = _int(item, f"state.{key}")
        elif key in _STATE_NUMBER:
            clean[key] = _finite(item, f"state.{key}")
        elif key == "training_backends":
            clean[key] = _backends(item, f"state.{key}")
        elif item is None or isinstance(item, bool | str):
            clean[key] = item
        else:
            clean[key] = _finite(item, f"state.{key}")
    if len(json.dumps(clean)) > MAX_STATE_BYTES:
        raise _invalid(f"state is larger than {MAX_STATE_BYTES} bytes.", "state")
    return clean


# --- views -----------------------------------------------------------------------------


@device_endpoint(auth=False)
def enroll(request: HttpRequest, device: None, body: dict[str, Any]) -> dict[str, Any]:
    """`POST enroll`: EnrollRequest -> EnrollResponse."""
    from models_registry.selectors import signing_public_key_b64

    token = _str(body, "token", max_length=200, min_length=1)
    name = _str(body, "name", max_length=150, min_length=1).strip()
    if not name:
        raise _invalid("name must not be blank.", "name")
    hardware = _hardware(body.get("hardware"))
    tags = tags_validate(tags=body["tags"]) if body.get("tags") is not None else []
    new_device, secret = device_enroll(token=token, name=name, hardware=hardware, tags=tags)
    return {
        "device_id": str(new_device.pk),
        "secret": secret,
        "signing_public_key": signing_public_key_b64(),
        "heartbeat_interval_s": settings.HEARTBEAT_INTERVAL_S,
        "server_time": timezone.now().isoformat(),
    }


@device_endpoint(liveness=True)
def heartbeat(request: HttpRequest, device: Device, body: dict[str, Any]) -> dict[str, Any]:
    """`POST heartbeat`: HeartbeatRequest -> HeartbeatResponse."""
    report = _heartbeat_report(body)
    return dict(device_heartbeat(device=device, report=report, seen_buffered=seen_buffered(request)))


def _heartbeat_report(body: dict[str, Any]) -> dict[str, Any]:
    report: dict[str, Any] = {}
    if body.get("seq") is not None:
        report["seq"] = _int(body["seq"], "seq")
    if body.get("agent_version") is not None:
        report["agent_version"] = _str(body, "agent_version", max_length=50)
    if body.get("running_version_id") is not None:
        report["running_version_id"] = _int(body["running_version_id"], "running_version_id")
    if body.get("policy_etag") is not None:
        report["policy_etag"] = _str(body, "policy_etag", max_length=64)
    if body.get("desired_etag") is not None:
        report["desired_etag"] = _str(body, "desired_etag", max_length=64)
    if body.get("sent_at") is not None:
        _timestamp(body["sent_at"], "sent_at")
    if body.get("deployment") is not None:
        deployment = _dict(body["deployment"], "deployment")
        state = deployment.get("state")
        if state not in DEPLOYMENT_STATES:
            raise _invalid(
                f"deployment.state must be one of {', '.join(DEPLOYMENT_STATES)}.", "deployment.state"
            )
        report["deployment"] = {"id": _int(deployment.get("id"), "deployment.id", minimum=1), "state": state}
    if body.get("state") is not None:
        report["state"] = _device_state(body["state"])
    return report


@device_endpoint()
def metrics(request: HttpRequest, device: Device, body: dict[str, Any]) -> dict[str, Any]:
    """`POST metrics`: MetricsRequest -> MetricsResponse (idempotent by batch_id)."""
    batch_id = _str(body, "batch_id", max_length=MAX_BATCH_ID_LENGTH, min_length=1)
    raw = body.get("samples")
    if not isinstance(raw, list):
        raise _invalid("samples must be a list.", "samples")
    if not 1 <= len(raw) <= MAX_METRIC_SAMPLES_PER_BATCH:
        raise _invalid(f"samples must hold 1..{MAX_METRIC_SAMPLES_PER_BATCH} items.", "samples")
    latest = timezone.now() + MAX_FUTURE_SKEW
    samples: list[Sample] = []
    for index, item in enumerate(raw):
        where = f"samples[{index}]"
        item = _dict(item, where)
        name = item.get("name")
        if name not in METRIC_NAMES:
            raise _invalid(f"{where}.name {name!r} is not a known metric.", f"{where}.name")
        ts = _timestamp(item.get("ts"), f"{where}.ts")
        if ts > latest:
            raise _invalid(f"{where}.ts is in the future.", f"{where}.ts")
        version_id = item.get("version_id")
        value = _finite(item.get("value"), f"{where}.value")
        low, high, whole = METRIC_RANGES[name]
        if not low <= value <= high or (whole and value != int(value)):
            kind = "a whole number " if whole else ""
            raise ServiceError(
                f"{where}.value {value!r}: {name} must be {kind}in [{low:g}, {high:g}].",
                code="metric_out_of_range",
                details={"field": f"{where}.value", "metric": name, "min": low, "max": high},
            )
        samples.append(
            Sample(
                name=name,
                value=value,
                ts=ts,
                version_id=None if version_id is None else _int(version_id, f"{where}.version_id", minimum=1),
            )
        )
    accepted, duplicate = metrics_ingest(device=device, batch_id=batch_id, samples=samples)
    return {"accepted": accepted, "duplicate": duplicate}


@device_endpoint()
def deployment_status(
    request: HttpRequest, device: Device, body: dict[str, Any], deployment_id: int
) -> dict[str, Any]:
    """`POST deployments/<id>/status`: DeploymentStatusRequest -> the deployment's state."""
    state = body.get("state")
    if state not in DEPLOYMENT_STATES:
        raise _invalid(f"state must be one of {', '.join(DEPLOYMENT_STATES)}.", "state")
    message = _str(body, "message", max_length=4000, required=False)
    detail = _dict(body["detail"], "detail") if body.get("detail") is not None else None
    reported_at = (
        _timestamp(body["reported_at"], "reported_at") if body.get("reported_at") is not None else None
    )
    deployment = deployment_record_status(
        device=device,
        deployment_id=deployment_id,
        state=state,
        message=message,
        detail=detail,
        reported_at=reported_at,
    )
    return {"id": deployment.pk, "state": deployment.state}


@device_endpoint()
def command_result(
    request: HttpRequest, device: Device, body: dict[str, Any], command_id: int
) -> dict[str, Any]:
    """`POST commands/<id>/result`: CommandResultRequest -> the command's status."""
    ok = body.get("ok")
    if not isinstance(ok, bool):
        raise _invalid("ok must be true or false.", "ok")
    result = _dict(body.get("result"), "result")
    command = device_command_record_result(device=device, command_id=command_id, ok=ok, result=result)
    return {"id": command.pk, "status": command.status}


# --- artifacts -------------------------------------------------------------------------

ArtifactEntitlement = Callable[[Device, str], "tuple[str, int] | None"]
_entitlements: list[ArtifactEntitlement] = []
CHUNK_BYTES = 64 * 1024


def register_artifact_entitlement(provider: ArtifactEntitlement) -> ArtifactEntitlement:
    """Let `provider(device, sha256) -> (storage name, size) | None` grant downloads.

    By default a device may fetch the artifacts of its desired, running and previous
    versions and the ONNX graph of the version it runs in shadow; the training app adds
    round weights through this hook.
    """
    if provider not in _entitlements:
        _entitlements.append(provider)
    return provider


def _version_artifact(device: Device, sha256: str) -> tuple[str, int] | None:
    from models_registry.models import Artifact

    versions = [
        v for v in (device.desired_version_id, device.running_version_id, device.previous_version_id) if v
    ]
    if not versions:
        return None
    found = (
        Artifact.objects.filter(sha256=sha256, version_id__in=versions).values_list("file", "size").first()
    )
    return (str(found[0]), int(found[1])) if found else None


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _byte_range(header: str, size: int) -> tuple[int, int] | None | bool:
    """(first, last) for a satisfiable single range, None to send everything, False if unsatisfiable."""
    match = _RANGE.match(header.strip())
    if match is None:
        return None  # absent, malformed or multi-range: RFC 9110 lets us send the whole file
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            return False
        return max(0, size - suffix), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        return False
    return start, end


def _stream(name: str, start: int, length: int) -> Iterator[bytes]:
    with default_storage.open(name, "rb") as handle:
        handle.seek(start)
        remaining = length
        while remaining > 0:
            chunk = handle.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk


@device_endpoint(methods=("GET", "HEAD"))
def artifact(
    request: HttpRequest, device: Device, body: None, sha256: str
) -> HttpResponse | StreamingHttpResponse:
    """`GET artifacts/<sha256>`: the file, with ETag, Range (single) and If-None-Match."""
    found = _version_artifact(device, sha256) or shadow_artifact(device=device, sha256=sha256)
    for provider in _entitlements:
        if found is not None:
            break
        found = provider(device, sha256)
    if found is None:
        raise ServiceError("No such artifact for this device.", code="not_found", status_code=404)
    name, size = found
    etag = f'"{sha256}"'
    if_none_match = request.META.get("HTTP_IF_NONE_MATCH", "")
    if if_none_match:
        tags = {t.strip().removeprefix("W/").strip('"') for t in if_none_match.split(",")}
        if sha256 in tags or "*" in tags:
            not_modified = HttpResponse(status=304)
            not_modified["ETag"] = etag
            return not_modified
    wanted = _byte_range(request.META.get("HTTP_RANGE", ""), size)
    if wanted is False:
        unsatisfiable = error_response(
            status_code=416, code="range_not_satisfiable", message="Range not satisfiable."
        )
        unsatisfiable["Content-Range"] = f"bytes */{size}"
        return unsatisfiable
    first, last = wanted if isinstance(wanted, tuple) else (0, size - 1)
    length = max(0, last - first + 1)
    stream = _stream(name, first, length) if request.method == "GET" else iter(())
    response = StreamingHttpResponse(stream, content_type="application/octet-stream")
    if isinstance(wanted, tuple):
        response.status_code = 206
        response["Content-Range"] = f"bytes {first}-{last}/{size}"
    response["Content-Length"] = str(length)
    response["ETag"] = etag
    response["Accept-Ranges"] = "bytes"
    response["Cache-Control"] = "private, no-transform"
    return response


def bench_bare(request: HttpRequest) -> JsonResponse:
    """A bare JSON view: the baseline the heartbeat benchmark measures against."""
    return JsonResponse({"ok": True, "server_time": timezone.now().isoformat()})


bench_bare = csrf_exempt(bench_bare)


@device_endpoint(liveness=True)
def bench_heartbeat_core(request: HttpRequest, device: Device, body: dict[str, Any]) -> dict[str, Any]:
    """The heartbeat without other apps' task providers: what the fleet core alone costs."""
    report = _heartbeat_report(body)
    return dict(
        device_heartbeat(device=device, report=report, with_tasks=False, seen_buffered=seen_buffered(request))
    )
