"""Settings for `make demo` and local development: SQLite and an embedded Redis by default."""

from config.env import env
from config.settings.base import *  # noqa: F403
from config.settings.base import DATA_DIR

DEBUG = env.bool("DJANGO_DEBUG", default=False)
# Local-only defaults: the demo listens on loopback. Production has no such defaults.
SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="flotilla-demo-only-secret-key-not-for-production")
DEVICE_SECRET_KEY = env.str("DEVICE_SECRET_KEY", default="flotilla-demo-device-key")
PROVISIONING_KEY = env.str("PROVISIONING_KEY", default="")
PROVISIONING_KEY_FILE = DATA_DIR / "provisioning.key"
# Static files come straight from the apps' folders, so the demo needs no collectstatic.
WHITENOISE_USE_FINDERS = True
