"""Device API of federated rounds: open tasks (long poll), the round task, global weights,
updates, and the failures devices report.

Plain Django views, like the fleet's device API: every device calls these every round,
and DRF's request wrapping, negotiation and parsers cost more than the work. Devices
authenticate through the same path as every device view (``fleet.auth``), and every error
leaves in the one error shape.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from core.api import ServiceError, error_response
from fleet.auth import authenticate_limited, device_endpoint, requires_device
from fleet.auth import error as auth_error
from fleet.models import Device
from training import notify, selectors, services

MAX_WAIT_S = 30.0


def _tasks_with_config(device: Device) -> list[dict[str, Any]]:
    """The device's tasks, each with its round's task body under ``config``, which saves
    every device a ``GET rounds/<id>/task`` per round."""
    out: list[dict[str, Any]] = []
    for task in selectors.training_tasks_for_device(device):
        # training_tasks_for_device lists only collecting rounds that selected the device.
        config = selectors.collecting_round_task(round_id=task["round_id"], deadline=task["deadline"])
        if config is None:
            continue  # closed between the two reads
        out.append({**task, "config": config})
    return out


@requires_device
@csrf_exempt
async def rounds_open(request: HttpRequest) -> HttpResponseBase:
    """``GET rounds/?wait=<s>``: the calling device's open training tasks.

    The same list the heartbeat carries, each task with the body of its
    ``rounds/<id>/task`` under ``config``. With ``wait`` (at most 30 s) the request is a
    long poll: when the device has no task it is answered as soon as a round opens, or
    with an empty list at the timeout. An async view, so waiting devices hold no worker
    thread; the wake-up comes over Redis pub/sub (see :mod:`training.notify`).
    """
    if request.method != "GET":
        return error_response(status_code=405, code="method_not_allowed", message="Use GET.")
    try:
        device = await sync_to_async(authenticate_limited)(request)
    except ServiceError as exc:
        return auth_error(exc)
    try:
        wait = float(request.GET.get("wait", "0") or 0)
    except ValueError:
        wait = -1.0
    if not math.isfinite(wait) or wait < 0:
        return error_response(
            status_code=400, code="validation_error", message="wait must be a number of seconds >= 0."
        )
    wait = min(MAX_WAIT_S, wait)
    tasks_of = sync_to_async(_tasks_with_config)
    if wait <= 0:
        return JsonResponse({"tasks": await tasks_of(device)})
    loop = asyncio.get_running_loop()
    end = loop.time() + wait
    async with notify.RoundsListener() as listener:
        while True:
            tasks = await tasks_of(device)
            left = end - loop.time()
            if tasks or left <= 0:
                return JsonResponse({"tasks": tasks})
            await listener.wait(timeout=left)


@device_endpoint(methods=("GET",), json=False)
def round_task(request: HttpRequest, device: Device, body: None, round_id: int) -> HttpResponseBase:
    """``GET rounds/<id>/task``: what a selected device needs to train for the round."""
    return JsonResponse(selectors.round_task(round_id=round_id, device=device))


@device_endpoint(methods=("GET",), json=False)
def round_weights(request: HttpRequest, device: Device, body: None, round_id: int) -> HttpResponseBase:
    """``GET rounds/<id>/weights``: the global weights (safetensors), ETag = their SHA-256."""
    rnd = selectors.round_for_download(round_id=round_id, device=device)
    etag = f'"{rnd.weights_sha256}"'
    if request.META.get("HTTP_IF_NONE_MATCH") == etag:
        response = HttpResponse(status=304)
        response["ETag"] = etag
        return response
    data = selectors.round_weights_bytes(rnd=rnd)
    services.round_weights_served(round_id=rnd.pk, nbytes=len(data))
    response = HttpResponse(data, content_type="application/octet-stream")
    response["ETag"] = etag
    response["Content-Length"] = str(len(data))
    return response


@device_endpoint(methods=("POST",), json=False)
def round_update(request: HttpRequest, device: Device, body: None, round_id: int) -> HttpResponseBase:
    """``POST rounds/<id>/update``: the device's encoded delta (body: safetensors bytes).

    ``num_examples`` and ``metrics`` (a JSON object of numbers) come as headers
    ``X-Num-Examples`` / ``X-Metrics`` or as query parameters; ``X-Backend`` names the
    training runtime (``torch``, ``ort``). 201 when stored, 200 when
    the same bytes were already accepted (a retried upload), 409 ``duplicate_update``
    for different bytes; any other refusal is a 4xx whose code says why.
    """
    limit = int(settings.ROUND_UPDATE_MAX_BYTES)
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    # Read the raw stream (the 2 MB form-body limit does not apply to deltas); one byte
    # past the limit is enough to know the body is too large.
    oversize = declared if declared > limit else None
    raw: bytes = b"" if oversize else request.read(limit + 1)
    update, created = services.update_receive(
        round_id=round_id,
        device=device,
        body=raw,
        num_examples=request.META.get("HTTP_X_NUM_EXAMPLES") or request.GET.get("num_examples"),
        metrics=request.META.get("HTTP_X_METRICS") or request.GET.get("metrics"),
        declared_size=oversize,
        backend=request.META.get("HTTP_X_BACKEND"),
    )
    return JsonResponse(
        {"id": update.pk, "status": update.status, "duplicate": not created, "norm": update.norm},
        status=201 if created else 200,
    )


@device_endpoint(methods=("POST",))
def round_evaluation(
    request: HttpRequest, device: Device, body: dict[str, Any], round_id: int
) -> HttpResponseBase:
    """``POST rounds/<id>/evaluation``: a board's holdout numbers for an evaluation round.

    Body ``{"metrics": {"holdout_<metric>", "holdout_loss", "holdout_examples"}}``; 201 when
    stored, 200 for the same numbers again.
    """
    metrics = body.get("metrics")
    if not isinstance(metrics, dict):
        raise ServiceError("metrics must be an object.", code="bad_metrics")
    update, created = services.evaluation_receive(round_id=round_id, device=device, metrics=metrics)
    return JsonResponse({"id": update.pk, "duplicate": not created}, status=201 if created else 200)


@device_endpoint(methods=("POST",))
def round_failure(
    request: HttpRequest, device: Device, body: dict[str, Any], round_id: int
) -> HttpResponseBase:
    """``POST rounds/<id>/failure``: why the device cannot take part (``wire.RoundFailure``).

    201 when recorded, 200 for the same report again; the round stops waiting for the device.
    """
    update, created = services.update_failure_receive(
        round_id=round_id,
        device=device,
        code=body.get("code"),
        message=body.get("message"),
        backend=body.get("backend"),
    )
    return JsonResponse(
        {"id": update.pk, "status": update.status, "duplicate": not created}, status=201 if created else 200
    )
