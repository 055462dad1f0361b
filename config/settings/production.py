"""Production settings: every secret must come from the environment; none has a default.

HTTPS is terminated by the proxy in front (nginx in the compose stack), which says so in
``X-Forwarded-Proto``; Django trusts that header (the proxy sets it on every request and
the web server is not reachable around it), redirects plain HTTP, sends HSTS and marks its
cookies secure. ``python manage.py check --deploy`` passes without warnings (a test runs it).
A stack on one machine over plain HTTP (benchmarks, ``config.stack``) turns the redirect,
HSTS and secure cookies off through the environment.
"""

from urllib.parse import urlparse

from config.env import env
from config.settings.base import *  # noqa: F403
from config.settings.base import PUBLIC_BASE_URL

DEBUG = False
SECRET_KEY = env.str("DJANGO_SECRET_KEY")
DEVICE_SECRET_KEY = env.str("DEVICE_SECRET_KEY")
PROVISIONING_KEY = env.str("PROVISIONING_KEY")
PROVISIONING_KEY_FILE = None
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS")

SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=True)
# The container's health probes talk to the web server directly, over plain HTTP.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]
SECURE_HSTS_SECONDS = env.int("DJANGO_HSTS_SECONDS", default=365 * 24 * 3600)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("DJANGO_HSTS_INCLUDE_SUBDOMAINS", default=True)
SECURE_HSTS_PRELOAD = env.bool("DJANGO_HSTS_PRELOAD", default=True)
SESSION_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=True)
CSRF_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=True)
# The dashboard's forms post from the public origin (and any extra ones configured).
_public = urlparse(PUBLIC_BASE_URL)
CSRF_TRUSTED_ORIGINS = list(
    dict.fromkeys(
        [*env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])]
        + ([f"{_public.scheme}://{_public.netloc}"] if _public.scheme and _public.netloc else [])
    )
)
STORAGES = {
    **STORAGES,  # noqa: F405
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
