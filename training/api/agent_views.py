"""Device API of federated rounds: open tasks, the round task, global weights, updates."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpResponse, HttpResponseBase
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import APIView

from config.api import ServiceError, error_response
from fleet.auth import DeviceApiMixin
from training import selectors, services, storage


class RoundsOpenApi(DeviceApiMixin, APIView):  # type: ignore[misc]
    """Open training tasks for the calling device (the same list the heartbeat carries)."""

    @extend_schema(responses={200: OpenApiTypes.OBJECT}, tags=["device"])
    def get(self, request: Any) -> Response:
        return Response({"tasks": selectors.training_tasks_for_device(request.auth)})


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
