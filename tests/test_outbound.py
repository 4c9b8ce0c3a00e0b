"""Outbound webhooks against a real HTTP server on 127.0.0.1, sent by the real worker.

The test settings allow private addresses (the servers are local), a 1 s timeout and a
1 s first backoff; the SSRF tests turn the private addresses off again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from pytest_django.fixtures import Settings
from standardwebhooks.webhooks import Webhook

from orders import outbound, services
from orders.conf import get_settings
from orders.models import (
    AbstractOrder,
    OrderTransition,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from tests.conftest import WorkerProcess

API_AUTH = {"Authorization": "Bearer test-api-token"}


class Receiver:
    """A real HTTP endpoint on 127.0.0.1. Its port is bound at once but refuses
    connections until ``listen()``. The n-th request of each ``webhook-id`` is answered
    as ``script[n]`` says (the last entry for any later one): ``"ok"`` (204), ``"500"``, or
    ``"slow"`` (answers only when released, or after 5 s: past WEBHOOK_TIMEOUT)."""

    def __init__(self, *script: str) -> None:
        self.script = list(script) or ["ok"]
        self.requests: list[tuple[dict[str, str], bytes, str]] = []
        self.arrived: list[float] = []  # time.monotonic() of each request
        self.release = threading.Event()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {name.lower(): value for name, value in self.headers.items()}
                with receiver.lock:
                    seen = sum(
                        1
                        for h, _, _ in receiver.requests
                        if h["webhook-id"] == headers["webhook-id"]
                    )
                    how = receiver.script[min(seen, len(receiver.script) - 1)]
                    receiver.requests.append((headers, body, how))
                    receiver.arrived.append(time.monotonic())
                if how == "slow":
                    receiver.release.wait(timeout=5)
                try:
                    self.send_response(500 if how == "500" else 204)
                    self.end_headers()
                except OSError:  # the sender gave up waiting
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self.server.daemon_threads = True
        self.server.server_bind()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread: threading.Thread | None = None

    def listen(self) -> None:
        self.server.server_activate()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        if self.thread is not None:
            self.server.shutdown()
        self.server.server_close()

    def ids(self) -> list[str]:
        return [headers["webhook-id"] for headers, _, _ in self.requests]


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(*script: str, listening: bool = True) -> Receiver:
        receiver = Receiver(*script)
        if listening:
            receiver.listen()
        made.append(receiver)
        return receiver

    yield make
    for receiver in made:
        receiver.close()


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 15) -> None:
    """Wait for ``predicate``, acting as beat meanwhile: due retries are queued to the
    worker (``send_due``) every 0.2 s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        outbound.send_due()
        time.sleep(0.2)


def attempts_of(delivery: WebhookDelivery) -> list[WebhookAttempt]:
    return list(delivery.attempts_made.order_by("at", "id"))


def each_tried(endpoint: WebhookEndpoint, times: int, count: int) -> Callable[[], bool]:
    def tried() -> bool:
        deliveries = WebhookDelivery.objects.filter(endpoint=endpoint)
        return len(deliveries) == count and all(
            d.attempts_made.count() >= times for d in deliveries
        )

    return tried


# Delivery, end to end ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_an_endpoint_that_refuses_times_out_and_fails_gets_every_event_signed_once_it_recovers(
    celery_worker_process: WorkerProcess,
    receivers: Callable[..., Receiver],
    client: Client,
) -> None:
    # Refusing connections at first; then, per event, a timeout, a 500, and a 204.
    receiver = receivers("slow", "500", "ok", listening=False)
    endpoint = WebhookEndpoint.objects.create(
        url=receiver.url, event_types=["order.placed", "order.cancelled"]
    )
    order = services.place_order(amount="10.00", timeout=600)
    services.cancel_order(order_id=order.pk, by="customer", reason="changed my mind")

    wait_for(each_tried(endpoint, 1, count=2), "both events to be tried once (refused)")
    receiver.listen()
    wait_for(each_tried(endpoint, 2, count=2), "the second try of both (timed out)")
    wait_for(
        lambda: (
            WebhookDelivery.objects.filter(endpoint=endpoint, delivered_at__isnull=False).count()
            == 2
        ),
        "both events to be delivered",
        timeout=20,
    )

    events = {e.event_id: e for e in OrderTransition.objects.filter(order_id=order.pk)}
    api_order = client.get(f"/api/orders/{order.pk}/", headers=API_AUTH).json()
    for delivery in WebhookDelivery.objects.filter(endpoint=endpoint).select_related("event"):
        assert delivery.next_attempt_at is None
        assert delivery.gave_up_at is None
        assert delivery.attempts == 3  # failed ones; the fourth was taken
        tries = attempts_of(delivery)
        assert [t.status_code for t in tries] == [None, None, 500, 204]
        assert "ConnectError" in tries[0].error
        assert tries[1].error.startswith("timed out after 1s")
        assert tries[1].latency_ms >= 900
        assert all(t.latency_ms > 0 for t in tries)
        # Every retry of one event carries its one webhook-id: the receiver dedupes on it.
        sent = [
            (headers, body)
            for headers, body, _ in receiver.requests
            if headers["webhook-id"] == str(delivery.event.event_id)
        ]
        assert len(sent) == 3
        for headers, body in sent:
            message = Webhook(endpoint.secret).verify(body, headers)
            assert headers["content-type"] == "application/json"
            assert message["type"] == delivery.event.event_type
            assert message["timestamp"] == delivery.event.at.isoformat()
            # The order as the API returns it at send time (cancelled, for both events).
            assert message["data"] == api_order
    assert {events[e].event_type for e in events if str(e) in receiver.ids()} == {
        "order.placed",
        "order.cancelled",
    }


