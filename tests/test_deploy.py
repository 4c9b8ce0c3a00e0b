"""The host project's settings for production: no built-in secret key, HTTPS settings from
the environment, Django's deploy check clean with the documented values
(docs/examples/production.env), and settings that only read values: loading them starts
no Redis and creates no file."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from config.management.commands import up
from tests.conftest import BASE_DIR

PRODUCTION_ENV = BASE_DIR / "docs" / "examples" / "production.env"
# Settings read from the environment: none may leak from the test run into the children.
SETTINGS_VARIABLES = {
    "DEBUG",
    "SECRET_KEY",
    "ALLOWED_HOSTS",
    "CSRF_TRUSTED_ORIGINS",
    "DATABASE_URL",
    "REDIS_URL",
    "LOG_FORMAT",
    "DJANGO_SETTINGS_MODULE",
    "VAR_DIR",
}


def production_env() -> dict[str, str]:
    """docs/examples/production.env, each empty value (a secret) filled with a new one
    of its kind."""
    values = {}
    for line in PRODUCTION_ENV.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            secret = (
                up.webhook_secret()
                if name.endswith("WEBHOOK_SECRET")
                else secrets.token_urlsafe(50)
            )
            values[name] = value or secret
    return values


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without any setting, plus ``settings``."""
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in SETTINGS_VARIABLES and not k.startswith(("SECURE_", "ORDERS_"))
    }
    return base | {"DJANGO_SETTINGS_MODULE": "config.settings"} | settings


def manage(
    *args: str, env: dict[str, str], cwd: Path = BASE_DIR
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_deploy_is_clean_with_the_documented_production_settings() -> None:
    result = manage(
        "check", "--deploy", "--fail-level", "WARNING", env=clean_env(**production_env())
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_production_settings_reach_django() -> None:
    script = (
        "import django; django.setup(); from django.conf import settings as s; "
        "print(s.SECURE_PROXY_SSL_HEADER, s.SECURE_HSTS_SECONDS, s.CSRF_TRUSTED_ORIGINS, "
        "s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SECURE_SSL_REDIRECT)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=BASE_DIR,
        env=clean_env(**production_env()),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == (
        "('HTTP_X_FORWARDED_PROTO', 'https') 31536000 ['https://shop.example.com'] True True True"
    )


def test_settings_refuse_to_start_without_a_secret_key_when_debug_is_off() -> None:
    env = clean_env(**production_env())
    del env["SECRET_KEY"]

    result = manage("check", env=env)

    assert result.returncode != 0
    assert "ImproperlyConfigured: SECRET_KEY is not set." in result.stderr


def test_the_development_key_is_flagged_by_the_deploy_check() -> None:
    result = manage("check", "--deploy", env=clean_env(DEBUG="1"))

    assert result.returncode == 0, result.stderr
    assert "security.W009" in result.stderr  # SECRET_KEY starts with django-insecure-
    assert "security.W018" in result.stderr  # DEBUG on


def test_up_keeps_one_random_key_in_var_readable_by_its_owner_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(up, "VAR_DIR", tmp_path)

    first, second = up.local_secret_key(), up.local_secret_key()

    assert first == second
    assert len(first) >= 50
    assert not first.startswith("django-insecure-")
    assert stat.S_IMODE((tmp_path / "secret_key").stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "command",
    [["check"], ["makemigrations", "--check", "--dry-run"], ["check", "--deploy"]],
)
def test_loading_the_settings_starts_no_redis_and_creates_no_file(
    tmp_path: Path, command: list[str]
) -> None:
    # A copy of the host project, so that its var/ and embedded Redis socket (both
    # derived from where config/ lies) are this test's own.
    shutil.copytree(
        BASE_DIR / "config", tmp_path / "config", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(BASE_DIR / "manage.py", tmp_path)
    env = clean_env(DEBUG="1", PYTHONPATH=str(tmp_path))  # REDIS_URL unset: embedded
    socket = subprocess.run(
        [
            sys.executable,
            "-c",
            "from config import embedded_redis; print(embedded_redis.socket_path())",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert socket.startswith(str(tmp_path)), socket

    result = manage(*command, env=env, cwd=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert not (tmp_path / "var").exists()
    assert not Path(socket).exists()


def test_beat_makes_the_folder_of_its_schedule_file(tmp_path: Path) -> None:
    from config.celery import BeatScheduler, app

    filename = tmp_path / "not-yet" / "celerybeat-schedule"

    scheduler = BeatScheduler(app=app, schedule_filename=str(filename))
    try:
        assert "orders-sweep" in scheduler.schedule
    finally:
        scheduler.close()
    assert filename.parent.is_dir()
