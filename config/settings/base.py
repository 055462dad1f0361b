"""Settings shared by every environment. Values that differ between machines come from env."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from config.env import BASE_DIR, env

DATA_DIR = Path(env.str("FLOTILLA_DATA_DIR", default=str(BASE_DIR / "var")))
ARTIFACT_ROOT = Path(env.str("ARTIFACT_ROOT", default=str(DATA_DIR / "artifacts")))

DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS: list[str] = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS: list[str] = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "channels",
    "core.audit",
    "models_registry",
    "fleet",
    "training",
    "frontend",
]

MIDDLEWARE = [
    "config.middleware.DeviceApiHeadersMiddleware",
    "config.middleware.RefuseNulMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    # Django's session, user and message middleware, skipped on the device API.
    "config.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "config.middleware.AuthenticationMiddleware",
    "config.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _database(url: str) -> dict[str, Any]:
    config: dict[str, Any] = env.db_url_config(url)
    if config["ENGINE"] == "django.db.backends.sqlite3":
        # WAL lets the web server, worker and beat read while one of them writes;
        # IMMEDIATE transactions take the write lock up front instead of failing
        # with "database is locked" when two writers upgrade at once.
        config["OPTIONS"] = {
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=10000;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
        }
        # Keep connections across requests: opening one and running the PRAGMAs above
        # costs more than a whole device heartbeat.
        config["CONN_MAX_AGE"] = env.int("DB_CONN_MAX_AGE", default=60)
    else:
        config["CONN_MAX_AGE"] = env.int("DB_CONN_MAX_AGE", default=60)
        config["CONN_HEALTH_CHECKS"] = True
    return config


DATABASE_URL = env.str("DATABASE_URL", default=f"sqlite:///{DATA_DIR / 'flotilla.sqlite3'}")
DATABASES = {"default": _database(DATABASE_URL)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = Path(env.str("STATIC_ROOT", default=str(DATA_DIR / "static")))
STORAGES = {
    "default": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(ARTIFACT_ROOT)},
    },
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/login/"

# Bodies larger than this are refused before a view reads them. Artifact uploads have
# their own, larger limit enforced while streaming (see MODEL_UPLOAD_MAX_BYTES).
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("DATA_UPLOAD_MAX_MEMORY_SIZE", default=2 * 1024 * 1024)
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
MODEL_UPLOAD_MAX_BYTES = env.int("MODEL_UPLOAD_MAX_BYTES", default=512 * 1024 * 1024)
# Data set uploads (/api/v1/datasets/): the file, and the arrays unpacked from it.
DATASET_MAX_BYTES = env.int("DATASET_MAX_BYTES", default=256 * 1024 * 1024)
AGENT_MAX_BODY_BYTES = env.int("AGENT_MAX_BODY_BYTES", default=1024 * 1024)
ROUND_UPDATE_MAX_BYTES = env.int("ROUND_UPDATE_MAX_BYTES", default=64 * 1024 * 1024)
# An update of a job without its own norm bound may not be larger (L2) than this many
# times the global model it updates.
ROUND_MAX_UPDATE_NORM_RATIO = env.float("ROUND_MAX_UPDATE_NORM_RATIO", default=10.0)
# A round's aggregation lease: renewed at every checkpoint; a round whose worker stopped
# renewing it for this long is claimed again by the next tick.
ROUND_AGGREGATION_LEASE_S = env.float("ROUND_AGGREGATION_LEASE_S", default=60.0)
ROUND_CHECKPOINT_EVERY = env.int("ROUND_CHECKPOINT_EVERY", default=8)
# Test hook: a pause after each aggregated update, to kill a worker mid-aggregation.
ROUND_AGGREGATE_DELAY_S = env.float("ROUND_AGGREGATE_DELAY_S", default=0.0)
# Partial sums across workers: a round of a mergeable strategy with at least this many
# accepted updates is split into shards of AGGREGATION_SHARD_SIZE updates, each summed by
# its own task on any worker and merged by the round's worker.
AGGREGATION_SHARD_MIN_UPDATES = env.int("AGGREGATION_SHARD_MIN_UPDATES", default=256)
AGGREGATION_SHARD_SIZE = env.int("AGGREGATION_SHARD_SIZE", default=128)
# A shard's lease: renewed at each of its checkpoints; an expired one is claimed again.
AGGREGATION_SHARD_LEASE_S = env.float("AGGREGATION_SHARD_LEASE_S", default=60.0)

# ONNX Runtime training artifacts (models_registry.ort_training): built for every registered
# version with a program, and for federated jobs that accept boards without PyTorch, in a
# virtualenv of their own: ORT_BUILDER_PYTHON when an image provides one, else one created
# under ORT_BUILDER_DIR on first use (pip, from the package index).
ORT_TRAINING_AUTO = env.bool("ORT_TRAINING_AUTO", default=True)
ORT_BUILDER_PYTHON = env.str("ORT_BUILDER_PYTHON", default="")
ORT_BUILDER_DIR = Path(env.str("ORT_BUILDER_DIR", default=str(DATA_DIR / "ort-builder")))
ORT_BUILDER_TIMEOUT_S = env.float("ORT_BUILDER_TIMEOUT_S", default=900.0)

REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "flotilla",
    }
}

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL]},
    }
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["core.roles.RolePermission"],
    "DEFAULT_PAGINATION_CLASS": "core.api.Pagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": [
        "core.api.FilterBackend",
        "rest_framework.filters.OrderingFilter",
        "rest_framework.filters.SearchFilter",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "core.api.exception_handler",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    # JSON bodies only: form encoding would read an empty field as "not given" and every
    # value as a string. The upload views declare their own multipart parsers.
    "DEFAULT_PARSER_CLASSES": ["core.parsers.JSONParser"],
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
    "DEFAULT_THROTTLE_CLASSES": ["core.throttles.ApiRateThrottle"],
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Flotilla API",
    "DESCRIPTION": (
        "Operator API (`/api/v1/`, `Authorization: Token <key>` or a session) and device API "
        "(`/api/agent/v1/`, `Authorization: Device <secret>`) of the Flotilla control plane."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {"DeviceStatusEnum": "fleet.models.devices.Device.Status"},
    # The device API (plain Django views) is written out by its apps; then every
    # operation gets the error answers it can give (core.openapi).
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "fleet.api.agent_schema.add_device_api",
        "training.api.agent_schema.add_round_api",
        "core.openapi.add_error_responses",
    ],
}

# --- Celery -----------------------------------------------------------------------------
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_TIMEZONE = "UTC"
CELERY_TASK_SOFT_TIME_LIMIT = env.int("CELERY_TASK_SOFT_TIME_LIMIT", default=600)
CELERY_TASK_TIME_LIMIT = env.int("CELERY_TASK_TIME_LIMIT", default=660)
# A task is acknowledged only after it finished, and re-queued if its worker died, so a
# crash mid-task is retried; tasks are written to be safe to run twice.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env.int("CELERY_VISIBILITY_TIMEOUT", default=900)}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# The sweep (core.sweep, every SWEEP_INTERVAL_S) sends again leased work that no worker
# holds: rounds aggregating or evaluating and model jobs running past their lease, and
# work nobody claimed within SWEEP_GRACE_S of becoming due (its message was lost).
SWEEP_INTERVAL_S = env.float("SWEEP_INTERVAL_S", default=30.0)
SWEEP_GRACE_S = env.float("SWEEP_GRACE_S", default=120.0)
# How often beat writes the heartbeats' buffered last_seen to the device rows
# (fleet.services.liveness; the offline marking flushes first as well). The device
# list's last_seen lags by at most this much.
LIVENESS_FLUSH_S = env.float("LIVENESS_FLUSH_S", default=15.0)
# Three queues, so that no kind of work waits behind another: `control` (ticks, rollouts,
# experiments, opening and closing rounds, the sweep: short database work that must run on
# time), `ml` (aggregation, evaluation, export, optimisation, ORT training artifact builds:
# minutes of CPU each) and `io` (webhooks, SSH provisioning: waiting on other machines).
# Every task is routed here, by name; tests/config/test_queues.py holds that.
CELERY_TASK_DEFAULT_QUEUE = "control"
TASK_QUEUES: dict[str, tuple[str, ...]] = {
    "control": (
        "core.sweep",
        "fleet.devices_mark_offline",
        "fleet.drift_check",
        "fleet.experiments_evaluate",
        "fleet.liveness_flush",
        "fleet.metrics_rollup",
        "fleet.provisioning_resume",
        "fleet.prune",
        "fleet.rollouts_advance",
        "fleet.rollouts_advance_one",
        "fleet.webhooks_retry_due",
        "training.round_close",
        "training.round_open",
        "training.rounds_tick",
    ),
    "ml": (
        "models_registry.build_ort_training",
        "models_registry.evaluate_version",
        "models_registry.export_version",
        "models_registry.optimise_version",
        "training.round_aggregate",
        "training.shard_aggregate",
    ),
    "io": (
        "fleet.provision_device",
        "fleet.webhooks_deliver",
    ),
}
CELERY_TASK_ROUTES = {task: {"queue": queue} for queue, tasks in TASK_QUEUES.items() for task in tasks}
CELERY_IMPORTS = ("core.tasks",)
# How often beat checks drift: flags, and the per-group counts pages read.
DRIFT_CHECK_S = env.float("DRIFT_CHECK_S", default=60.0)
CELERY_BEAT_SCHEDULE: dict[str, dict[str, Any]] = {
    "fleet-mark-offline": {
        "task": "fleet.devices_mark_offline",
        "schedule": timedelta(seconds=30),
    },
    "fleet-liveness-flush": {
        "task": "fleet.liveness_flush",
        "schedule": timedelta(seconds=LIVENESS_FLUSH_S),
    },
    "fleet-provisioning-resume": {
        "task": "fleet.provisioning_resume",
        "schedule": timedelta(seconds=60),
    },
    "training-rounds-tick": {
        "task": "training.rounds_tick",
        "schedule": timedelta(seconds=env.float("ROUNDS_TICK_S", default=5.0)),
    },
    "fleet-rollouts-advance": {
        "task": "fleet.rollouts_advance",
        "schedule": timedelta(seconds=env.float("ROLLOUT_TICK_S", default=5.0)),
    },
    "fleet-experiments-evaluate": {
        "task": "fleet.experiments_evaluate",
        "schedule": timedelta(seconds=env.float("EXPERIMENT_TICK_S", default=10.0)),
    },
    "fleet-webhooks-retry": {
        "task": "fleet.webhooks_retry_due",
        "schedule": timedelta(seconds=10),
    },
    "core-sweep": {
        "task": "core.sweep",
        "schedule": timedelta(seconds=SWEEP_INTERVAL_S),
    },
    "fleet-drift-check": {
        "task": "fleet.drift_check",
        "schedule": timedelta(seconds=DRIFT_CHECK_S),
    },
    "fleet-metrics-rollup": {
        "task": "fleet.metrics_rollup",
        "schedule": timedelta(seconds=env.float("METRICS_ROLLUP_S", default=300.0)),
    },
    "fleet-prune": {
        "task": "fleet.prune",
        "schedule": timedelta(seconds=env.float("PRUNE_S", default=3600.0)),
    },
}
# How long each growing table keeps its rows, in days (fleet/services/retention.py).
METRICS_RAW_DAYS = env.float("METRICS_RAW_DAYS", default=14.0)
METRICS_HOURLY_DAYS = env.float("METRICS_HOURLY_DAYS", default=90.0)
METRICS_DAILY_DAYS = env.float("METRICS_DAILY_DAYS", default=730.0)
DEPLOYMENT_EVENTS_DAYS = env.float("DEPLOYMENT_EVENTS_DAYS", default=90.0)
WEBHOOK_DELIVERIES_DAYS = env.float("WEBHOOK_DELIVERIES_DAYS", default=30.0)
DRIFT_REPORTS_DAYS = env.float("DRIFT_REPORTS_DAYS", default=90.0)

# --- Flotilla ---------------------------------------------------------------------------
# Device secrets are random 256-bit values, so a keyed fast hash (HMAC-SHA256) is enough
# and keeps the heartbeat hot path cheap; a password hasher would cost milliseconds.
DEVICE_SECRET_KEY = env.str("DEVICE_SECRET_KEY", default="")
HEARTBEAT_INTERVAL_S = env.int("HEARTBEAT_INTERVAL_S", default=60)
# Device ids per nudge fan-out message (one message reaches every websocket process).
NUDGE_BATCH_DEVICES = env.int("NUDGE_BATCH_DEVICES", default=5000)
# Drift: alert thresholds on a device's sketch (PSI of top-1 confidence, z of a feature's
# mean shift) and the accuracy drop on labelled feedback that flags a model version.
DRIFT_PSI_ALERT = env.float("DRIFT_PSI_ALERT", default=0.2)
DRIFT_Z_ALERT = env.float("DRIFT_Z_ALERT", default=4.0)
# A significant shift (z) alerts only when it is also large: at least this many reference
# standard deviations (the effect size), or a per-feature PSI in the major band.
DRIFT_EFFECT_SIZE_MIN = env.float("DRIFT_EFFECT_SIZE_MIN", default=0.5)
# PSI bands of a feature's binned inputs against the reference: below MODERATE none,
# MODERATE..MAJOR moderate, above MAJOR major.
DRIFT_PSI_MODERATE = env.float("DRIFT_PSI_MODERATE", default=0.1)
DRIFT_PSI_MAJOR = env.float("DRIFT_PSI_MAJOR", default=0.25)
# PSI over few inputs is inflated by sampling noise (about 9 / n per feature over 10 bins):
# a PSI (a feature's or the confidence histogram's) decides an alert only from windows of
# at least this many inputs.
DRIFT_PSI_MIN_SAMPLES = env.int("DRIFT_PSI_MIN_SAMPLES", default=500)
# A board's first windows for a version, up to this many inputs, are its own baseline; its
# later windows alert only when they stray from both the reference and that baseline.
DRIFT_BASELINE_SAMPLES = env.int("DRIFT_BASELINE_SAMPLES", default=200)
# A board's window is judged once it holds this many inputs (shorter ones are merged with
# its next): a mean over a handful of inputs strays by chance, the largest of many features more.
DRIFT_WINDOW_MIN_SAMPLES = env.int("DRIFT_WINDOW_MIN_SAMPLES", default=30)
DRIFT_ACCURACY_DROP = env.float("DRIFT_ACCURACY_DROP", default=0.05)
# A regression version is flagged when its live mae rises this much above its evaluated mae (relative).
DRIFT_MAE_RISE = env.float("DRIFT_MAE_RISE", default=0.25)
# Flags count devices: each device's mean over the hour is one vote (once it has
# DRIFT_MIN_SAMPLES_PER_DEVICE samples), the median decides, and only with at least
# DRIFT_MIN_DEVICES votes and DRIFT_MIN_SAMPLES samples among them.
DRIFT_MIN_SAMPLES = env.int("DRIFT_MIN_SAMPLES", default=200)
DRIFT_MIN_SAMPLES_PER_DEVICE = env.int("DRIFT_MIN_SAMPLES_PER_DEVICE", default=20)
DRIFT_MIN_DEVICES = env.int("DRIFT_MIN_DEVICES", default=3)
# A version stays watched this long after its rollout succeeded: a flag (model.flagged) on a
# watched version reverts it everywhere or only alerts, as its family's FamilyPolicy says
# (fleet.services.revert); a family's policy may set its own period.
VERSION_WATCH_S = env.int("VERSION_WATCH_S", default=7 * 24 * 3600)
# A family whose policy lets a flag start a federated job starts at most one per this interval.
DRIFT_JOB_INTERVAL_S = env.int("DRIFT_JOB_INTERVAL_S", default=6 * 3600)
# The boards where a flagged version drifted: drift alerts over this window (and the boards
# whose own feedback fell behind over the last hour).
DRIFT_JOB_LOOKBACK_S = env.int("DRIFT_JOB_LOOKBACK_S", default=24 * 3600)
DRIFT_JOB_ROUNDS = env.int("DRIFT_JOB_ROUNDS", default=3)
# The soak of each but the last of a shipped rollout's default waves (10 % / 50 % / 100 %).
SHIP_SOAK_S = env.float("SHIP_SOAK_S", default=600.0)

# A device's metrics (fleet.services.metrics): at most this many samples an hour, and
# only for versions it runs, was given, ran before or was deployed in this many days.
METRICS_MAX_SAMPLES_PER_HOUR = env.int("METRICS_MAX_SAMPLES_PER_HOUR", default=200_000)
METRICS_VERSION_WINDOW_DAYS = env.float("METRICS_VERSION_WINDOW_DAYS", default=7.0)

# Webhooks go only to public addresses; these hosts, addresses or CIDR networks are
# trusted internal receivers (fleet.outbound).
WEBHOOK_ALLOWED_HOSTS: list[str] = env.list("WEBHOOK_ALLOWED_HOSTS", default=[])
WEBHOOK_TIMEOUT_S = env.float("WEBHOOK_TIMEOUT_S", default=10.0)
WEBHOOK_MAX_RESPONSE_BYTES = env.int("WEBHOOK_MAX_RESPONSE_BYTES", default=65536)
# A device is offline once it missed this many heartbeats.
OFFLINE_AFTER_MISSED = env.int("OFFLINE_AFTER_MISSED", default=3)
# Without Redis (no liveness buffer) the heartbeat writes last_seen at most this often per
# device (it must stay well below the offline threshold); it caches policies and artifact
# references this long.
HEARTBEAT_LAST_SEEN_WRITE_S = env.float("HEARTBEAT_LAST_SEEN_WRITE_S", default=10.0)
HEARTBEAT_CACHE_TTL_S = env.float("HEARTBEAT_CACHE_TTL_S", default=10.0)
# Adds /api/agent/v1/bench/bare, the baseline of benchmarks/heartbeat.py. Never in production.
FLOTILLA_BENCH_VIEWS = env.bool("FLOTILLA_BENCH_VIEWS", default=False)
# Ed25519 key for artifact signatures: raw 32-byte seed, base64; or a file path.
ARTIFACT_SIGNING_KEY = env.str("ARTIFACT_SIGNING_KEY", default="")
ARTIFACT_SIGNING_KEY_FILE = Path(
    env.str("ARTIFACT_SIGNING_KEY_FILE", default=str(DATA_DIR / "signing-key.pem"))
)
# How long an artifact's signed statement is valid after the server serves it (seconds);
# empty: statements never expire. Keep it well above the heartbeat interval plus the time a
# download takes: a board refuses a statement that expired before it verified the artifact.
ARTIFACT_STATEMENT_LIFETIME_S = env.int("ARTIFACT_STATEMENT_LIFETIME_S", default=None) or None
# Fernet key that encrypts provisioning credentials at rest.
PROVISIONING_KEY = env.str("PROVISIONING_KEY", default="")
# Where provisioned boards get the agent's packages. packages=index: pip's default index (or
# the board's pip.conf) unless an index is set here; extra indexes and find-links (paths or
# URLs as the board sees them) are passed to pip as they are.
PROVISIONING_PIP_INDEX_URL = env.str("PROVISIONING_PIP_INDEX_URL", default="")
PROVISIONING_PIP_EXTRA_INDEX_URLS = env.list("PROVISIONING_PIP_EXTRA_INDEX_URLS", default=[])
PROVISIONING_PIP_FIND_LINKS = env.list("PROVISIONING_PIP_FIND_LINKS", default=[])
# packages=wheelhouse: a directory of wheels on the server, uploaded to boards without internet.
PROVISIONING_WHEELHOUSE = env.str("PROVISIONING_WHEELHOUSE", default="")
PUBLIC_BASE_URL = env.str("PUBLIC_BASE_URL", default="http://127.0.0.1:8000")

# Rate limits (core.ratelimit): "<count>/<window>" with s, min, h or d ("" or "off": none),
# counted in fixed windows in the shared cache. Per device for the device API (a board
# heartbeats once a minute; a round or an update adds a few requests), per client address
# for what comes before credentials (enrollment, logins, failed device credentials), per
# user for the operator API. A 100,000-board fleet is ~1,700 heartbeats a second in all
# but a few requests a minute per board, far from any of these.
RATE_LIMITS: dict[str, str] = {
    "device": env.str("RATE_LIMIT_DEVICE", default="1200/min"),
    "device_auth_failure": env.str("RATE_LIMIT_DEVICE_AUTH_FAILURE", default="300/min"),
    "enroll": env.str("RATE_LIMIT_ENROLL", default="1200/min"),
    "login": env.str("RATE_LIMIT_LOGIN", default="30/min"),
    "api_user": env.str("RATE_LIMIT_API_USER", default="3000/min"),
    "api_anon": env.str("RATE_LIMIT_API_ANON", default="600/min"),
}
# The SHA-256 of this server's certificate when it is self-signed (`python -m config.tls`
# logs it): enrollment commands and provisioned boards' agent.toml pin it.
SERVER_CERT_SHA256 = env.str("SERVER_CERT_SHA256", default="")
# Proxies whose X-Forwarded-For is believed (CIDRs, e.g. the compose network's nginx): the
# client's address is then the right-most forwarded entry that is not one of them. Empty:
# the socket peer is the client, whatever headers say.
TRUSTED_PROXIES: list[str] = env.list("TRUSTED_PROXIES", default=[])

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {"django.request": {"level": "ERROR"}},
}
