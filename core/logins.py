"""Signing in under the rate limits: the dashboard's login form and the operator API's token.

Both count attempts per client address (``RATE_LIMITS["login"]``) before a password is
checked, so guessing costs the guesser time and the server nothing but a counter. The
token login (``POST /api/v1/auth/token/``) answers the user's API token (created on first
use), for scripts that hold a password rather than a token; each token issued is audited
with the caller's address.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import authenticate
from django.contrib.auth.views import LoginView
from django.db import transaction
from django.http import HttpRequest, HttpResponseBase
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.authtoken.models import Token
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from core import ratelimit
from core.api import ServiceError, client_ip, error_response
from core.audit.services import audit_record

__all__ = ["RateLimitedLoginView", "TokenLoginApi", "api_token_issue"]


class RateLimitedLoginView(LoginView):
    """Django's login view, refusing a client address past ``RATE_LIMITS["login"]`` with 429."""

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if request.method == "POST":
            try:
                ratelimit.check("login", client_ip(request) or "")
            except ratelimit.RateLimited as exc:
                refused = error_response(
                    status_code=429, code=exc.code, message=exc.message, details=exc.details
                )
                refused["Retry-After"] = str(exc.retry_after_s)
                return refused
        return super().dispatch(request, *args, **kwargs)


def api_token_issue(*, request: HttpRequest, username: str, password: str) -> str:
    """The API token of the user these credentials name (created on first use); audited."""
    user = authenticate(request, username=username, password=password)
    if user is None or not user.is_active:
        raise ServiceError("Wrong username or password.", code="invalid_credentials", status_code=401)
    with transaction.atomic():
        token, created = Token.objects.get_or_create(user=user)
        audit_record(
            actor=user,
            action="api_token.issued",
            target_type="authtoken.token",
            target_id=str(user.pk),
            data={"created": created},
            remote_addr=client_ip(request),
        )
    return str(token.key)


class _LoginIn(serializers.Serializer[Any]):
    username = serializers.CharField(max_length=150)
    password = serializers.CharField(max_length=256, trim_whitespace=False)


class TokenLoginApi(APIView):
    """``POST /api/v1/auth/token/``: username and password in, the user's API token out."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    @extend_schema(
        request=_LoginIn,
        responses={
            200: inline_serializer("TokenLoginOut", {"token": serializers.CharField()}),
            401: OpenApiResponse(description="Wrong username or password, or an inactive user."),
        },
        auth=[],
    )
    def post(self, request: Request) -> Response:
        ratelimit.check("login", client_ip(request) or "")
        data = _LoginIn(data=request.data)
        data.is_valid(raise_exception=True)
        key = api_token_issue(
            request=request._request,
            username=data.validated_data["username"],
            password=data.validated_data["password"],
        )
        return Response({"token": key})
