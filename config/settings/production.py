"""Production settings: every secret must come from the environment; none has a default."""

from config.env import env
from config.settings.base import *  # noqa: F403

DEBUG = False
SECRET_KEY = env.str("DJANGO_SECRET_KEY")
DEVICE_SECRET_KEY = env.str("DEVICE_SECRET_KEY")
PROVISIONING_KEY = env.str("PROVISIONING_KEY")
PROVISIONING_KEY_FILE = None
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS")
SESSION_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=True)
CSRF_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=True)
STORAGES = {
    **STORAGES,  # noqa: F405
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
