"""Events no one loses: the history row is the event, and each receiver's database work
happens once, whatever crashes (orders.events).

The first tests run the dispatcher in this process (``events.dispatch``), to pin down
its rules: once per (event, receiver), in order per order and receiver, a raising
receiver holding back only itself, parked after EVENT_MAX_ATTEMPTS and retried from
the admin. The last ones use real worker processes on a private Redis: a worker
SIGKILLed inside a receiver, a dispatch task that was never queued, two dispatchers at
once. Test receivers (tests/effects) leave an ``Effect`` row per committed call, with
no unique constraint, so that a doubled effect would show.
"""

from __future__ import annotations

import io
import re
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.core.checks import run_checks
from django.core.management import call_command
from django.db import connection
from django.db.models import Count
from django.urls import reverse
from django.utils import timezone
from pytest_django import Settings

from orders import events, get_order_model, services
from orders.models import EventDelivery, OrderTransition, Status
from orders.signals import order_cancelled, order_expired, order_placed
from tests.chaos import key_prefix, kill, wait_for, workers
from tests.conftest import worker_env
from tests.effects import receivers
from tests.effects.models import Effect
from tests.redis_server import RedisServer, free_port, publishing_to

Order = get_order_model()


@pytest.fixture
def effects() -> Iterator[None]:
    """The test receivers (gate, tally) connected in this process, as in the workers."""
    receivers.connect()
    yield
    receivers.disconnect()


