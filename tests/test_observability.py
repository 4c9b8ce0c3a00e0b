"""What the people who run the shop see: metrics at /metrics, the health check at
/health/, and structured (JSON) logs of every transition and timer event."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import kombu.exceptions
import kombu.pools
import pytest
import redis
from celery import current_app
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families
from pytest_django import DjangoCaptureOnCommitCallbacks, Settings

from orders import broker, heartbeat, scheduling, services
from orders.logging import JsonFormatter
from orders.models import PaymentAttempt, SweepRun
from orders.tasks import expire_order_task
from tests.conftest import BASE_DIR, WorkerProcess

#: The operators' read-only token (/metrics, /health/ details), and the API's.
TOKEN = {"HTTP_AUTHORIZATION": "Bearer test-metrics-token"}
API_TOKEN = {"HTTP_AUTHORIZATION": "Bearer test-api-token"}


def operator(username: str = "operator") -> User:
    """A staff member allowed to view orders."""
    user = User.objects.create_user(username, is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_order"))
    return user


def scrape(client: Client) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """``{family: {(sample name, labels): value}}`` of a scrape of /metrics."""
    response = client.get("/metrics", **TOKEN)  # type: ignore[arg-type]
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    families: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for family in text_string_to_metric_families(response.content.decode()):
        families[family.name] = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for sample in family.samples
        }
    return families


# /metrics --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_metrics_count_orders_expiries_lateness_timers_and_refunds(client: Client) -> None:
    now = timezone.now()
    t0 = now - timedelta(hours=1)
    on_time = services.place_order(amount="10.00", timeout=10, now=t0)
    services.expire_order(order_id=on_time.pk, now=on_time.expires_at + timedelta(seconds=0.3))
    lost = services.place_order(amount="10.00", timeout=10, now=t0)
    services.expire_order(
        order_id=lost.pk, by=services.SWEEP, now=lost.expires_at + timedelta(seconds=40)
    )
    # A payment 1.5 s after the deadline, before the timer: it expires the order itself,
    # and is kept to be refunded (its refund task never runs here: no commit).
    paid_late = services.place_order(amount="10.00", timeout=10, now=t0)
    services.record_payment(
        order_id=paid_late.pk,
        payment_ref="late-1",
        amount="10.00",
        now=paid_late.expires_at + timedelta(seconds=1.5),
    )
    overdue = services.place_order(amount="10.00", timeout=10, now=t0)  # timer lost
    services.place_order(amount="10.00", timeout=600, now=now)  # waiting, timer armed
    paid = services.place_order(amount="10.00", timeout=600, now=now)
    services.record_payment(order_id=paid.pk, payment_ref="paid-1", amount="10.00", now=now)
    SweepRun.objects.create(at=now - timedelta(seconds=5), expired=1, max_lateness=40.0)

    metrics = scrape(client)

    assert metrics["orders_by_status"] == {
        ("orders_by_status", (("status", "created"),)): 2,
        ("orders_by_status", (("status", "paid"),)): 1,
        ("orders_by_status", (("status", "delivered"),)): 0,
        ("orders_by_status", (("status", "refunded"),)): 0,
        ("orders_by_status", (("status", "cancelled"),)): 3,
    }
    assert metrics["orders_expiries"] == {
        ("orders_expiries_total", (("actor", "timer"),)): 1,
        ("orders_expiries_total", (("actor", "sweep"),)): 1,
        ("orders_expiries_total", (("actor", "payment"),)): 1,
        ("orders_expiries_total", (("actor", "other"),)): 0,
    }
    # Lateness 0.3 s, 1.5 s and 40 s, cumulative per bucket.
    lateness = metrics["orders_expiry_lateness_seconds"]
    buckets = {
        dict(labels)["le"]: value
        for (name, labels), value in lateness.items()
        if name.endswith("_bucket")
    }
    assert buckets == {
        "0.1": 0,
        "0.25": 0,
        "0.5": 1,
        "1.0": 1,
        "2.0": 2,
        "5.0": 2,
        "10.0": 2,
        "30.0": 2,
        "60.0": 3,
        "300.0": 3,
        "+Inf": 3,
    }
    assert lateness[("orders_expiry_lateness_seconds_count", ())] == 3
    assert lateness[("orders_expiry_lateness_seconds_sum", ())] == pytest.approx(41.8)

    # The overdue order's timer was armed (and lost); the waiting order's is armed.
    assert metrics["orders_timers_pending"] == {("orders_timers_pending", ()): 2}
    assert metrics["orders_unpaid_overdue"] == {("orders_unpaid_overdue", ()): 1}
    oldest = metrics["orders_unpaid_overdue_max_seconds"][("orders_unpaid_overdue_max_seconds", ())]
    assert oldest == pytest.approx((now - overdue.expires_at).total_seconds(), abs=5)

    assert metrics["orders_sweep_last_expired"] == {("orders_sweep_last_expired", ()): 1}
    assert metrics["orders_sweep_last_max_lateness_seconds"] == {
        ("orders_sweep_last_max_lateness_seconds", ()): 40.0
    }
    swept_at = metrics["orders_sweep_last_run_timestamp_seconds"]
    assert swept_at == {
        ("orders_sweep_last_run_timestamp_seconds", ()): pytest.approx(now.timestamp() - 5)
    }

    # The late payment waits for its refund, and has for an hour: past SHIPPING_RETRY_AFTER.
    assert metrics["orders_refunds_pending"] == {("orders_refunds_pending", ()): 1}
    assert metrics["orders_refunds_failing"] == {("orders_refunds_failing", ()): 1}
    assert metrics["orders_shipments_pending"] == {("orders_shipments_pending", ()): 1}
    assert metrics["orders_shipments_stuck"] == {("orders_shipments_stuck", ()): 0}


@pytest.mark.django_db
def test_metrics_say_how_long_the_oldest_due_timer_bucket_has_waited_for_a_waker(
    client: Client, timers_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def lag() -> float:
        family = scrape(client)["orders_timer_waker_lag_seconds"]
        return family[("orders_timer_waker_lag_seconds", ())]

    assert lag() == 0
    now_ms = time.time() * 1000
    # Due 5 s ago, due 2 s ago, and one a waker holds (its lease moved it ahead).
    broker.redis_client().zadd(
        timers_key,
        {"expire:1": now_ms - 5000, "expire:2": now_ms - 2000, "remind:3": now_ms + 9000},
    )
    assert lag() == pytest.approx(5, abs=1)

    monkeypatch.setattr(scheduling, "_redis", lambda: redis.Redis(port=1))  # nothing listens
    assert math.isnan(lag())


def _attempted(attempt_ref: str, **hold: Any) -> Any:
    """An unpaid order due in ten minutes whose customer started paying by card."""
    order = services.place_order(amount="10.00", timeout=600)
    services.start_payment(order_id=order.pk, attempt_ref=attempt_ref, method="card", **hold)
    return order


@pytest.mark.django_db
def test_metrics_count_orders_held_by_a_payment_and_attempts_still_to_close(
    client: Client,
) -> None:
    # Attempt references of this test's own: the local gateway keeps them in Redis.
    run = uuid.uuid4().hex[:8]
    _attempted(f"held-{run}", hold_for=900)
    _attempted(f"short-{run}", hold_for=60)  # within the deadline, but paying all the same
    paid = _attempted(f"paid-{run}")
    services.record_payment(
        order_id=paid.pk, payment_ref=f"pay-{run}", amount="10.00", attempt_ref=f"paid-{run}"
    )
    # Cancelled while paying: the attempts are closed here, and owed a close at the
    # provider (its task runs on commit, which a test transaction never reaches).
    for name in ("cancelled", "told"):
        order = _attempted(f"{name}-{run}")
        services.cancel_order(order_id=order.pk, by="customer")
    services.close_payment(attempt_id=PaymentAttempt.objects.get(reference=f"told-{run}").pk)
    services.place_order(amount="10.00", timeout=600)  # nobody is paying

    metrics = scrape(client)

    assert metrics["orders_held"] == {("orders_held", ()): 2}
    assert metrics["orders_payment_closes_pending"] == {("orders_payment_closes_pending", ()): 1}


@pytest.mark.django_db
def test_no_payment_close_is_pending_with_a_gateway_that_cannot_close_payments(
    client: Client, settings: Any
) -> None:
    order = _attempted(f"att-{uuid.uuid4().hex[:8]}")
    services.cancel_order(order_id=order.pk, by="customer")
    settings.ORDERS = settings.ORDERS | {
        "PAYMENT_GATEWAY": "tests.test_payment_attempts.RefundsOnly"
    }

    metrics = scrape(client)

    assert metrics["orders_payment_closes_pending"] == {("orders_payment_closes_pending", ()): 0}
    assert metrics["orders_held"] == {("orders_held", ()): 0}


@pytest.mark.django_db
def test_metrics_of_an_empty_shop_are_zeros_and_a_never_run_sweep(client: Client) -> None:
    metrics = scrape(client)

    assert set(metrics["orders_by_status"].values()) == {0}
    assert metrics["orders_expiry_lateness_seconds"][
        ("orders_expiry_lateness_seconds_count", ())
    ] == (0)
    assert metrics["orders_sweep_last_run_timestamp_seconds"] == {
        ("orders_sweep_last_run_timestamp_seconds", ()): 0
    }


@pytest.mark.django_db
def test_metrics_speak_openmetrics_to_a_scraper_that_asks(client: Client) -> None:
    response = client.get(
        "/metrics",
        HTTP_ACCEPT="application/openmetrics-text; version=1.0.0",
        **TOKEN,  # type: ignore[arg-type]
    )

    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/openmetrics-text")
    assert response.content.rstrip().endswith(b"# EOF")


@pytest.mark.django_db
def test_metrics_fall_back_to_the_text_format_on_an_unreadable_accept_header(
    client: Client,
) -> None:
    for accept in (
        "application/openmetrics-text; version=abc",
        "text/plain; version=1.x.0",
        "application/openmetrics-text; version=1e400",
    ):
        response = client.get("/metrics", HTTP_ACCEPT=accept, **TOKEN)  # type: ignore[arg-type]

        assert response.status_code == 200, accept
        assert response["Content-Type"].startswith("text/plain; version=0.0.4"), accept
        assert b"orders_by_status" in response.content


@pytest.mark.django_db
def test_metrics_need_the_metrics_token_or_a_staff_login_allowed_to_view_orders(
    client: Client,
) -> None:
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    # The API's token places and cancels orders: a scraper does not get it.
    assert client.get("/metrics", **API_TOKEN).status_code == 401  # type: ignore[arg-type]

    client.force_login(User.objects.create_user("customer"))
    assert client.get("/metrics").status_code == 401, "a login alone is not enough"
    client.force_login(User.objects.create_user("clerk", is_staff=True))
    assert client.get("/metrics").status_code == 401, "staff without orders.view_order"

    client.force_login(operator())
    response = client.get("/metrics")
    assert response.status_code == 200
    assert b"orders_by_status" in response.content


@pytest.mark.django_db
def test_metrics_refuse_bearer_access_without_a_metrics_token(
    client: Client, settings: Any
) -> None:
    settings.ORDERS = settings.ORDERS | {"METRICS_TOKEN": ""}

    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer ")
    assert response.status_code == 503
    assert "METRICS_TOKEN" in response.json()["error"]
    client.force_login(operator())
    assert client.get("/metrics").status_code == 200, "operators still get in"


@pytest.mark.django_db
def test_metrics_refuse_anything_but_get(client: Client) -> None:
    response = client.post("/metrics", **TOKEN)  # type: ignore[arg-type]

    assert response.status_code == 405
    assert response["Allow"] == "GET"


# /health/ --------------------------------------------------------------------------------


def health(client: Client, **headers: str) -> tuple[int, dict[str, Any]]:
    response = client.get("/health/", **headers)  # type: ignore[arg-type]
    assert response["Content-Type"] == "application/json"
    return response.status_code, response.json()


def use_own_heartbeats(monkeypatch: pytest.MonkeyPatch) -> redis.Redis:
    """Keys of a deployment of this test's own, so that the suite's worker's heartbeat
    is not seen; a client on the broker's Redis."""
    options = current_app.conf.broker_transport_options | {
        "global_keyprefix": f"orders-hb-{uuid.uuid4().hex[:8]}:"
    }
    monkeypatch.setitem(current_app.conf, "broker_transport_options", options)
    return broker.redis_client()


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_health_is_ok_with_the_database_redis_a_worker_heartbeat_and_a_recent_sweep(
    client: Client, celery_worker_process: WorkerProcess
) -> None:
    services.sweep()  # as beat does

    status, body = health(client, **TOKEN)

    assert status == 200, body
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "redis", "workers", "beat"}
    assert all(check["ok"] for check in body["checks"].values()), body
    assert "alive, last heartbeat: suite@" in body["checks"]["workers"]["detail"]


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_health_is_503_when_beat_has_not_swept_for_two_intervals(
    client: Client, celery_worker_process: WorkerProcess
) -> None:
    status, body = health(client, **TOKEN)
    assert status == 503
    assert body["status"] == "failing"
    assert body["checks"]["beat"] == {
        "ok": False,
        "detail": "no sweep has ever run; is celery beat running?",
    }
    assert body["checks"]["workers"]["ok"], "only beat is missing"

    interval = settings.ORDERS["SWEEP_INTERVAL"]
    SweepRun.objects.create(at=timezone.now() - timedelta(seconds=2 * interval + 5))
    status, body = health(client, **TOKEN)
    assert status == 503
    assert "more than twice SWEEP_INTERVAL" in body["checks"]["beat"]["detail"]


