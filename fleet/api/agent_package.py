"""Operator API: the agent package and the pinned packages a board installs by hand.

What provisioning uploads over SSH, for boards installed another way (an OS image, a
configuration-management tool, a person at a console). Viewers may download: the agent
holds no secret, and its dependencies are the server's pins.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.request import Request
from rest_framework.views import APIView

from core.api import ServiceError
from fleet.board_packages import TRAINING_BACKENDS, bare_requirements_file, requirements_file
from fleet.services.provisioning import agent_bundle


class AgentPackageView(APIView):
    """``GET agent/package``: the agent as an installable ``flotilla-agent.tar.gz``."""

    @extend_schema(responses={(200, "application/gzip"): OpenApiTypes.BINARY})
    def get(self, request: Request) -> HttpResponse:
        response = HttpResponse(agent_bundle(), content_type="application/gzip")
        response["Content-Disposition"] = 'attachment; filename="flotilla-agent.tar.gz"'
        return response


class AgentRequirementsView(APIView):
    """``GET agent/requirements?training=none|torch|onnxruntime[&bare=1]``: pinned requirement lines.

    ``bare=1`` gives the packages to install with ``pip --no-deps`` (the ONNX Runtime
    training build, whose declared dependencies a board does not need); empty otherwise.
    """

    @extend_schema(
        parameters=[
            OpenApiParameter("training", str, enum=sorted(TRAINING_BACKENDS), default="none"),
            OpenApiParameter("bare", bool, default=False),
        ],
        responses={(200, "text/plain"): OpenApiTypes.STR},
    )
    def get(self, request: Request) -> HttpResponse:
        training = str(request.query_params.get("training", "none"))
        if training not in TRAINING_BACKENDS:
            raise ServiceError(
                f"training must be one of {', '.join(sorted(TRAINING_BACKENDS))}.",
                code="validation_error",
                details={"field": "training"},
            )
        raw_bare = str(request.query_params.get("bare", "")).strip().lower()
        if raw_bare not in ("", "0", "1", "false", "true", "no", "yes"):
            raise ServiceError(
                "bare must be true or false.", code="validation_error", details={"field": "bare"}
            )
        bare = raw_bare in ("1", "true", "yes")
        text: Any = bare_requirements_file(training) if bare else requirements_file(training)
        return HttpResponse(text, content_type="text/plain; charset=utf-8")
