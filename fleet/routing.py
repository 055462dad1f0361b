from typing import Any

from django.urls import path

from fleet.consumers import AgentNudgeConsumer

# Served outside the session/origin middleware: devices authenticate with their secret.
websocket_urlpatterns: list[Any] = [path("ws/agent/", AgentNudgeConsumer.as_asgi())]
