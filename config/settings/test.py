"""Settings for the test suite.

Uses `DATABASE_URL`/`REDIS_URL` when set (CI: PostgreSQL and Redis); otherwise SQLite and
an embedded Redis-protocol server started for this run.
"""

import os
import tempfile
from pathlib import Path

from config.embedded_redis import ensure_redis_url

# Each test run gets its own data directory, so runs never share artifacts or keys.
_RUN_DIR = Path(os.environ.setdefault("FLOTILLA_DATA_DIR", tempfile.mkdtemp(prefix="flotilla-test-")))
ensure_redis_url()

from config.env import env  # noqa: E402
from config.settings.base import *  # noqa: E402, F403
from config.settings.base import DATA_DIR, DATABASES  # noqa: E402

DEBUG = False
SECRET_KEY = "flotilla-test-secret-key"
DEVICE_SECRET_KEY = "flotilla-test-device-key"
PROVISIONING_KEY = ""
PROVISIONING_KEY_FILE = DATA_DIR / "provisioning.key"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
ALLOWED_HOSTS = ["*"]

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A file, not ":memory:", so live-server tests can share the database with the
    # Celery workers and ASGI servers they start as real processes.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test.sqlite3")}

REDIS_URL = env.str("REDIS_URL")

# The tests' webhook receivers listen on loopback; tests of the address guard clear this.
WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]

# Static files come straight from the apps' folders; no collectstatic in tests.
WHITENOISE_USE_FINDERS = True
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # noqa: F405

# Tests ask for ORT training artifacts where they test them, not on every registration, and
# share one builder environment between runs (it takes a minute and ~300 MB to create).
ORT_TRAINING_AUTO = env.bool("ORT_TRAINING_AUTO", default=False)
ORT_BUILDER_DIR = Path(
    env.str("ORT_BUILDER_DIR", default=str(Path.home() / ".cache" / "flotilla" / "ort-builder"))
)
