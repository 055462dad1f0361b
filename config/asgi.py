"""ASGI entry point: HTTP through Django, websockets through Channels."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.demo")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from config.websockets import websocket_application  # noqa: E402
from fleet.auth import DeviceAuthBeforeBody  # noqa: E402

# Device credentials are checked before Django's ASGI handler reads a request body.
application = ProtocolTypeRouter(
    {"http": DeviceAuthBeforeBody(django_asgi_app), "websocket": websocket_application}
)