@pytest.mark.django_db(transaction=True)
def test_a_slow_endpoint_holds_back_no_other(
    celery_worker_process: WorkerProcess, receivers: Callable[..., Receiver]
) -> None:
    slow, fast = receivers("slow"), receivers("ok")
    # The slow one first: a sender that went through endpoints in turn would wait on it.
    slow_endpoint = WebhookEndpoint.objects.create(url=slow.url)
    WebhookEndpoint.objects.create(url=fast.url)

    order = services.place_order(amount="10.00", timeout=600)

    wait_for(lambda: fast.requests and slow.requests, "both endpoints to be called")
    assert fast.ids() == slow.ids() == [str(order.history.get().event_id)]
    # The fast one was called while the slow one's request still waited for its answer.
    assert fast.arrived[0] - slow.arrived[0] < get_settings().WEBHOOK_TIMEOUT
    wait_for(
        lambda: WebhookAttempt.objects.filter(delivery__endpoint=slow_endpoint).exists(),
        "the slow endpoint's timeout to be recorded",
    )


# Give-up, SSRF, the periodic pick-up (in this process) -------------------------------------


def make_delivery(endpoint: WebhookEndpoint, *, age: timedelta = timedelta(0)) -> WebhookDelivery:
    order = services.place_order(amount="10.00", timeout=600)
    now = timezone.now()
    return WebhookDelivery.objects.create(
        event=order.history.get(),
        endpoint=endpoint,
        next_attempt_at=now,
        created_at=now - age,
    )


@pytest.mark.django_db
def test_a_delivery_failing_past_the_give_up_time_is_given_up_and_a_younger_one_backs_off(
    receivers: Callable[..., Receiver],
) -> None:
    receiver = receivers("500")
    endpoint = WebhookEndpoint.objects.create(url=receiver.url)
    give_up_after = timedelta(seconds=get_settings().WEBHOOK_GIVE_UP_AFTER)
    old = make_delivery(endpoint, age=give_up_after + timedelta(seconds=1))
    young = make_delivery(endpoint, age=give_up_after - timedelta(minutes=1))

    assert outbound.send([old.pk]) == 0
    assert outbound.send([young.pk]) == 0

    old.refresh_from_db()
    assert old.gave_up_at is not None
    assert old.next_attempt_at is None
    assert old.attempts == 1
    young.refresh_from_db()
    assert young.gave_up_at is None
    assert young.attempts == 1
    assert young.next_attempt_at is not None
    backoff = (young.next_attempt_at - young.attempts_made.get().at).total_seconds()
    assert 1 <= backoff < 2  # WEBHOOK_RETRY_BACKOFF, once
    assert [t.status_code for t in attempts_of(old)] == [500]
    # Nothing is tried again once given up, nor before its time.
    assert outbound.send([old.pk, young.pk]) == 0
    assert len(receiver.requests) == 2


@pytest.mark.django_db
def test_after_a_failure_the_other_deliveries_of_that_endpoint_wait_for_a_later_run(
    receivers: Callable[..., Receiver],
) -> None:
    receiver = receivers("500")
    endpoint = WebhookEndpoint.objects.create(url=receiver.url)
    first, second = make_delivery(endpoint), make_delivery(endpoint)

    assert outbound.send([first.pk, second.pk]) == 0

    assert len(receiver.requests) == 1
    second.refresh_from_db()
    assert second.attempts == 0
    assert second.next_attempt_at is not None
    assert second.next_attempt_at <= timezone.now()  # still due: the next run takes it