@pytest.mark.django_db
def test_health_is_503_without_reading_heartbeats_when_redis_is_unreachable(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    SweepRun.objects.create()
    monkeypatch.setattr(current_app.conf, "broker_url", "redis://:s3cret@127.0.0.1:1/0")

    status, body = health(client, **TOKEN)

    assert status == 503
    assert body["checks"]["database"]["ok"]
    assert body["checks"]["beat"]["ok"]
    assert body["checks"]["redis"] == {"ok": False, "detail": "broker PING failed: ConnectionError"}
    assert body["checks"]["workers"] == {
        "ok": False,
        "detail": "not asked: the broker is unreachable",
    }
    text = json.dumps(body)
    assert "s3cret" not in text, "the health check must not reveal the broker's URL"
    assert "127.0.0.1" not in text


@pytest.mark.django_db
def test_workers_count_as_alive_only_while_their_heartbeat_is_fresh(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    SweepRun.objects.create()
    redis_client = use_own_heartbeats(monkeypatch)
    status, body = health(client, **TOKEN)
    assert status == 503
    assert body["checks"]["workers"] == {
        "ok": False,
        "detail": "no worker heartbeat within 30s; is a celery worker running?",
    }

    heartbeat.beat(redis_client, "w1@shop")
    # A worker whose last beat is older than the TTL is gone, even if still listed.
    seconds, _ = redis_client.time()
    redis_client.zadd(heartbeat.heartbeat_key(), {"w2@shop": seconds - heartbeat.TTL - 1})
    status, body = health(client, **TOKEN)
    assert status == 200, body
    detail = body["checks"]["workers"]["detail"]
    assert detail.startswith("1 alive, last heartbeat: w1@shop (0s ago)"), detail
    assert "w2@shop" not in detail

    # A worker that stops says so at once.
    heartbeat.forget(redis_client, "w1@shop")
    assert health(client, **TOKEN)[0] == 503
    assert redis_client.ttl(heartbeat.heartbeat_key()) <= heartbeat.TTL


@pytest.mark.django_db
def test_health_tells_anyone_only_ok_or_failing(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    SweepRun.objects.create()
    heartbeat.beat(use_own_heartbeats(monkeypatch), "w1@shop")

    response = client.get("/health/")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    assert response["Cache-Control"] == "no-store"
    assert client.head("/health/").status_code == 200

    SweepRun.objects.all().delete()
    response = client.get("/health/")
    assert (response.status_code, response.json()) == (503, {"status": "failing"})


@pytest.mark.django_db
def test_health_details_need_the_metrics_token_or_an_operator_login(client: Client) -> None:
    status, body = health(client, HTTP_AUTHORIZATION="Bearer wrong")
    assert status == 401
    assert body == {"error": "The metrics token is not valid."}
    # The API's write token is not an operator's credential.
    assert health(client, **API_TOKEN)[0] == 401
    assert "checks" in health(client, **TOKEN)[1]

    client.force_login(User.objects.create_user("clerk", is_staff=True))
    assert set(health(client)[1]) == {"status"}, "staff without orders.view_order"
    client.force_login(operator())
    assert set(health(client)[1]) == {"status", "checks"}


# Logs ------------------------------------------------------------------------------------


def test_json_formatter_writes_one_object_per_line_with_the_extra_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.json_formatter")
    logger.addHandler(handler)
    logger.propagate = False
    order_id = uuid.uuid4()
    try:
        logger.warning(
            "Order %s expired, %.3fs late.",
            order_id,
            0.25,
            extra={"event": "order.expired", "order_id": order_id, "amount": Decimal("9.90")},
        )
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("It failed\non two lines", extra={"event": "test.failed"})
    finally:
        logger.removeHandler(handler)

    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first.pop("time").endswith("+00:00")
    assert first == {
        "level": "WARNING",
        "logger": "tests.json_formatter",
        "message": f"Order {order_id} expired, 0.250s late.",
        "event": "order.expired",
        "order_id": str(order_id),
        "amount": "9.90",
    }
    assert second["message"] == "It failed\non two lines"
    assert second["event"] == "test.failed"
    assert "ValueError: boom" in second["exception"]


def test_log_format_json_turns_the_host_projects_logs_into_json() -> None:
    script = (
        "import django, logging; django.setup(); "
        "logging.getLogger('orders').info('hello %s', 'there', "
        "extra={'event': 'test.hello', 'order_id': 'o-1'})"
    )
    env = os.environ | {
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "LOG_FORMAT": "json",
        "REDIS_URL": settings.CELERY_BROKER_URL,
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    entry = json.loads(result.stderr.strip().splitlines()[-1])
    assert entry["message"] == "hello there"
    assert (entry["level"], entry["logger"]) == ("INFO", "orders")
    assert (entry["event"], entry["order_id"]) == ("test.hello", "o-1")


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


@pytest.mark.django_db
def test_timer_events_carry_structured_fields(
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    settings.ORDERS = settings.ORDERS | {"TIMER_MODE": "per_order"}  # a countdown's events
    monkeypatch.setattr(expire_order_task, "apply_async", lambda *args, **kwargs: None)
    caplog.set_level(logging.INFO, logger="orders")

    with django_capture_on_commit_callbacks(execute=True):
        order = services.place_order(amount="10.00", timeout=60)
    services.expire_order(order_id=order.pk, now=order.expires_at + timedelta(seconds=0.25))
    services.expire_order(order_id=order.pk, now=order.expires_at + timedelta(seconds=1))

    (placed,) = events(caplog, "order.placed")
    assert placed.order_id == str(order.pk)  # type: ignore[attr-defined]
    assert placed.timeout_s == 60  # type: ignore[attr-defined]
    (armed,) = events(caplog, "timer.armed")
    assert armed.order_id == str(order.pk)  # type: ignore[attr-defined]
    assert 59 < armed.countdown_s <= 60  # type: ignore[attr-defined]
    (expired,) = events(caplog, "order.expired")
    assert expired.order_id == str(order.pk)  # type: ignore[attr-defined]
    assert expired.actor == "expiry timer"  # type: ignore[attr-defined]
    assert expired.lateness_s == pytest.approx(0.25)  # type: ignore[attr-defined]
    (noop,) = events(caplog, "timer.noop")
    assert noop.reason == "not unpaid"  # type: ignore[attr-defined]
    assert noop.detail == "it is cancelled"  # type: ignore[attr-defined]


@pytest.mark.django_db
def test_a_timer_the_broker_refused_is_logged_as_not_armed(
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    settings.ORDERS = settings.ORDERS | {"TIMER_MODE": "per_order"}  # a countdown's events

    def broker_down(*args: Any, **kwargs: Any) -> None:
        raise kombu.exceptions.OperationalError("connection refused")

    monkeypatch.setattr(expire_order_task, "apply_async", broker_down)

    with django_capture_on_commit_callbacks(execute=True):
        order = services.place_order(amount="10.00", timeout=60)

    (record,) = events(caplog, "timer.not_armed")
    assert record.levelno == logging.ERROR
    assert record.order_id == str(order.pk)  # type: ignore[attr-defined]
    assert record.error == "connection refused"  # type: ignore[attr-defined]


@pytest.mark.django_db
def test_payments_and_sweeps_log_their_outcome_and_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="orders")
    t0 = timezone.now() - timedelta(minutes=5)
    order = services.place_order(amount="10.00", timeout=10, now=t0)
    services.sweep()
    services.record_payment(order_id=order.pk, payment_ref="late-2", amount="10.00")

    (done,) = events(caplog, "sweep.done")
    assert done.expired == 1  # type: ignore[attr-defined]
    assert done.max_lateness_s == pytest.approx(290, abs=5)  # type: ignore[attr-defined]
    (payment,) = events(caplog, "payment.recorded")
    assert payment.outcome == "late"  # type: ignore[attr-defined]
    assert payment.order_id == str(order.pk)  # type: ignore[attr-defined]