class Calls:
    """A receiver that records (event type, order id) and raises for the orders in
    ``failing``."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.failing: set[str] = set()

    def __call__(self, sender: Any, order: Any, event: OrderTransition, **kwargs: Any) -> None:
        assert kwargs["event_id"] == event.event_id
        if str(order.pk) in self.failing:
            Effect.objects.create(  # rolled back with the failed delivery
                event_id=event.event_id,
                event_type=event.event_type,
                receiver="x",
                order_id=order.pk,
            )
            raise RuntimeError(f"cannot handle {order.pk}")
        self.seen.append((event.event_type, str(order.pk)))


@pytest.fixture
def calls() -> Iterator[Calls]:
    receiver = Calls()
    for signal in (order_placed, order_cancelled, order_expired):
        signal.connect(receiver, dispatch_uid="tests.calls")
    yield receiver
    for signal in (order_placed, order_cancelled, order_expired):
        signal.disconnect(dispatch_uid="tests.calls")


def owed(order: Any) -> list[str]:
    return list(
        OrderTransition.objects.filter(order_id=order.pk, next_dispatch_at__isnull=False)
        .order_by("id")
        .values_list("event_type", flat=True)
    )


# The rules, with the dispatcher in this process ---------------------------------------


@pytest.mark.django_db
def test_nothing_runs_at_commit_then_each_receiver_gets_each_event_once(
    calls: Calls, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=False) as queued:
        order = services.place_order(amount="10.00", timeout=600)
    assert calls.seen == [], "a receiver ran before the dispatcher"
    assert len(queued) == 2, "the expiry timer and the event's dispatch, both after commit"
    [placed] = order.history.all()
    assert (placed.transition, placed.event_type) == ("place", "order.placed")
    assert owed(order) == ["order.placed"]

    report = events.dispatch([order.pk])

    assert calls.seen == [("order.placed", str(order.pk))]
    assert report.delivered == 1
    assert owed(order) == []
    delivery = EventDelivery.objects.get(event=placed, receiver="tests.calls")
    assert delivery.delivered_at is not None
    assert delivery.attempts == 1

    events.dispatch([order.pk])  # a twin task, or the sweep's re-queue
    placed.refresh_from_db()
    placed.next_dispatch_at = timezone.now()  # even if it were owed again
    placed.save()
    events.dispatch([order.pk])
    assert calls.seen == [("order.placed", str(order.pk))], "delivered twice"


@pytest.mark.django_db
def test_an_event_nothing_hears_is_written_but_owed_to_no_one(
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks(execute=False) as queued:
        order = services.place_order(amount="10.00", timeout=600)
    assert [row.event_type for row in order.history.all()] == ["order.placed"]
    assert owed(order) == []
    assert len(queued) == 1, "only the expiry timer: no dispatch task for nobody"


@pytest.mark.django_db
def test_a_raising_receiver_holds_back_only_its_own_later_events_of_that_order(
    calls: Calls, effects: None, settings: Settings
) -> None:
    settings.ORDERS = settings.ORDERS | {"EVENT_RETRY_BACKOFF": 60}
    bad, good = (services.place_order(amount="10.00", timeout=600) for _ in range(2))
    for order in (bad, good):
        services.cancel_order(order_id=order.pk, by="customer", reason="")
    calls.failing.add(str(bad.pk))

    report = events.dispatch([bad.pk, good.pk])

    # The other order, and the other receivers of the same order: all delivered.
    assert calls.seen == [("order.placed", str(good.pk)), ("order.cancelled", str(good.pk))]
    assert Effect.objects.filter(order_id=bad.pk, receiver="x").count() == 0, "not rolled back"
    tallied = Effect.objects.filter(receiver="tally").values_list("event_type", "order_id")
    assert sorted(tallied) == sorted(
        (kind, order.pk) for order in (bad, good) for kind in ("order.placed", "order.cancelled")
    )
    # The failing receiver: tried once on the first event, the later one held back.
    failed = EventDelivery.objects.get(receiver="tests.calls", event__order_id=bad.pk)
    assert failed.event.event_type == "order.placed"
    assert failed.attempts == 1
    assert failed.delivered_at is None
    assert "cannot handle" in failed.last_error
    assert failed.next_attempt_at is not None
    assert (report.failed, report.held) == (1, 1)
    assert owed(bad) == ["order.placed", "order.cancelled"]
    assert owed(good) == []

    # Fixed, but not yet due: nothing moves.
    calls.failing.clear()
    events.dispatch([bad.pk])
    assert len(calls.seen) == 2
    # Due: both events, in the order they happened.
    events.dispatch([bad.pk], now=failed.next_attempt_at + timedelta(seconds=1))
    assert calls.seen[2:] == [("order.placed", str(bad.pk)), ("order.cancelled", str(bad.pk))]
    assert owed(bad) == []
    assert Effect.objects.filter(receiver="tally").count() == 4, "the others ran once"


@pytest.mark.django_db
def test_a_receiver_failing_too_often_is_parked_until_retried_from_the_admin(
    calls: Calls, settings: Settings
) -> None:
    settings.ORDERS = settings.ORDERS | {"EVENT_MAX_ATTEMPTS": 2, "EVENT_RETRY_BACKOFF": 1}
    order = services.place_order(amount="10.00", timeout=600)
    services.cancel_order(order_id=order.pk, by="customer", reason="")
    calls.failing.add(str(order.pk))
    now = timezone.now()
    events.dispatch([order.pk], now=now)
    report = events.dispatch([order.pk], now=now + timedelta(seconds=5))

    assert report.parked == 1
    parked = EventDelivery.objects.get(receiver="tests.calls")
    assert parked.parked_at is not None
    assert parked.attempts == 2
    assert owed(order) == [], "a parked receiver is not retried by itself"
    assert events.redispatch_late(now=now + timedelta(days=1)) == 0

    calls.failing.clear()
    assert events.retry_parked([parked]) == 1
    events.dispatch([order.pk])
    assert calls.seen == [("order.placed", str(order.pk)), ("order.cancelled", str(order.pk))]
    assert owed(order) == []


@pytest.mark.django_db
def test_a_worker_without_the_receiver_leaves_the_event_to_one_that_has_it(
    calls: Calls, settings: Settings
) -> None:
    """An event is owed to the receivers connected where it was written. A worker of an
    older deploy, which lacks one, must not count the event as delivered."""
    order = services.place_order(amount="10.00", timeout=600)
    [placed] = order.history.all()
    assert placed.owed_to == ["tests.calls"]
    order_placed.disconnect(dispatch_uid="tests.calls")  # the old worker
    try:
        report = events.dispatch([order.pk])
    finally:
        order_placed.connect(calls, dispatch_uid="tests.calls")
    assert report.missing == 1
    assert owed(order) == ["order.placed"], "counted as delivered by a worker without it"

    later = timezone.now() + timedelta(seconds=settings.ORDERS.get("EVENT_GRACE", 30) + 1)
    assert events.redispatch_late(now=later + timedelta(seconds=30)) == 1
    events.dispatch([order.pk], now=later)
    assert calls.seen == [("order.placed", str(order.pk))]
    assert owed(order) == []


@pytest.mark.django_db
def test_a_batch_of_expiries_queues_one_dispatch_for_all_its_events(
    calls: Calls, django_capture_on_commit_callbacks: Any
) -> None:
    past = timezone.now() - timedelta(minutes=5)
    orders = [services.place_order(amount="10.00", timeout=60, now=past) for _ in range(3)]
    events.dispatch([order.pk for order in orders])  # their order.placed
    with django_capture_on_commit_callbacks(execute=False) as queued:
        expired, _ = services.expire_due_orders(due_by=timezone.now(), by="sweep")
    assert expired == 3
    assert len(queued) == 1, "one dispatch task for the whole batch"
    events.dispatch([order.pk for order in orders])
    assert sorted(calls.seen) == sorted(
        [(kind, str(order.pk)) for order in orders for kind in ("order.placed", "order.expired")]
    )


@pytest.mark.django_db
def test_a_receiver_raising_in_a_sweep_costs_neither_the_sweep_nor_the_other_orders(
    calls: Calls, settings: Settings
) -> None:
    """The report that started it: a receiver raising for 2 of the 20 orders a sweep
    expired stopped the other on-commit hooks (18 receivers never ran) and failed the
    sweep. Receivers no longer run in the sweep's process, nor in its transaction."""
    settings.ORDERS = settings.ORDERS | {"SWEEP_GRACE": 0}
    past = timezone.now() - timedelta(minutes=5)
    orders = [services.place_order(amount="10.00", timeout=60, now=past) for _ in range(20)]
    calls.failing.update(str(order.pk) for order in orders[:2])

    assert services.sweep().expired == 20
    events.dispatch([order.pk for order in orders])

    expired = {order_id for kind, order_id in calls.seen if kind == "order.expired"}
    assert expired == {str(order.pk) for order in orders[2:]}
    assert EventDelivery.objects.filter(delivered_at__isnull=True).count() == 2