@pytest.mark.django_db
def test_the_periodic_pick_up_takes_a_bounded_batch_per_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(outbound, "PER_ENDPOINT_PER_RUN", 3)
    busy = WebhookEndpoint.objects.create(url="http://192.0.2.1/busy")
    quiet = WebhookEndpoint.objects.create(url="http://192.0.2.2/quiet")
    later = WebhookEndpoint.objects.create(url="http://192.0.2.3/later")
    off = WebhookEndpoint.objects.create(url="http://192.0.2.4/off", active=False)
    pending = [make_delivery(busy) for _ in range(5)]
    waiting = make_delivery(quiet)
    WebhookDelivery.objects.filter(pk=make_delivery(later).pk).update(
        next_attempt_at=timezone.now() + timedelta(hours=1)
    )
    make_delivery(off)
    done = make_delivery(quiet)
    WebhookDelivery.objects.filter(pk=done.pk).update(
        delivered_at=timezone.now(), next_attempt_at=None
    )

    batches = sorted(outbound.due_batches(), key=len)

    assert batches == [[str(waiting.pk)], [str(d.pk) for d in pending[:3]]]


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("http://127.0.0.1:8000/hook", "127.0.0.1, a loopback address"),
        ("http://localhost/hook", "a loopback address"),
        ("http://10.1.2.3/hook", "10.1.2.3, a private address"),
        ("http://169.254.169.254/latest/meta-data/", "a link-local address"),
        ("http://[::ffff:127.0.0.1]/hook", "a loopback address"),
        ("http://[::1]/hook", "::1, a loopback address"),
        ("http://100.64.0.1/hook", "a non-public address"),
        ("http://0.0.0.0/hook", "an unspecified address"),
        ("ftp://192.0.2.1/hook", "must be http:// or https://"),
        ("http://no-such-host.invalid/hook", "could not be resolved"),
    ],
)
@pytest.mark.django_db
def test_the_endpoint_form_refuses_urls_inside_the_network_and_changes_nothing(
    admin_client: Client, settings: Settings, url: str, said: str
) -> None:
    settings.ORDERS = settings.ORDERS | {"WEBHOOK_ALLOW_PRIVATE": False}
    existing = WebhookEndpoint.objects.create(url="http://93.184.215.14/hook")
    form = {"url": url, "description": "internal", "event_types": ["order.paid"], "active": "on"}

    added = admin_client.post(reverse("admin:orders_webhookendpoint_add"), form)
    changed = admin_client.post(
        reverse("admin:orders_webhookendpoint_change", args=[existing.pk]), form
    )

    for response in (added, changed):
        assert response.status_code == 200  # the form again, with the error
        errors = response.context["adminform"].form.errors["url"]
        assert any(said in error for error in errors), errors
    assert list(WebhookEndpoint.objects.values_list("url", "description")) == [
        ("http://93.184.215.14/hook", "")
    ]


@pytest.mark.django_db
def test_the_endpoint_form_saves_a_public_url_with_its_event_types_and_shows_the_secret(
    admin_client: Client, settings: Settings
) -> None:
    settings.ORDERS = settings.ORDERS | {"WEBHOOK_ALLOW_PRIVATE": False}
    form = {"url": "https://93.184.215.14/hook", "event_types": ["order.paid", "order.expired"]}

    response = admin_client.post(reverse("admin:orders_webhookendpoint_add"), form)

    assert response.status_code == 302, response.content.decode()[:2000]
    endpoint = WebhookEndpoint.objects.get()
    assert endpoint.event_types == ["order.paid", "order.expired"]
    assert not endpoint.active  # an unticked box
    page = admin_client.get(reverse("admin:orders_webhookendpoint_change", args=[endpoint.pk]))
    assert endpoint.secret.startswith("whsec_")
    assert endpoint.secret in page.content.decode()


@pytest.mark.django_db
def test_a_private_url_is_refused_at_send_time_and_retried_like_any_failure(
    receivers: Callable[..., Receiver], settings: Settings
) -> None:
    receiver = receivers("ok")
    endpoint = WebhookEndpoint.objects.create(url=receiver.url)  # saved while allowed
    delivery = make_delivery(endpoint)
    settings.ORDERS = settings.ORDERS | {"WEBHOOK_ALLOW_PRIVATE": False}

    assert outbound.send([delivery.pk]) == 0

    assert receiver.requests == []
    delivery.refresh_from_db()
    assert delivery.attempts == 1
    assert delivery.delivered_at is None
    assert delivery.next_attempt_at is not None
    assert delivery.next_attempt_at > timezone.now()
    [attempt] = attempts_of(delivery)
    assert attempt.status_code is None
    assert attempt.error.startswith("refused: ")
    assert "a loopback address" in attempt.error


