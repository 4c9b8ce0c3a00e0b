"""``manage.py up``: set everything up and run web, worker and beat together, each
started again if it exits (config/supervise.py)."""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import sys
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from config import embedded_redis
from config.settings import BASE_DIR, VAR_DIR


def webhook_secret() -> str:
    """A fresh Standard Webhooks secret: "whsec_" + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class Command(BaseCommand):
    help = (
        "Apply migrations, create a staff login with a fresh random password, and run the "
        "web server, a Celery worker and Celery beat together (config/Procfile), starting again "
        "any that exits (config/supervise.py). "
        "Uses DATABASE_URL and REDIS_URL when set, else SQLite and an embedded Redis."
    )

    # Checked below, once the API token and webhook secret exist.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8000)))
        parser.add_argument("--username", default="admin", help="The staff login to create.")

    def handle(self, *args: Any, port: int, username: str, **options: Any) -> None:
        VAR_DIR.mkdir(exist_ok=True)  # the SQLite default and the logs live there
        embedded_redis.start_if_used()
        call_command("migrate", interactive=False, verbosity=0, skip_checks=True)
        password = secrets.token_urlsafe(12)
        user, _ = get_user_model().objects.get_or_create(
            username=username, defaults={"is_staff": True, "is_superuser": True}
        )
        user.set_password(password)
        user.save()
        user.user_permissions.add(*Permission.objects.filter(content_type__app_label="orders"))

        env = os.environ | {
            "PORT": str(port),
            "DEBUG": os.environ.get("DEBUG", "1"),  # runserver serves the admin's static files
            "SECRET_KEY": os.environ.get("SECRET_KEY") or local_secret_key(),
            "ORDERS_API_TOKEN": settings.ORDERS["API_TOKEN"] or secrets.token_urlsafe(24),
            "ORDERS_PAYMENT_WEBHOOK_SECRET": settings.ORDERS["PAYMENT_WEBHOOK_SECRET"]
            or webhook_secret(),
            "ORDERS_LOGISTICS_WEBHOOK_SECRET": settings.ORDERS["LOGISTICS_WEBHOOK_SECRET"]
            or webhook_secret(),
            "ORDERS_METRICS_TOKEN": settings.ORDERS["METRICS_TOKEN"] or secrets.token_urlsafe(24),
            "PYTHONUNBUFFERED": "1",
        }
        db = settings.DATABASES["default"]
        redis = (
            "embedded (var/, REDIS_URL not set)"
            if settings.REDIS_IS_EMBEDDED
            else settings.REDIS_URL
        )
        settings.ORDERS |= {
            "API_TOKEN": env["ORDERS_API_TOKEN"],
            "PAYMENT_WEBHOOK_SECRET": env["ORDERS_PAYMENT_WEBHOOK_SECRET"],
            "LOGISTICS_WEBHOOK_SECRET": env["ORDERS_LOGISTICS_WEBHOOK_SECRET"],
            "METRICS_TOKEN": env["ORDERS_METRICS_TOKEN"],
        }
        call_command("check")
        self.stdout.write(
            f"\n  database   {db['ENGINE'].rsplit('.', 1)[-1]} {db.get('HOST') or db['NAME']}\n"
            f"  redis      {redis}\n"
            f"  admin      http://127.0.0.1:{port}/admin/   login {username} / {password}\n"
            f"  api        http://127.0.0.1:{port}/api/orders/   "
            f"Authorization: Bearer {env['ORDERS_API_TOKEN']}\n"
            f"  metrics    http://127.0.0.1:{port}/metrics   "
            f"Authorization: Bearer {env['ORDERS_METRICS_TOKEN']}\n"
            f"  webhooks   payment secret {env['ORDERS_PAYMENT_WEBHOOK_SECRET']}\n"
            f"             logistics secret {env['ORDERS_LOGISTICS_WEBHOOK_SECRET']}\n\n"
        )
        self.stdout.flush()
        # The children run with this interpreter, so that they find the same packages.
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        os.chdir(BASE_DIR)
        os.execve(sys.executable, [sys.executable, "-m", "config.supervise"], env)


def local_secret_key() -> str:
    """A random key made on the first run and kept in var/secret_key (readable by its
    owner only), so that logins and signed cookies survive a restart."""
    path = VAR_DIR / "secret_key"
    if not path.exists():
        # O_EXCL: two `up` started at once cannot both write it.
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(50))
    return path.read_text().strip()