@pytest.mark.django_db
def test_the_sweep_requeues_events_whose_dispatch_is_late(
    calls: Calls, settings: Settings, django_capture_on_commit_callbacks: Any
) -> None:
    settings.ORDERS = settings.ORDERS | {"EVENT_GRACE": 30}
    with django_capture_on_commit_callbacks(execute=False):  # their tasks are lost
        order = services.place_order(amount="10.00", timeout=600)
        services.cancel_order(order_id=order.pk, by="customer", reason="")
    now = timezone.now()
    assert events.redispatch_late(now=now) == 0, "within the grace: its task may be on its way"
    with django_capture_on_commit_callbacks(execute=False) as queued:
        assert events.redispatch_late(now=now + timedelta(seconds=31)) == 1, "one order"
    assert len(queued) == 1
    queued[0]()  # the sweep's task, published (to the session's Redis; nobody must run it)
    events.dispatch([order.pk])
    assert calls.seen == [("order.placed", str(order.pk)), ("order.cancelled", str(order.pk))]


@pytest.mark.django_db
def test_delivery_records_past_the_retention_are_pruned_and_the_history_stays(
    calls: Calls, settings: Settings
) -> None:
    order = services.place_order(amount="10.00", timeout=600)
    events.dispatch([order.pk])
    later = timezone.now() + timedelta(seconds=settings.ORDERS.get("EVENT_RETENTION", 30 * 86400))
    assert events.prune(now=later - timedelta(hours=1)) == (0, 0)
    assert events.prune(now=later + timedelta(hours=1)) == (1, 0)
    assert order.history.count() == 1


