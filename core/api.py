"""What every API view shares: one error shape, pagination, audited writes."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, JsonResponse
from rest_framework import exceptions, pagination, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


class ServiceError(Exception):
    """A refused write with a stable machine code; the API turns it into a 4xx."""

    status_code: int = status.HTTP_400_BAD_REQUEST

    def __init__(
        self,
        message: str,
        *,
        code: str = "invalid",
        status_code: int | None = None,
        details: dict[str, Any] | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.details = details or {}
        # Sent as Retry-After (a 429 or 503 that a client should come back from).
        self.retry_after_s = retry_after_s
        if status_code is not None:
            self.status_code = status_code


class ConflictError(ServiceError):
    status_code: int = status.HTTP_409_CONFLICT


class NotFoundError(ServiceError):
    status_code: int = status.HTTP_404_NOT_FOUND


def error_body(*, code: str, message: str, details: Any = None) -> dict[str, Any]:
    """The one error shape: `{"error": {"code", "message", "details"}}`."""
    return {"error": {"code": code, "message": message, "details": details or {}}}


def error_response(*, status_code: int, code: str, message: str, details: Any = None) -> JsonResponse:
    """A plain Django JSON response in the one error shape (for non-DRF views)."""
    return JsonResponse(error_body(code=code, message=message, details=details), status=status_code)


def _first_message(detail: Any) -> str:
    if isinstance(detail, dict):
        for key, value in detail.items():
            inner = _first_message(value)
            return inner if key in ("non_field_errors", "detail") else f"{key}: {inner}"
    if isinstance(detail, list) and detail:
        return _first_message(detail[0])
    return str(detail)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """Map every error raised in a DRF view to the one error shape."""
    if isinstance(exc, ServiceError):
        refused = Response(
            error_body(code=exc.code, message=exc.message, details=exc.details), status=exc.status_code
        )
        if exc.retry_after_s is not None:
            refused["Retry-After"] = str(exc.retry_after_s)
        return refused
    if isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(
            detail=exc.message_dict if hasattr(exc, "error_dict") else exc.messages
        )
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    elif isinstance(exc, RequestDataTooBig):
        return Response(
            error_body(code="too_large", message="Request body is too large."),
            status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
        )
    if isinstance(exc, exceptions.AuthenticationFailed):
        # A wrong API token is a guess at a credential: counted per client address like an
        # anonymous request, so guessing is limited as signing in is.
        from core.ratelimit import RateLimited, check

        request = context.get("request")
        try:
            check("api_anon", (client_ip(request) if request is not None else None) or "")
        except RateLimited as limited:
            return exception_handler(limited, context)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        code, details = "validation_error", exc.detail
        message = _first_message(exc.detail)
    elif isinstance(exc, exceptions.APIException):
        codes = exc.get_codes()
        code = codes if isinstance(codes, str) else "error"
        details = {}
        message = _first_message(exc.detail)
    else:  # pragma: no cover - DRF only handles APIException subclasses
        code, details, message = "error", {}, str(exc)
    response.data = error_body(code=code, message=message, details=details)
    return response


class Pagination(pagination.PageNumberPagination):
    page_size_query_param = "page_size"
    max_page_size = 500


def client_ip(request: Any) -> str | None:
    """The caller's address: the socket peer, or behind a trusted proxy the address it forwarded
    (``core.ratelimit.client_address``, ``TRUSTED_PROXIES``). The audit log records this."""
    from core.ratelimit import client_address  # it imports ServiceError from here

    return client_address(request)


class AuditedWritesMixin:
    """For plain ModelViewSets: each create/update/delete is saved with its audit event.

    Workflow views call services, which record their own audit events.
    """

    audit_name: str = ""

    def _audit(self, action: str, instance: Any) -> None:
        from core.audit.services import audit_record

        request = self.request  # type: ignore[attr-defined]
        data = request.data if isinstance(request.data, dict) else {}
        audit_record(
            actor=request.user,
            action=f"{self.audit_name}.{action}",
            target=instance,
            data=dict(data),
            remote_addr=client_ip(request),
        )

    def perform_create(self, serializer: Any) -> None:
        from django.db import transaction

        with transaction.atomic():
            instance = serializer.save()
            self._audit("create", instance)

    def perform_update(self, serializer: Any) -> None:
        from django.db import transaction

        with transaction.atomic():
            instance = serializer.save()
            self._audit("update", instance)

    def perform_destroy(self, instance: Any) -> None:
        from django.db import transaction

        with transaction.atomic():
            self._audit("delete", instance)
            instance.delete()
