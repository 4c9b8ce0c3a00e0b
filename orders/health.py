"""``/health/``: is each piece the timers need alive? Database, Redis, a worker, beat.

For load balancers and uptime probes: anyone gets ``{"status": "ok" | "failing"}`` (200
or 503); the detail of each check (which may name workers) needs an operator's
credentials (``api.require_operator``). It never blocks: it only reads (``SELECT 1``,
the last sweep, a Redis ``PING`` and the workers' heartbeats, ``orders.heartbeat``),
never asks a worker anything, and each probe is bounded to about a second. Concurrent
requests share one round of probes, so a burst of requests costs one database
connection and one Redis round trip at a time, not one per request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import redis
import redis.exceptions
from django.db import DatabaseError, connection, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone

from orders import broker, heartbeat
from orders.conf import get_settings
from orders.http import is_operator, json_endpoint, require_operator
from orders.selectors import format_duration, last_sweep, sweep_is_overdue

#: How long each probe may take (seconds).
TIMEOUT = 1.0
#: How long a request waits for a round of probes that another request started.
WAIT = 5 * TIMEOUT

REDIS_ERRORS = (redis.exceptions.RedisError, OSError, ValueError)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@contextmanager
def _time_limited_queries() -> Iterator[None]:
    """PostgreSQL cancels a statement that runs longer than TIMEOUT. SQLite is a local
    file whose reads wait on neither the network nor a writer (WAL), and wrapping them in
    a transaction would take its write lock (BEGIN IMMEDIATE)."""
    if connection.vendor != "postgresql":
        yield
        return
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL statement_timeout = {int(TIMEOUT * 1000)}")
        yield


def check_database() -> Check:
    started = time.monotonic()
    try:
        with _time_limited_queries(), connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except DatabaseError as exc:
        return Check("database", False, f"query failed: {type(exc).__name__}")
    return Check("database", True, f"SELECT 1 in {_ms(started)}")


def check_beat(now: datetime | None = None) -> Check:
    """Each sweep leaves a ``SweepRun``; see ``selectors.sweep_is_overdue``."""
    interval = get_settings().SWEEP_INTERVAL
    try:
        with _time_limited_queries():
            last = last_sweep()
    except DatabaseError as exc:
        return Check("beat", False, f"query failed: {type(exc).__name__}")
    if last is None:
        return Check("beat", False, "no sweep has ever run; is celery beat running?")
    age = ((now or timezone.now()) - last.at).total_seconds()
    if sweep_is_overdue(timedelta(seconds=age)):
        return Check(
            "beat",
            False,
            f"last sweep {format_duration(age)} ago, more than twice SWEEP_INTERVAL ({interval}s)",
        )
    return Check("beat", True, f"last sweep {format_duration(age)} ago")


def check_redis(client: redis.Redis) -> Check:
    started = time.monotonic()
    try:
        client.ping()
    except REDIS_ERRORS as exc:
        return Check("redis", False, f"broker PING failed: {type(exc).__name__}")
    return Check("redis", True, f"PONG in {_ms(started)}")


def check_workers(client: redis.Redis) -> Check:
    try:
        workers = heartbeat.live_workers(client)
    except REDIS_ERRORS as exc:
        return Check("workers", False, f"heartbeats unreadable: {type(exc).__name__}")
    if not workers:
        return Check(
            "workers",
            False,
            f"no worker heartbeat within {heartbeat.TTL}s; is a celery worker running?",
        )
    names = ", ".join(f"{w.name} ({format_duration(w.age)} ago)" for w in workers)
    return Check("workers", True, f"{len(workers)} alive, last heartbeat: {names}")


def run_checks() -> list[Check]:
    database = check_database()
    beat = check_beat() if database.ok else Check("beat", False, "not asked: no database")
    client = broker.redis_client(connect_timeout=TIMEOUT, timeout=TIMEOUT)
    try:
        redis_check = check_redis(client)
        workers = (
            check_workers(client)
            if redis_check.ok
            else Check("workers", False, "not asked: the broker is unreachable")
        )
    finally:
        client.close()
    return [database, redis_check, workers, beat]


@dataclass
class _Round:
    """One run of the probes, whose answer every request that arrives meanwhile shares."""

    done: threading.Event = field(default_factory=threading.Event)
    checks: list[Check] = field(default_factory=list)


_lock = threading.Lock()
_current: _Round | None = None


def shared_checks() -> list[Check]:
    """The checks, probed by this request or by the round already under way. No answer
    is kept once its round is over: each request gets one no older than its arrival."""
    global _current
    with _lock:
        round_, leader = (_current, False) if _current else (_Round(), True)
        _current = round_
    if leader:
        try:
            round_.checks = run_checks()
        finally:
            with _lock:
                _current = None
            round_.done.set()
    elif not round_.done.wait(WAIT):
        return [Check("health", False, f"the checks did not answer within {WAIT:g}s")]
    return round_.checks


def _ms(started: float) -> str:
    return f"{(time.monotonic() - started) * 1000:.1f} ms"


def _anyone(request: HttpRequest) -> None:
    """The summary needs no credentials: ok or failing tells nothing secret."""


def shows_details(request: HttpRequest) -> bool:
    """An operator's login, or a request that sends a token: a wrong token is refused
    (401) rather than quietly answered with the summary, so that a misconfigured
    monitor notices."""
    if "Authorization" not in request.headers and not is_operator(request):
        return False
    require_operator(request)
    return True


@json_endpoint("GET", "HEAD", authenticate=_anyone)
def health_view(request: HttpRequest) -> HttpResponse:
    details = shows_details(request)
    checks = shared_checks()
    healthy = all(check.ok for check in checks)
    body: dict[str, Any] = {"status": "ok" if healthy else "failing"}
    if details:
        body["checks"] = {check.name: {"ok": check.ok, "detail": check.detail} for check in checks}
    response = JsonResponse(body, status=200 if healthy else 503)
    response["Cache-Control"] = "no-store"
    return response