# The admin ---------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_send_again_resends_a_given_up_and_a_delivered_delivery_with_the_same_webhook_id(
    celery_worker_process: WorkerProcess, receivers: Callable[..., Receiver], admin_client: Client
) -> None:
    receiver = receivers("ok")
    endpoint = WebhookEndpoint.objects.create(url=receiver.url, event_types=["order.placed"])
    delivered_order = services.place_order(amount="10.00", timeout=600)
    wait_for(lambda: len(receiver.requests) == 1, "the first delivery")
    # One given up (as after three days of failures), with no attempt by the worker.
    endpoint.active = False
    endpoint.save()
    given_up = make_delivery(endpoint)
    WebhookDelivery.objects.filter(pk=given_up.pk).update(
        gave_up_at=timezone.now(), next_attempt_at=None, attempts=9
    )
    endpoint.active = True
    endpoint.save()
    chosen = WebhookDelivery.objects.filter(endpoint=endpoint)

    response = admin_client.post(
        reverse("admin:orders_webhookdelivery_changelist"),
        {"action": "send_again", "_selected_action": [d.pk for d in chosen]},
        follow=True,
    )

    assert "2 deliveries will be sent again now" in response.content.decode()
    wait_for(lambda: len(receiver.requests) == 3, "both to be sent again", timeout=10)
    for delivery in WebhookDelivery.objects.filter(endpoint=endpoint).select_related("event"):
        assert delivery.delivered_at is not None
        assert delivery.gave_up_at is None
        assert str(delivery.event.event_id) in receiver.ids()
    first_id = str(delivered_order.history.get().event_id)
    assert receiver.ids().count(first_id) == 2


@pytest.mark.django_db
def test_send_again_needs_the_change_permission(
    client: Client, django_user_model: Any, receivers: Callable[..., Receiver]
) -> None:
    from django.contrib.auth.models import Permission

    viewer = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_webhookdelivery"))
    client.force_login(viewer)
    delivery = make_delivery(WebhookEndpoint.objects.create(url=receivers().url))
    WebhookDelivery.objects.filter(pk=delivery.pk).update(gave_up_at=timezone.now())

    listing = client.get(reverse("admin:orders_webhookdelivery_changelist"))
    client.post(
        reverse("admin:orders_webhookdelivery_changelist"),
        {"action": "send_again", "_selected_action": [delivery.pk]},
    )

    assert listing.status_code == 200
    assert "send_again" not in listing.content.decode()
    delivery.refresh_from_db()
    assert delivery.gave_up_at is not None


def order_page(order: AbstractOrder) -> str:
    opts = order._meta
    return reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[order.pk])


def _admin_pages(
    admin_client: Client, endpoint: WebhookEndpoint, order: AbstractOrder
) -> list[int]:
    """The number of queries of each webhook page of the admin."""
    counts = []
    for url in (
        reverse("admin:orders_webhookendpoint_changelist"),
        reverse("admin:orders_webhookendpoint_change", args=[endpoint.pk]),
        reverse("admin:orders_webhookdelivery_changelist"),
        reverse("admin:orders_webhookdelivery_changelist") + "?state=failing",
        order_page(order),
    ):
        with CaptureQueriesContext(connection) as queries:
            assert admin_client.get(url).status_code == 200
        counts.append(len(queries))
    return counts


@pytest.mark.django_db
def test_the_webhook_pages_show_each_attempt_in_a_number_of_queries_that_does_not_grow(
    admin_client: Client, receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers("500")
    endpoint = WebhookEndpoint.objects.create(url=receiver.url, description="the ERP")
    first = make_delivery(endpoint)
    outbound.send([first.pk])
    order = first.event.order
    _admin_pages(admin_client, endpoint, order)  # the session's and caches' first queries
    few = _admin_pages(admin_client, endpoint, order)
    for _ in range(4):
        outbound.send([make_delivery(endpoint).pk])

    assert _admin_pages(admin_client, endpoint, order) == few
    endpoint_page = admin_client.get(
        reverse("admin:orders_webhookendpoint_change", args=[endpoint.pk])
    ).content.decode()
    assert endpoint_page.count("HTTP 500") == 5
    assert "retrying (1 failed)" in admin_client.get(order_page(order)).content.decode()
    listing = admin_client.get(reverse("admin:orders_webhookendpoint_changelist")).content
    assert b"HTTP 500" in listing
    assert b"the ERP" in listing
    delivery_page = admin_client.get(
        reverse("admin:orders_webhookdelivery_change", args=[first.pk])
    ).content.decode()
    assert str(first.event.event_id) in delivery_page
    assert "500" in delivery_page
