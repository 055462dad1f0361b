"""Operator view of on-device personalisation: the gain of personal heads on the family's metric."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fleet.selectors.personalisation import personalisation_summary


class PersonalisationView(APIView):
    """`GET /api/v1/personalisation/?group=<id|name>`: per-device gains and per-group means.

    The gain is on the family's primary metric, named in each row (``metric``: ``accuracy``
    or ``mae``) and oriented so that positive is better: ``personal_accuracy -
    global_accuracy``, or ``global_mae - personal_mae``.
    """

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
        if raw.isdigit() and len(raw) <= 18:
            return Response(personalisation_summary(group_id=int(raw)))
        return Response(personalisation_summary(group_name=raw))


__all__ = ["PersonalisationView"]
