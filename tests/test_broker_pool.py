"""Nothing in the web process waits on the broker for good (issue 8, item 1): not
``/health/`` under a burst of requests, not placing an order when every connection of
the process's broker pool is taken. Real server threads, a real worker."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import kombu.exceptions
import pytest
from django.test import Client
from pytest_django import Settings

from orders import get_order_model, services
from orders.models import Status
from orders.tasks import expire_order_task
from tests.chaos import wait_for
from tests.conftest import WorkerProcess

Order = get_order_model()

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

API_TOKEN = "test-api-token"


@contextmanager
def every_broker_connection_taken() -> Iterator[None]:
    """Hold every connection of this process's broker pool (``broker_pool_limit``), as
    twenty concurrent Celery pings did."""
    pool = expire_order_task.app.pool
    assert pool.limit, "the test settings keep Celery's bounded pool (broker_pool_limit)"
    held = [pool.acquire(block=False) for _ in range(pool.limit)]
    try:
        with pytest.raises(kombu.exceptions.LimitExceeded):
            pool.acquire(block=False)
        yield
    finally:
        for connection in held:
            connection.release()


def test_an_order_placed_while_every_broker_connection_is_taken_is_saved_and_swept_in_time(
    client: Client,
    celery_worker_process: WorkerProcess,
    caplog: pytest.LogCaptureFixture,
    settings: Settings,
) -> None:
    # A per-order countdown goes through the pool (a batched timer is a ZADD beside it).
    settings.ORDERS = settings.ORDERS | {"TIMER_MODE": "per_order"}
    with every_broker_connection_taken():
        started = time.monotonic()
        response = client.post(
            "/api/orders/",
            {"amount": "5.00", "timeout_seconds": 8},
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {API_TOKEN}",
        )
        took = time.monotonic() - started

    assert response.status_code == 201, response.content
    assert took < 6, f"the publish waited {took:.1f}s for a broker connection"
    order = Order.objects.get(pk=response.json()["id"])
    assert order.status == Status.CREATED
    assert order.timer_armed_for is None, "the timer was not sent, and the order says so"
    (not_armed,) = [r for r in caplog.records if getattr(r, "event", "") == "timer.not_armed"]
    assert not_armed.levelno == logging.ERROR
    assert "broker connections of this process stayed in use" in not_armed.error  # type: ignore[attr-defined]

    report = services.sweep()

    assert report.timers_armed == 1
    order.refresh_from_db()
    assert order.timer_armed_for == order.expires_at
    wait_for(
        lambda: Order.objects.get(pk=order.pk).status == Status.CANCELLED,
        30,
        "the worker to fire the timer the sweep armed",
    )
    assert list(order.history.values_list("transition", "actor")) == [
        ("place", "shop (api)"),
        ("expire", services.TIMER),
    ]


def test_health_answers_while_every_broker_connection_is_taken(
    client: Client, celery_worker_process: WorkerProcess
) -> None:
    services.sweep()
    with every_broker_connection_taken():
        started = time.monotonic()
        response = client.get("/health/", HTTP_AUTHORIZATION="Bearer test-metrics-token")
        took = time.monotonic() - started

    assert took < 5
    assert response.status_code == 200, response.content
    assert response.json()["checks"]["workers"]["ok"]


def get(url: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, **kwargs)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_hundred_concurrent_health_checks_all_answer_and_the_api_still_works(
    live_server: Any, celery_worker_process: WorkerProcess
) -> None:
    services.sweep()  # as beat does, so that the answer can be "ok"
    start = threading.Barrier(100)

    def check() -> tuple[int, dict[str, Any]]:
        start.wait()
        return get(f"{live_server.url}/health/")

    with ThreadPoolExecutor(max_workers=100) as pool:
        answers = list(pool.map(lambda _: check(), range(100)))

    assert len(answers) == 100
    for status, body in answers:
        assert (status, body) in ((200, {"status": "ok"}), (503, {"status": "failing"}))
    oks = sum(status == 200 for status, _ in answers)
    assert oks == 100, f"{100 - oks} of 100 answered 'failing' under the burst"

    status, order = get(
        f"{live_server.url}/api/orders/",
        data=json.dumps({"amount": "5.00", "timeout_seconds": 2}).encode(),
        headers={"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"},
        method="POST",
    )
    assert status == 201, order
    wait_for(
        lambda: Order.objects.get(pk=order["id"]).status == Status.CANCELLED,
        30,
        "the worker to fire the timer of the order placed after the burst",
    )
    assert list(Order.objects.get(pk=order["id"]).history.values_list("actor", flat=True)) == [
        "shop (api)",
        services.TIMER,
    ]