# Real workers, real Redis --------------------------------------------------------------


@pytest.fixture
def broker() -> Iterator[tuple[RedisServer, str]]:
    prefix = key_prefix("events")
    with RedisServer() as server, publishing_to(server.url, prefix):
        yield server, prefix


def env_for(server: RedisServer, prefix: str, **extra: str) -> dict[str, str]:
    return worker_env(
        REDIS_URL=server.url, CELERY_KEY_PREFIX=prefix, ORDERS_TEST_RECEIVERS="1", **extra
    )


def effects_of(event: OrderTransition) -> dict[str, int]:
    rows = Effect.objects.filter(event_id=event.event_id).values("receiver")
    return {row["receiver"]: row["n"] for row in rows.annotate(n=Count("id"))}


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_inside_a_receiver_the_event_is_delivered_once_later(
    broker: tuple[RedisServer, str], effects: None, tmp_path: Path
) -> None:
    server, prefix = broker
    gate = tmp_path / "gate"
    gate.touch()
    env = env_for(server, prefix, ORDERS_TEST_GATE=str(gate))
    with workers("events-kill-a", 1, env) as [worker]:
        order = services.place_order(amount="10.00", timeout=600)
        services.cancel_order(order_id=order.pk, by="customer", reason="")
        wait_for(Path(f"{gate}.entered").exists, 30, "the worker to enter the receiver")
        kill(worker)
    placed, cancelled = order.history.order_by("id")
    assert Effect.objects.count() == 0, "the killed receiver's work was committed"
    assert not EventDelivery.objects.filter(delivered_at__isnull=False).exists()
    assert owed(order) == ["order.placed", "order.cancelled"]

    gate.unlink()
    with workers("events-kill-b", 1, env):
        # The killed task stays unacknowledged for the visibility timeout: the sweep's
        # re-queue is what brings the events back.
        events.redispatch_late(now=timezone.now() + timedelta(hours=1))
        wait_for(lambda: owed(order) == [], 30, "the events to be delivered")
        time.sleep(0.5)  # anything doubled would have shown by now
    assert effects_of(placed) == {"gate": 1, "tally": 1}
    assert effects_of(cancelled) == {"gate": 1, "tally": 1}
    gate_effects = Effect.objects.filter(receiver="gate").order_by("id")
    assert list(gate_effects.values_list("event_type", flat=True)) == [
        "order.placed",
        "order.cancelled",
    ], "events of one order reach a receiver in the order they happened"


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_dispatch_task_the_broker_never_got_is_queued_by_the_sweep(
    broker: tuple[RedisServer, str], effects: None
) -> None:
    server, prefix = broker
    with workers("events-lost", 1, env_for(server, prefix)):
        with publishing_to(f"redis://127.0.0.1:{free_port()}/0", prefix):  # nobody there
            order = services.place_order(amount="10.00", timeout=600)
        time.sleep(1)
        assert Effect.objects.count() == 0
        assert owed(order) == ["order.placed"], "the event is still owed"
        events.redispatch_late(now=timezone.now() + timedelta(hours=1))
        wait_for(lambda: owed(order) == [], 30, "the event to be delivered")
    assert effects_of(order.history.get()) == {"gate": 1, "tally": 1}


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_two_dispatchers_at_once_one_effect(effects: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDERS_TEST_RECEIVER_DELAY", "0.3")
    orders = [services.place_order(amount="10.00", timeout=600) for _ in range(3)]
    for order in orders:
        services.cancel_order(order_id=order.pk, by="customer", reason="")
    ids = [order.pk for order in orders]
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def dispatcher() -> None:
        start.wait()
        try:
            events.dispatch(ids)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=dispatcher) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    per_delivery = (
        Effect.objects.values("event_id", "receiver")
        .annotate(n=Count("id"))
        .values_list("n", flat=True)
    )
    assert sorted(per_delivery) == [1] * (len(orders) * 2 * 2), "an effect twice, or missing"
    assert all(owed(order) == [] for order in orders)
    assert {order.status for order in Order.objects.filter(pk__in=ids)} == {Status.CANCELLED}


