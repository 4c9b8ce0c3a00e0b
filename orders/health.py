"""``/health/``: is each piece the timers need alive? Database, Redis, a worker, beat.

For load balancers and uptime probes, so it needs no credentials and says nothing a
stranger could use: no URLs, host names or versions, only ok and a short detail. Each
check is bounded (1 s), so the whole answer comes within about two seconds even when
Redis or every worker is gone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import redis
import redis.exceptions
from celery import current_app
from django.db import DatabaseError, connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone

from orders import broker
from orders.api import json_endpoint
from orders.conf import get_settings
from orders.models import SweepRun
from orders.scheduling import BROKER_ERRORS
from orders.selectors import sweep_is_overdue

#: How long Redis and the workers get to answer (seconds).
TIMEOUT = 1.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def check_database() -> Check:
    started = time.monotonic()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except DatabaseError as exc:
        return Check("database", False, f"query failed: {type(exc).__name__}")
    return Check("database", True, f"SELECT 1 in {_ms(started)}")


def check_redis() -> Check:
    started = time.monotonic()
    client = broker.redis_client(connect_timeout=TIMEOUT, timeout=TIMEOUT)
    try:
        client.ping()
    except (redis.exceptions.RedisError, OSError, ValueError) as exc:
        return Check("redis", False, f"broker PING failed: {type(exc).__name__}")
    finally:
        client.close()
    return Check("redis", True, f"PONG in {_ms(started)}")


def ping_workers(timeout: float = TIMEOUT) -> int:
    """How many Celery workers answer a broadcast ping (the first answer is enough).

    The pidbox broadcast works with the broker's ``global_keyprefix``: kombu prefixes the
    PUBLISH and SUBSCRIBE of fanout exchanges as it does the queue keys, so a worker
    answers the pings of its own deployment only."""
    return len(current_app.control.ping(timeout=timeout, limit=1) or [])


def check_workers(redis_ok: bool = True) -> Check:
    if not redis_ok:
        return Check("workers", False, "not asked: the broker is unreachable")
    started = time.monotonic()
    try:
        answered = ping_workers()
    except BROKER_ERRORS as exc:
        return Check("workers", False, f"ping failed: {type(exc).__name__}")
    if not answered:
        return Check("workers", False, f"no worker answered a ping within {TIMEOUT:g}s")
    return Check("workers", True, f"a worker answered a ping in {_ms(started)}")


def check_beat(now: datetime | None = None) -> Check:
    """Each sweep leaves a ``SweepRun``; see ``selectors.sweep_is_overdue``."""
    interval = get_settings().SWEEP_INTERVAL
    last = SweepRun.objects.order_by("-at").values_list("at", flat=True).first()
    if last is None:
        return Check("beat", False, "no sweep has ever run; is celery beat running?")
    age = ((now or timezone.now()) - last).total_seconds()
    if sweep_is_overdue(timedelta(seconds=age)):
        return Check(
            "beat",
            False,
            f"last sweep {age:.0f}s ago, more than twice SWEEP_INTERVAL ({interval}s)",
        )
    return Check("beat", True, f"last sweep {age:.0f}s ago")


def run_checks() -> list[Check]:
    database = check_database()
    broker = check_redis()
    workers = check_workers(redis_ok=broker.ok)
    beat = check_beat() if database.ok else Check("beat", False, "not asked: no database")
    return [database, broker, workers, beat]


def _ms(started: float) -> str:
    return f"{(time.monotonic() - started) * 1000:.1f} ms"


def _anyone(request: HttpRequest) -> None:
    """Health needs no credentials: it tells nothing secret."""


@json_endpoint("GET", "HEAD", authenticate=_anyone)
def health_view(request: HttpRequest) -> HttpResponse:
    checks = run_checks()
    healthy = all(check.ok for check in checks)
    body: dict[str, Any] = {
        "status": "ok" if healthy else "failing",
        "checks": {check.name: {"ok": check.ok, "detail": check.detail} for check in checks},
    }
    response = JsonResponse(body, status=200 if healthy else 503)
    response["Cache-Control"] = "no-store"
    return response
