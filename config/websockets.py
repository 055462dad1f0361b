"""Websocket routes: the device nudge socket and the operators' live-update socket.

Operators' sockets use the session cookie, so they pass the allowed-hosts origin check
(a page on another site must not open them); devices send their secret in a header and
have no origin, so their route stands outside that check.
"""

from typing import Any

from channels.auth import AuthMiddlewareStack
from channels.routing import URLRouter
from channels.security.websocket import AllowedHostsOriginValidator
from django.urls import re_path

from fleet.routing import websocket_urlpatterns as fleet_ws
from frontend.routing import websocket_urlpatterns as frontend_ws

websocket_application: Any = URLRouter(
    [
        *fleet_ws,
        re_path(r"", AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(frontend_ws)))),
    ]
)
