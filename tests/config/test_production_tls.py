"""Production settings behind HTTPS, and the server certificate made on first start."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

from config.env import BASE_DIR


def _production_env(**extra: str) -> dict[str, str]:
    from cryptography.fernet import Fernet

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "DATABASE_URL"))}
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "config.settings.production",
            "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
            "DEVICE_SECRET_KEY": secrets.token_urlsafe(32),
            "PROVISIONING_KEY": Fernet.generate_key().decode(),
            "DJANGO_ALLOWED_HOSTS": "flotilla.example.com",
            "PUBLIC_BASE_URL": "https://flotilla.example.com",
            "PYTHONPATH": str(BASE_DIR),
            **extra,
        }
    )
    return env


def test_check_deploy_under_production_settings_prints_no_warnings(tmp_path: Path) -> None:
    env = _production_env(
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}", FLOTILLA_DATA_DIR=str(tmp_path)
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "System check identified no issues" in output and "WARNING" not in output, output

    probe = (
        "import django; django.setup(); from django.conf import settings as s; "
        "print(s.CSRF_TRUSTED_ORIGINS, s.SECURE_PROXY_SSL_HEADER, s.SECURE_SSL_REDIRECT, "
        "s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SECURE_HSTS_SECONDS > 0)"
    )
    shown = subprocess.run(
        [sys.executable, "-c", probe], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == (
        "['https://flotilla.example.com'] ('HTTP_X_FORWARDED_PROTO', 'https') True True True True"
    )


def test_a_self_signed_certificate_is_made_once_and_an_operators_is_kept(tmp_path: Path) -> None:
    from config.tls import ensure_certificate, fingerprint_of, self_signed

    first = subprocess.run(
        [
            sys.executable,
            "-m",
            "config.tls",
            "--dir",
            str(tmp_path / "tls"),
            "--host",
            "flotilla.example.com",
        ],
        cwd=BASE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert first.returncode == 0, first.stderr
    cert = (tmp_path / "tls" / "cert.pem").read_bytes()
    fingerprint = fingerprint_of(cert)
    assert "generated a self-signed certificate" in first.stdout
    assert f"certificate SHA-256 fingerprint {fingerprint}" in first.stdout
    assert (tmp_path / "tls" / "key.pem").stat().st_mode & 0o077 == 0

    again = ensure_certificate(tmp_path / "tls", ["other.example"])
    assert not again.generated and again.sha256 == fingerprint

    operators = tmp_path / "operator"
    operators.mkdir()
    cert_pem, key_pem = self_signed(["fleet.example.org"])
    (operators / "cert.pem").write_bytes(cert_pem)
    (operators / "key.pem").write_bytes(key_pem)
    kept = ensure_certificate(operators, ["ignored.example"])
    assert not kept.generated and (operators / "cert.pem").read_bytes() == cert_pem
    assert kept.sha256 == fingerprint_of(cert_pem) != fingerprint
