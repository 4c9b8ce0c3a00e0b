"""The timer, end to end: a real Redis broker and a real Celery worker process.

Deadlines are a few seconds away; the tests wait on the database, not on mocks.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from orders import get_order_model, scheduling, services
from orders.models import PLACE, REFUND_PAYMENT, AbstractOrder, CancelReason, Payment, Status
from orders.tasks import expire_order_task
from tests.chaos import key_prefix, workers
from tests.conftest import BASE_DIR, WorkerProcess, worker_env
from tests.redis_server import publishing_to

Order = get_order_model()

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def statuses(orders: list[AbstractOrder]) -> set[str]:
    return set(Order.objects.filter(pk__in=[o.pk for o in orders]).values_list("status", flat=True))


#: Every worker wakes the batched timers and runs per-order ones: the mode is the arming
#: side's, this process's.
BOTH_MODES = pytest.mark.parametrize("mode", ["batched", "per_order"])


@BOTH_MODES
def test_unpaid_orders_are_cancelled_within_a_second_of_their_deadline(
    celery_worker_process: WorkerProcess, settings: Any, mode: str
) -> None:
    settings.ORDERS = settings.ORDERS | {"TIMER_MODE": mode}
    orders = [services.place_order(amount="10.00", timeout=2 + i * 0.25) for i in range(8)]

    time.sleep(1)
    assert statuses(orders) == {Status.CREATED}, "nothing may be cancelled before its deadline"
    wait_for(lambda: statuses(orders) == {Status.CANCELLED}, 15, "every order to expire")

    for order in Order.objects.filter(pk__in=[o.pk for o in orders]):
        assert order.cancel_reason == CancelReason.TIMEOUT
        assert order.cancelled_at is not None
        lateness = (order.cancelled_at - order.expires_at).total_seconds()
        assert 0 <= lateness < 1.0, f"order {order.pk} expired {lateness:.3f}s after its deadline"
        assert list(order.history.values_list("transition", "actor")) == [
            (PLACE, "shop"),
            ("expire", "expiry timer"),
        ]


@BOTH_MODES
def test_paid_order_is_not_cancelled_and_ends_delivered(
    celery_worker_process: WorkerProcess, settings: Any, mode: str
) -> None:
    settings.ORDERS = settings.ORDERS | {"TIMER_MODE": mode}
    order = services.place_order(amount="10.00", timeout=2)
    services.record_payment(order_id=order.pk, payment_ref="pay-early", amount="10.00")

    wait_for(lambda: statuses([order]) == {Status.DELIVERED}, 10, "the order to ship")
    time.sleep(2.5)  # past the deadline: the timer has fired and must have done nothing

    order.refresh_from_db()
    assert order.status == Status.DELIVERED
    assert order.tracking_number
    assert [h.transition for h in order.history.all()] == [PLACE, "pay", "ship"]
    if mode == "per_order":
        assert "no-op, not unpaid (it is delivered)" in celery_worker_process.log()
    else:
        assert f"Timer bucket {scheduling.bucket_of(order.expires_at)} expired" in (
            celery_worker_process.log()
        ), "its bucket fired"


@BOTH_MODES
def test_extended_deadline_is_honoured(
    celery_worker_process: WorkerProcess, settings: Any, mode: str
) -> None:
    settings.ORDERS = settings.ORDERS | {"TIMER_MODE": mode}
    order = services.place_order(amount="10.00", timeout=2)
    new_deadline = services.extend_order(order_id=order.pk, seconds=2, by="customer").expires_at
    assert new_deadline == order.expires_at + timedelta(seconds=2)

    time.sleep(3)  # the first deadline has passed
    assert statuses([order]) == {Status.CREATED}
    wait_for(lambda: statuses([order]) == {Status.CANCELLED}, 10, "the extended order to expire")

    order.refresh_from_db()
    assert order.cancelled_at is not None
    assert order.cancelled_at >= new_deadline
    assert (order.cancelled_at - new_deadline).total_seconds() < 1.0


def test_expiry_task_run_many_times_has_the_effect_of_one(
    celery_worker_process: WorkerProcess,
) -> None:
    order = services.place_order(amount="10.00", timeout=1)
    for _ in range(30):
        expire_order_task.apply_async(args=(str(order.pk),), countdown=1)

    wait_for(lambda: statuses([order]) == {Status.CANCELLED}, 10, "the order to expire")
    time.sleep(2)  # let every duplicate run

    assert [h.transition for h in order.history.all()] == [PLACE, "expire"]
    assert celery_worker_process.log().count(f"Expiry of order {order.pk}") >= 25


def test_timer_for_a_missing_order_is_a_logged_no_op(celery_worker_process: WorkerProcess) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    expire_order_task.apply_async(args=(missing,))
    wait_for(lambda: f"Expiry of order {missing}" in celery_worker_process.log(), 10, "the no-op")
    assert "no-op, missing (no such order)" in celery_worker_process.log()


def test_payment_and_expiry_racing_at_the_deadline_never_both_win(
    celery_worker_process: WorkerProcess,
) -> None:
    """Several processes pay, and several expire, the same orders at their deadline,
    while the worker's timers fire too. Each order ends either paid (and shipped) with
    its payments after the first refunded, or expired with every payment refunded."""
    # Deadlines 20 ms apart, so that the actors, walking the orders in different
    # orders, land before, at and after each deadline.
    orders = [services.place_order(amount="10.00", timeout=4 + i * 0.02) for i in range(40)]
    ids = [str(o.pk) for o in orders]
    start_at = orders[len(orders) // 3].expires_at.timestamp()
    actors = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.actors",
                action,
                str(start_at),
                *random.Random(seed).sample(ids, len(ids)),
            ],
            cwd=BASE_DIR,
            env=worker_env(),
        )
        for seed, action in enumerate(("pay", "pay", "expire", "pay", "expire"))
    ]
    assert [a.wait(60) for a in actors] == [0] * len(actors)
    wait_for(
        lambda: (
            not Order.objects.filter(pk__in=ids, status__in=[Status.CREATED, Status.PAID]).exists()
        ),
        20,
        "every order to settle",
    )
    # every payment that did not pay the order is refunded, by the worker
    wait_for(
        lambda: (
            not Payment.objects.filter(order__in=ids, refunded_at__isnull=True)
            .exclude(outcome=Payment.Outcome.ACCEPTED)
            .exists()
        ),
        20,
        "every surplus or late payment to be refunded",
    )

    for order in Order.objects.filter(pk__in=ids).prefetch_related("history", "payments"):  # type: ignore[misc]  # reverse relation
        rows = list(order.history.all())
        transitions = [h.transition for h in rows if h.transition != REFUND_PAYMENT]
        payments = list(order.payments.all())
        assert len(payments) == 3
        accepted = [p for p in payments if p.outcome == Payment.Outcome.ACCEPTED]
        # one history line for each payment refunded, naming it
        assert Counter(h.payment_id for h in rows if h.transition == REFUND_PAYMENT) == Counter(
            p.pk for p in payments if p not in accepted
        )
        if order.status == Status.DELIVERED:
            assert transitions == [PLACE, "pay", "ship"]
            assert len(accepted) == 1
            assert accepted[0].received_at <= order.expires_at
        else:
            assert order.status == Status.CANCELLED
            assert order.cancel_reason == CancelReason.TIMEOUT
            assert transitions == [PLACE, "expire"]
            assert accepted == []
    outcomes = dict.fromkeys(Status.values, 0)
    for status in Order.objects.filter(pk__in=ids).values_list("status", flat=True):
        outcomes[status] += 1
    print(f"race outcome over {len(ids)} orders: {outcomes}")


def test_order_placed_while_the_broker_is_down_is_saved_and_recovered_by_the_sweep(
    celery_worker_process: WorkerProcess,
) -> None:
    """A process whose Redis is unreachable still places the order; the timer is not
    armed, the failure is logged once, and the sweep arms it later."""
    script = (
        "import django; django.setup();"
        "from orders import services;"
        "print(services.place_order(amount='10.00', timeout=3).pk)"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=BASE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        env=worker_env(REDIS_URL="redis://127.0.0.1:9/0"),  # nothing listens on port 9
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    order = Order.objects.get(pk=result.stdout.strip().splitlines()[-1])
    assert order.status == Status.CREATED
    assert order.timer_armed_for is None
    assert result.stderr.count("NOT armed, the broker is unreachable") == 1
    print(f"placing with the broker down took {elapsed:.2f}s")

    report = services.sweep()  # beat would run this; the worker then fires the timer
    assert report.timers_armed == 1
    wait_for(lambda: statuses([order]) == {Status.CANCELLED}, 10, "the recovered timer to fire")


def test_batched_timers_expire_every_order_of_a_bucket_with_one_task_per_bucket(
    celery_worker_process: WorkerProcess, settings: Any
) -> None:
    settings.ORDERS = settings.ORDERS | {"TIMER_MODE": "batched"}
    start = timezone.now()
    # All placed "at start", 5 s ahead, so that each bucket gets all its orders before it
    # fires (one placed after would add it again: a second task, not a lost order).
    orders = [
        services.place_order(amount="10.00", timeout=5 + (i % 3) * 0.4, now=start)
        for i in range(60)
    ]
    buckets = {scheduling.bucket_of(o.expires_at) for o in orders}

    wait_for(lambda: statuses(orders) == {Status.CANCELLED}, 15, "every order to expire")

    for order in Order.objects.filter(pk__in=[o.pk for o in orders]):
        assert order.cancelled_at is not None
        lateness = (order.cancelled_at - order.expires_at).total_seconds()
        assert 0 <= lateness < 1.5, f"order {order.pk} expired {lateness:.3f}s late"
        assert [h.transition for h in order.history.all()] == [PLACE, "expire"]

    # A bucket's task logs once its batches committed and their receivers ran (a shop's
    # may take a while): wait for the lines rather than race them.
    def fired() -> list[int]:
        return [b for b in buckets if f"Timer bucket {b} expired" in celery_worker_process.log()]

    wait_for(lambda: sorted(fired()) == sorted(buckets), 5, "each bucket's task to report")
    log = celery_worker_process.log()
    runs = [log.count(f"Timer bucket {b} expired") for b in sorted(buckets)]
    assert runs == [1] * len(buckets), "one task per bucket, not one per order"


@pytest.mark.skipif(
    connection.vendor == "sqlite",
    reason="SQLite's writers queue behind one another: a bucket is never shared there",
)
def test_a_bucket_bigger_than_a_batch_is_shared_by_tasks_that_expire_each_order_once(
    settings: Any,
) -> None:
    """A sale's orders sharing one deadline, five batches of them: the bucket's task
    publishes helpers, the worker's two processes take batches side by side (skip_locked
    keeps them apart), and each order is expired once, by one of them."""
    settings.ORDERS = settings.ORDERS | {
        "TIMER_MODE": "batched",
        "EXPIRY_BATCH_SIZE": 20,
        "EXPIRY_HELPERS": 3,
    }
    prefix = key_prefix("share")
    # Each batch of 20 held 0.4 s (tests/slow_expiry): 2 s for one task alone, so that
    # the helpers start while the bucket's own task is still at it, however loaded the
    # machine.
    env = worker_env(
        CELERY_KEY_PREFIX=prefix, ORDERS_EXPIRY_BATCH_SIZE="20", ORDERS_TEST_EXPIRY_DELAY="0.02"
    )
    with workers("share", 1, env) as [worker], publishing_to(settings.CELERY_BROKER_URL, prefix):
        start = timezone.now()
        orders = [services.place_order(amount="10.00", timeout=4, now=start) for _ in range(100)]
        [bucket] = {scheduling.bucket_of(o.expires_at) for o in orders}

        wait_for(lambda: statuses(orders) == {Status.CANCELLED}, 20, "every order to expire")
        wait_for(
            lambda: worker.log().count(f"Timer bucket {bucket} expired") == 4,
            10,
            "the bucket's task and its three helpers to report",
        )

    assert f"Timer bucket {bucket} shared with 3 more tasks." in worker.log()
    expired_by_task = [
        int(n) for n in re.findall(rf"Timer bucket {bucket} expired (\d+) orders", worker.log())
    ]
    assert sum(expired_by_task) == 100
    assert len([n for n in expired_by_task if n]) >= 2, "one task did all the work alone"
    for order in Order.objects.filter(pk__in=[o.pk for o in orders]):
        assert [h.transition for h in order.history.all()] == [PLACE, "expire"]
