"""Operator view of on-device personalisation: the accuracy gain of personal heads."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fleet.selectors.personalisation import personalisation_summary


class PersonalisationView(APIView):
    """`GET /api/v1/personalisation/?group=<id|name>`: per-device gains and per-group means."""

    @extend_schema(
        parameters=[
            OpenApiParameter("group", OpenApiTypes.STR, required=False, description="Group id or name.")
        ],
        responses={200: OpenApiTypes.OBJECT},
    )
    def get(self, request: Request) -> Response:
        """The personalisation summary, optionally for one group (by id or by name)."""
        raw = request.query_params.get("group", "").strip()
        if not raw:
            return Response(personalisation_summary())
        if raw.isdigit():
            return Response(personalisation_summary(group_id=int(raw)))
        return Response(personalisation_summary(group_name=raw))


__all__ = ["PersonalisationView"]
