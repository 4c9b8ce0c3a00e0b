"""Where the supported databases differ (PostgreSQL, MariaDB/MySQL, SQLite), the same
assertions on whichever this run uses: CI runs the suite on all three.

MariaDB keeps a ``DateTimeField`` as ``datetime(6)`` and a ``JSONField`` as checked
``LONGTEXT``; it has no ``UPDATE ... RETURNING``, so the set-based expiry reads its
batch (``SELECT ... FOR UPDATE SKIP LOCKED``) before it writes it; and its locking
reads take gap locks at REPEATABLE READ (the settings ask for READ COMMITTED)."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone
from pytest_django import Settings

from orders import get_order_model, scheduling, services
from orders.models import PLACE, OrderTransition, Payment, Status
from orders.services import TIMER

Order = get_order_model()

# Timers armed into a set of these tests' own (fixture timers_key): their orders are due
# already, and the session's worker, if started, would expire them under the test.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("timers_key")]

#: On a tenth of a second: a bucket's end.
T0 = datetime(2025, 1, 6, 9, 0, 0, 100000, tzinfo=UTC)


def test_a_deadline_keeps_its_microseconds_and_a_bucket_ends_exactly_at_its_end() -> None:
    """A bucket's window is (end - resolution, end]: an order due at the very end is the
    bucket's, one due a microsecond later the next bucket's. Both need the database to
    keep and compare microseconds (MariaDB: ``datetime(6)``)."""
    at_end = services.place_order(amount="10.00", timeout=600, now=T0)
    after = services.place_order(
        amount="10.00", timeout=timedelta(seconds=600, microseconds=1), now=T0
    )
    end = T0 + timedelta(seconds=600)

    assert Order.objects.get(pk=at_end.pk).expires_at == end
    assert Order.objects.get(pk=after.pk).expires_at == end + timedelta(microseconds=1)
    bucket = scheduling.bucket_of(end)
    assert bucket == int(end.timestamp() * 1000)
    assert scheduling.bucket_of(end + timedelta(microseconds=1)) == bucket + 100

    assert services.expire_bucket(bucket=bucket, now=end + timedelta(seconds=1)) == 1
    statuses = dict(Order.objects.filter(pk__in=[at_end.pk, after.pk]).values_list("pk", "status"))
    assert statuses == {at_end.pk: Status.CANCELLED, after.pk: Status.CREATED}


def test_an_orders_metadata_comes_back_as_it_went_in() -> None:
    metadata: dict[str, Any] = {
        "客户": "Zoë 🛒",
        "gift": True,
        "note": None,
        "count": 2**53 + 1,
        "ratio": 0.1,
        "quote": 'say "hi" \\ bye',
    }
    order = services.place_order(amount="10.00", metadata=metadata)

    assert Order.objects.get(pk=order.pk).metadata == metadata


def test_expiries_side_by_side_and_payments_racing_them_settle_each_order_once(
    settings: Settings,
) -> None:
    """Three set-based expiries in small batches over the same due orders, and payments
    (received before the deadline) for a third of them racing in: no deadlock, no lock
    wait timeout, and each order ends once: paid by its payment, or expired by one
    expiry with its payment refused as late."""
    settings.ORDERS = settings.ORDERS | {"EXPIRY_BATCH_SIZE": 20}
    placed_at = timezone.now() - timedelta(seconds=120)
    orders = [services.place_order(amount="10.00", timeout=60, now=placed_at) for _ in range(300)]
    paying = random.Random(7).sample([o.pk for o in orders], 100)
    errors: list[BaseException] = []
    start = threading.Barrier(5)

    def run(work: Any) -> None:
        start.wait()
        try:
            work()
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)
        finally:
            connection.close()

    def expire() -> None:
        services.expire_due_orders(due_by=timezone.now(), by=TIMER)

    def pay(order_ids: list[Any]) -> None:
        for order_id in order_ids:
            services.record_payment(
                order_id=order_id,
                payment_ref=f"race-{order_id}",
                amount="10.00",
                now=placed_at + timedelta(seconds=59),
            )

    work = [expire, expire, expire, lambda: pay(paying[:50]), lambda: pay(paying[50:])]
    threads = [threading.Thread(target=run, args=(w,)) for w in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    services.expire_due_orders(due_by=timezone.now(), by=TIMER)  # what the races left
    outcomes = dict(Payment.objects.filter(order__in=orders).values_list("order_id", "outcome"))
    assert set(outcomes) == set(paying)
    for order in Order.objects.filter(pk__in=[o.pk for o in orders]):
        steps = list(
            OrderTransition.objects.filter(order_id=order.pk).values_list("transition", flat=True)
        )
        if outcomes.get(order.pk) == Payment.Outcome.ACCEPTED:
            assert order.status in (Status.PAID, Status.DELIVERED)
            assert "expire" not in steps
        else:
            # (A late payment is then refunded: a refund_payment step, if a worker ran it.)
            assert order.status == Status.CANCELLED
            assert steps[:2] == [PLACE, "expire"], order.pk
            assert steps.count("expire") == 1, order.pk
            assert outcomes.get(order.pk) in (None, Payment.Outcome.LATE)


def test_the_bulk_expiry_writes_each_order_one_event_with_an_id_of_its_own() -> None:
    """The history rows of a batch are written by one INSERT ... SELECT (from the batch's
    rows on PostgreSQL, from one JSON parameter elsewhere): each a fresh UUID4, the
    order's own, stamped when its order was cancelled."""
    placed_at = timezone.now() - timedelta(seconds=120)
    orders = [services.place_order(amount="10.00", timeout=60, now=placed_at) for _ in range(30)]

    expired, _ = services.expire_due_orders(due_by=timezone.now(), by=TIMER)

    assert expired == 30
    events = list(OrderTransition.objects.filter(order__in=orders, transition="expire"))
    assert sorted(e.order_id for e in events) == sorted(o.pk for o in orders)
    assert len({e.event_id for e in events}) == 30
    assert {e.event_id.version for e in events} == {4}
    assert {(e.event_type, e.source, e.target, e.actor, e.reason) for e in events} == {
        ("order.expired", "created", "cancelled", str(TIMER), "not paid in time")
    }
    cancelled_at = dict(
        Order.objects.filter(pk__in=[o.pk for o in orders]).values_list("pk", "cancelled_at")
    )
    assert all(e.at == cancelled_at[e.order_id] for e in events)
