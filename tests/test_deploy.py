"""The host project's settings only read values: loading them starts no Redis and
creates no file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BASE_DIR

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
}


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
