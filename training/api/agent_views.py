"""Device API of federated rounds: open tasks, the round task, global weights, updates."""

from __future__ import annotations

import asyncio
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import APIView

from config.api import ServiceError, error_response
from devices_agent.wire import AUTH_SCHEME
from fleet.auth import DeviceApiMixin, device_for_secret
from training import notify, selectors, services, storage

MAX_WAIT_S = 30.0


@csrf_exempt
async def rounds_open(request: HttpRequest) -> HttpResponseBase:
    """``GET rounds/?wait=<s>``: the calling device's open training tasks.

    The same list the heartbeat carries. With ``wait`` (at most 30 s) the request is a
    long poll: when the device has no task it is answered as soon as a round opens, or
    with an empty list at the timeout. An async view, so waiting devices hold no worker
    thread; the wake-up comes over Redis pub/sub (see :mod:`training.notify`).
    """
    if request.method != "GET":
        return error_response(status_code=405, code="method_not_allowed", message="Use GET.")
    scheme, _, secret = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    device = await sync_to_async(device_for_secret)(secret.strip()) if scheme == AUTH_SCHEME else None
    if device is None:
        return error_response(
            status_code=401, code="not_authenticated", message="Device credentials required."
        )
    try:
        wait = min(MAX_WAIT_S, max(0.0, float(request.GET.get("wait", "0") or 0)))
    except ValueError:
        return error_response(status_code=400, code="validation_error", message="wait must be a number.")
    tasks_of = sync_to_async(selectors.training_tasks_for_device)
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


class RoundTaskApi(DeviceApiMixin, APIView):  # type: ignore[misc]
    """What a selected device needs to train for the round."""

    @extend_schema(responses={200: OpenApiTypes.OBJECT}, tags=["device"])
    def get(self, request: Any, round_id: int) -> Response:
        return Response(services.round_task(round_id=round_id, device=request.auth))


class RoundWeightsApi(DeviceApiMixin, APIView):  # type: ignore[misc]
    """The round's global weights (safetensors), with an ETag of their SHA-256."""

    @extend_schema(responses={(200, "application/octet-stream"): OpenApiTypes.BINARY}, tags=["device"])
    def get(self, request: Any, round_id: int) -> HttpResponseBase:
        rnd = services.round_for_device(round_id=round_id, device=request.auth)
        etag = f'"{rnd.weights_sha256}"'
        if request.META.get("HTTP_IF_NONE_MATCH") == etag:
            response = HttpResponse(status=304)
            response["ETag"] = etag
            return response
        data = storage.read_bytes(name=rnd.weights_path)
        services.round_weights_served(round_id=rnd.pk, nbytes=len(data))
        response = HttpResponse(data, content_type="application/octet-stream")
        response["ETag"] = etag
        response["Content-Length"] = str(len(data))
        return response


class RoundUpdateApi(DeviceApiMixin, APIView):  # type: ignore[misc]
    """Upload the device's encoded delta for the round (body: safetensors bytes).

    ``num_examples`` and ``metrics`` (a JSON object of numbers) come as headers
    ``X-Num-Examples`` / ``X-Metrics`` or as query parameters. 201 when stored, 200 when
    the same bytes were already accepted (a retried upload), 409 ``duplicate_update``
    for different bytes; any other refusal is a 4xx whose code says why.
    """

    parser_classes: list[Any] = []

    @extend_schema(
        request={"application/octet-stream": OpenApiTypes.BINARY},
        parameters=[
            OpenApiParameter("num_examples", int, description="local training examples"),
            OpenApiParameter("metrics", str, description="JSON object of local metrics"),
        ],
        responses={200: OpenApiTypes.OBJECT, 201: OpenApiTypes.OBJECT},
        tags=["device"],
    )
    def post(self, request: Any, round_id: int) -> HttpResponseBase:
        limit = int(settings.ROUND_UPDATE_MAX_BYTES)
        try:
            declared = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            declared = 0
        # Read the raw stream ourselves (the 2 MB form-body limit does not apply to
        # deltas); one byte past the limit is enough to know the body is too large.
        oversize = declared if declared > limit else None
        body: bytes = b"" if oversize else request._request.read(limit + 1)
        num_examples = request.META.get("HTTP_X_NUM_EXAMPLES") or request.query_params.get("num_examples")
        metrics = request.META.get("HTTP_X_METRICS") or request.query_params.get("metrics")
        try:
            update, created = services.update_receive(
                round_id=round_id,
                device=request.auth,
                body=body,
                num_examples=num_examples,
                metrics=metrics,
                declared_size=oversize,
            )
        except ServiceError as exc:
            return error_response(
                status_code=exc.status_code, code=exc.code, message=exc.message, details=exc.details
            )
        return Response(
            {"id": update.pk, "status": update.status, "duplicate": not created, "norm": update.norm},
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        )
