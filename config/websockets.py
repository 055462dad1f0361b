"""Websocket routes of every app, gathered in one list for the ASGI router."""

from fleet.routing import websocket_urlpatterns as fleet_ws
from frontend.routing import websocket_urlpatterns as frontend_ws

websocket_urlpatterns = [*fleet_ws, *frontend_ws]