# What staff and operators see ------------------------------------------------------------


@pytest.fixture
def parked(calls: Calls, settings: Settings) -> EventDelivery:
    """A cancelled order whose receiver failed until it was parked."""
    settings.ORDERS = settings.ORDERS | {"EVENT_MAX_ATTEMPTS": 1}
    order = services.place_order(amount="10.00", timeout=600)
    services.cancel_order(order_id=order.pk, by="customer", reason="")
    calls.failing.add(str(order.pk))
    events.dispatch([order.pk])
    calls.failing.clear()
    return EventDelivery.objects.get(parked_at__isnull=False)


@pytest.mark.django_db
def test_parked_deliveries_are_shown_in_the_overview_metrics_and_status(
    parked: EventDelivery, admin_client: Any, client: Any
) -> None:
    page = admin_client.get(reverse("admin:orders_order_overview")).content.decode()
    assert "1 delivery is parked" in page
    assert re.search(r'id="events-parked">1<', page)
    assert re.search(r'id="events-owed">0<', page)

    order_page = admin_client.get(
        reverse("admin:orders_order_change", args=[parked.event.order_id])
    ).content.decode()
    assert "<p>parked</p>" in order_page, "the order's history says which event is parked"

    metrics = client.get("/metrics", HTTP_AUTHORIZATION="Bearer test-metrics-token")
    assert "orders_event_deliveries_parked 1.0" in metrics.content.decode()

    out = io.StringIO()
    call_command("orders_status", stdout=out)
    assert "1 parked" in out.getvalue()


@pytest.mark.django_db
def test_staff_retry_a_parked_delivery_from_the_admin(
    parked: EventDelivery, calls: Calls, admin_client: Any
) -> None:
    changelist = reverse("admin:orders_eventdelivery_changelist")
    listed = admin_client.get(f"{changelist}?state=parked").content.decode()
    assert "tests.calls" in listed
    assert "cannot handle" in listed

    response = admin_client.post(
        changelist,
        {"action": "retry_selected", "_selected_action": [parked.pk]},
        follow=True,
    )

    assert "1 parked delivery queued again." in response.content.decode()
    parked.refresh_from_db()
    assert parked.parked_at is None
    events.dispatch([parked.event.order_id])  # what the queued task does
    assert [kind for kind, _ in calls.seen] == ["order.placed", "order.cancelled"]


@pytest.mark.django_db
def test_staff_without_the_permission_cannot_retry(
    parked: EventDelivery, client: Any, django_user_model: Any
) -> None:
    viewer = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_eventdelivery"))
    client.force_login(viewer)
    changelist = reverse("admin:orders_eventdelivery_changelist")
    response = client.post(
        changelist, {"action": "retry_selected", "_selected_action": [parked.pk]}
    )
    assert response.status_code == 200  # the list again: Django offers no such action
    parked.refresh_from_db()
    assert parked.parked_at is not None
    assert not OrderTransition.objects.filter(next_dispatch_at__isnull=False).exists()


def test_a_receiver_without_a_stable_name_is_warned_about() -> None:
    def local(**kwargs: Any) -> None:
        pass

    order_expired.connect(local)
    try:
        [warning] = [m for m in run_checks() if m.id == "orders.W002"]
    finally:
        order_expired.disconnect(local)
    assert "test_a_receiver_without_a_stable_name_is_warned_about.<locals>.local" in warning.msg
    assert not [m for m in run_checks() if m.id == "orders.W002"]
