"""The operator API's throttle (DRF's ``DEFAULT_THROTTLE_CLASSES``), on core.ratelimit's counter."""

from __future__ import annotations

from typing import Any

from rest_framework.throttling import BaseThrottle


class ApiRateThrottle(BaseThrottle):
    """Per user once authenticated (``api_user``), per client address before (``api_anon``).

    A refusal raises ``core.ratelimit.RateLimited``, which the exception handler answers as
    429 ``rate_limited`` with ``Retry-After`` in the one error shape.
    """

    def allow_request(self, request: Any, view: Any) -> bool:
        # Imported here: DRF loads this class while rest_framework.views is being imported,
        # which core.api (and so core.ratelimit) imports in turn.
        from core.ratelimit import check, client_address

        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            check("api_user", str(user.pk))
        else:
            check("api_anon", client_address(request) or "")
        return True
