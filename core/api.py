"""What every API view shares: one error shape, pagination, audited writes."""

from __future__ import annotations

from typing import Any

import django_filters
from django import forms
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import models
from django.db.models import ProtectedError, RestrictedError
from django.http import Http404, JsonResponse
from django_filters.rest_framework import DjangoFilterBackend
from rest_framework import exceptions, pagination, routers, serializers, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

# What an integer column holds on every supported database (PostgreSQL's `integer`), and
# the widest id (`bigint`): inputs past these are refused with a 400, never sent to the DB.
DB_INT_MIN, DB_INT_MAX = -(2**31), 2**31 - 1
DB_ID_MAX = 2**63 - 1
# Router ids: 1..18 digits always fit a bigint; anything else is not a route (404).
ID_PATH_REGEX = "[0-9]{1,18}"


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


def _referenced(exc: ProtectedError | RestrictedError) -> Response:
    """A delete refused because other rows still point at the row: 409 naming them."""
    objects = list(getattr(exc, "protected_objects", None) or getattr(exc, "restricted_objects", None) or [])
    names = sorted({f"{obj._meta.verbose_name} {obj.pk}" for obj in objects})
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return Response(
        error_body(
            code="still_referenced",
            message=f"Cannot delete: still referenced by {shown or 'other records'}.",
            details={"referenced_by": names},
        ),
        status=status.HTTP_409_CONFLICT,
    )


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
    if isinstance(exc, ProtectedError | RestrictedError):
        return _referenced(exc)
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


class IntegerField(serializers.IntegerField):
    """DRF's IntegerField bounded to an integer column's range unless told otherwise."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("min_value", DB_INT_MIN)
        kwargs.setdefault("max_value", DB_INT_MAX)
        super().__init__(**kwargs)


class IdField(serializers.IntegerField):
    """A row id given as a number: 1..2**63-1."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("min_value", 1)
        kwargs.setdefault("max_value", DB_ID_MAX)
        super().__init__(**kwargs)


class PrimaryKeyRelatedField(serializers.PrimaryKeyRelatedField):
    """DRF's PrimaryKeyRelatedField that refuses integer ids no column can hold (as unknown)."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, int | str) and not isinstance(data, bool):
            try:
                number = int(data)
            except ValueError:
                number = None
            if number is not None and not 0 < number <= DB_ID_MAX:
                self.fail("does_not_exist", pk_value=data)
        return super().to_internal_value(data)


def int_param(params: Any, name: str, *, minimum: int = 1, maximum: int = DB_ID_MAX) -> int | None:
    """The integer query parameter ``name`` (None when absent or empty), else a 400."""
    raw = params.get(name)
    if raw is None or str(raw).strip() == "":
        return None
    text = str(raw).strip()
    if not text.lstrip("-").isdigit() or len(text) > 20 or not minimum <= int(text) <= maximum:
        raise ServiceError(
            f"{name} must be an integer in {minimum}..{maximum}.",
            code="validation_error",
            details={name: ["Not a valid integer in range."]},
        )
    return int(text)


class IntegerFilter(django_filters.NumberFilter):
    """A filter on an integer column: whole numbers in the column's range only (400 else)."""

    field_class = forms.IntegerField

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("min_value", -DB_ID_MAX)
        kwargs.setdefault("max_value", DB_ID_MAX)
        super().__init__(*args, **kwargs)


class FilterSet(django_filters.FilterSet):
    """django-filter's FilterSet whose integer columns filter by whole numbers (its
    default takes decimals such as ``?port=0.5``)."""

    FILTER_DEFAULTS = {
        **django_filters.FilterSet.FILTER_DEFAULTS,
        **{
            field: {"filter_class": IntegerFilter}
            for field in (
                models.IntegerField,
                models.SmallIntegerField,
                models.BigIntegerField,
                models.PositiveIntegerField,
                models.PositiveSmallIntegerField,
                models.PositiveBigIntegerField,
                models.AutoField,
                models.BigAutoField,
                models.SmallAutoField,
            )
        },
    }


class FilterBackend(DjangoFilterBackend):
    """The API's filter backend: `FilterSet` above for every ``filterset_fields``."""

    filterset_base = FilterSet


class Router(routers.DefaultRouter):
    """The API's router: ids in paths are numbers that fit a bigint unless a viewset says
    otherwise (``lookup_value_regex``); anything else is no route (404), never a query."""

    include_root_view = False

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("trailing_slash", True)
        super().__init__(**kwargs)
        self._default_value_pattern = ID_PATH_REGEX


class Pagination(pagination.PageNumberPagination):
    page_size_query_param = "page_size"
    max_page_size = 500

    def get_page_size(self, request: Any) -> int | None:
        """``?page_size=`` a positive integer (at most 500 are sent), else a 400 (DRF would
        quietly use the default)."""
        size = int_param(request.query_params, self.page_size_query_param)
        return self.page_size if size is None else min(size, self.max_page_size)


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
