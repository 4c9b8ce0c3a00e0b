"""order.expiring_soon: REMIND_BEFORE seconds before the deadline of an unpaid order,
once per deadline, again after an extension, never for a paid or cancelled order.

The rules first, with time injected (``now=``) and what would reach the broker caught at
``scheduling.publish`` (the buckets' keys are set on the real Redis); then timers and
sweeps at once on the real database; then a real worker on real Redis.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone
from pytest_django import DjangoCaptureOnCommitCallbacks, Settings

from orders import broker, get_order_model, scheduling, services
from orders.conf import DEFAULTS
from orders.models import REMIND, SWEEP, TIMER, AbstractOrder, OrderTransition, Status
from orders.services import ReminderOutcome
from orders.tasks import remind_order_task
from tests.chaos import key_prefix, reminder_violations, wait_for, workers
from tests.conftest import at_once, worker_env
from tests.gateways import redis_client
from tests.redis_server import publishing_to, queued, unacked

Order = get_order_model()

T0 = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)
BEFORE = 300
TIMEOUT = 600
GRACE = DEFAULTS["SWEEP_GRACE"]
HORIZON = DEFAULTS["TIMER_HORIZON"]


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def place(*, timeout: float = TIMEOUT, now: datetime = T0) -> AbstractOrder:
    return services.place_order(amount="10.00", timeout=timeout, now=now)


def reminders(order: AbstractOrder) -> list[tuple[str, str, datetime]]:
    """The order's reminders: who sent each, the reason (naming the deadline), when."""
    return list(
        OrderTransition.objects.filter(order_id=order.pk, transition=REMIND)
        .order_by("id")
        .values_list("actor", "reason", "at")
    )


def reminded_of(deadline: datetime) -> str:
    return f"{services.REMINDER_REASON}{deadline.isoformat()}"


@pytest.fixture
def remind_before(settings: Settings) -> int:
    settings.ORDERS = settings.ORDERS | {"REMIND_BEFORE": BEFORE}
    return BEFORE


@dataclass(frozen=True)
class Sent:
    task: str
    args: tuple[Any, ...]
    countdown: float


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> list[Sent]:
    """What the timers and follow-up tasks would have sent to the broker, in per-order
    mode (a countdown task per timer, so there is something to see)."""
    settings.ORDERS = settings.ORDERS | {"TIMER_MODE": "per_order"}
    record: list[Sent] = []

    def publish(task: Any, **options: Any) -> None:
        record.append(Sent(task.name, tuple(options["args"]), options.get("countdown", 0.0)))

    monkeypatch.setattr(scheduling, "publish", publish)
    return record


def timers(sent: list[Sent], task: str) -> list[Sent]:
    return [s for s in sent if s.task == task]


# The rules -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_reminder_is_sent_once_remind_before_the_deadline_and_not_before(
    remind_before: int,
) -> None:
    order = place()
    deadline = order.expires_at

    assert services.remind_order(order_id=order.pk, now=at(BEFORE - 0.001)) == (
        ReminderOutcome.NOT_YET_DUE
    )
    assert reminders(order) == []

    assert services.remind_order(order_id=order.pk, now=at(BEFORE)) == ReminderOutcome.SENT
    assert services.remind_order(order_id=order.pk, now=at(BEFORE + 1)) == (
        ReminderOutcome.ALREADY_SENT
    )
    assert services.remind_due_orders(due_by=at(BEFORE + 2), by=SWEEP, now=at(BEFORE + 2)) == 0

    assert reminders(order) == [("expiry timer", reminded_of(deadline), at(BEFORE))]
    event = OrderTransition.objects.get(order_id=order.pk, transition=REMIND)
    assert event.event_type == "order.expiring_soon"
    assert (event.source, event.target) == (Status.CREATED, Status.CREATED)
    order.refresh_from_db()
    assert order.reminded_for == deadline
    assert order.status == Status.CREATED


@pytest.mark.django_db
def test_reminder_is_owed_again_for_the_new_deadline_after_an_extension(
    remind_before: int,
    sent: list[Sent],
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    order = place()
    first = order.expires_at
    assert services.remind_order(order_id=order.pk, now=at(BEFORE)) == ReminderOutcome.SENT

    with django_capture_on_commit_callbacks(execute=True):
        second = services.extend_order(
            order_id=order.pk, seconds=TIMEOUT, by="customer", now=at(BEFORE + 10)
        ).expires_at
    assert second == at(2 * TIMEOUT)
    assert [s.args for s in timers(sent, "orders.remind_order")] == [
        (str(order.pk), second.isoformat())
    ], "the extension arms the new deadline's reminder"

    # The first deadline's timer, should it fire now, leaves it to the new one's.
    assert services.remind_order(order_id=order.pk, deadline=first, now=at(BEFORE + 20)) == (
        ReminderOutcome.DEADLINE_MOVED
    )
    assert services.remind_order(order_id=order.pk, now=at(2 * TIMEOUT - BEFORE - 1)) == (
        ReminderOutcome.NOT_YET_DUE
    )
    assert services.remind_order(
        order_id=order.pk, deadline=second, now=at(2 * TIMEOUT - BEFORE)
    ) == (ReminderOutcome.SENT)

    assert [reason for _, reason, _ in reminders(order)] == [
        reminded_of(first),
        reminded_of(second),
    ]


@pytest.mark.django_db
@pytest.mark.parametrize("settle", ["pay", "cancel"])
def test_no_reminder_for_an_order_paid_or_cancelled_before_its_reminder_time(
    remind_before: int, settle: str
) -> None:
    order = place()
    if settle == "pay":
        services.record_payment(
            order_id=order.pk, payment_ref="pay-1", amount="10.00", now=at(BEFORE - 1)
        )
    else:
        services.cancel_order(order_id=order.pk, by="customer", now=at(BEFORE - 1))

    assert services.remind_order(order_id=order.pk, now=at(BEFORE)) == ReminderOutcome.NOT_UNPAID
    assert services.remind_due_orders(due_by=at(BEFORE), by=SWEEP, now=at(BEFORE)) == 0
    assert services.sweep(now=at(BEFORE + GRACE + 1)).reminders_sent == 0
    assert reminders(order) == []


@pytest.mark.django_db
def test_no_reminder_once_the_deadline_has_passed(remind_before: int) -> None:
    order = place()

    assert services.remind_order(order_id=order.pk, now=at(TIMEOUT)) == (
        ReminderOutcome.DEADLINE_PASSED
    )
    assert services.remind_due_orders(due_by=at(TIMEOUT), by=SWEEP, now=at(TIMEOUT)) == 0
    assert reminders(order) == []


@pytest.mark.django_db
def test_a_timer_fired_many_times_sends_one_reminder(remind_before: int) -> None:
    # Placed with less than REMIND_BEFORE left: reminded at once (the timer's countdown
    # is 0), as an order extended to a deadline that close is.
    order = services.place_order(amount="10.00", timeout=BEFORE - 10)

    results = [
        remind_order_task.apply(args=(str(order.pk), order.expires_at.isoformat())).get()
        for _ in range(5)
    ]

    assert results == [ReminderOutcome.SENT] + [ReminderOutcome.ALREADY_SENT] * 4
    assert len(reminders(order)) == 1


@pytest.mark.django_db
def test_a_timer_that_fires_a_moment_early_arms_itself_again(
    remind_before: int,
    sent: list[Sent],
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    now = timezone.now()
    order = place(now=now)
    remind_at = order.expires_at - timedelta(seconds=BEFORE)

    with django_capture_on_commit_callbacks(execute=True):
        outcome = services.remind_order(
            order_id=order.pk, deadline=order.expires_at, now=remind_at - timedelta(seconds=0.01)
        )

    assert outcome == ReminderOutcome.NOT_YET_DUE
    [again] = timers(sent, "orders.remind_order")
    assert again.args == (str(order.pk), order.expires_at.isoformat())
    assert reminders(order) == []


@pytest.mark.django_db
def test_the_sweep_sends_a_lost_reminder_once_after_the_grace(remind_before: int) -> None:
    # Its timer never ran (this test's transaction never commits, so none was sent).
    order = place()

    assert services.sweep(now=at(BEFORE + GRACE - 1)).reminders_sent == 0, "the timer's turn"
    assert services.sweep(now=at(BEFORE + GRACE)).reminders_sent == 1
    assert services.sweep(now=at(BEFORE + GRACE + 30)).reminders_sent == 0

    assert reminders(order) == [("sweep", reminded_of(order.expires_at), at(BEFORE + GRACE))]
    order.refresh_from_db()
    assert order.status == Status.CREATED, "a reminder is no transition"


@pytest.mark.django_db
def test_the_sweep_leaves_alone_a_reminder_its_timer_sent(remind_before: int) -> None:
    order = place()
    services.remind_order(order_id=order.pk, now=at(BEFORE))

    assert services.sweep(now=at(BEFORE + GRACE + 1)).reminders_sent == 0
    assert reminders(order) == [("expiry timer", reminded_of(order.expires_at), at(BEFORE))]


# Timers ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_per_order_mode_arms_the_reminder_with_the_expiry_timer(
    remind_before: int,
    sent: list[Sent],
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        order = place(now=timezone.now())

    [expiry] = timers(sent, "orders.expire_order")
    [reminder] = timers(sent, "orders.remind_order")
    assert reminder.args == (str(order.pk), order.expires_at.isoformat())
    assert expiry.countdown - reminder.countdown == pytest.approx(BEFORE, abs=0.5)
    assert 0 < reminder.countdown <= TIMEOUT - BEFORE


@pytest.mark.django_db
def test_batched_mode_arms_each_reminder_bucket_once(
    remind_before: int,
    settings: Settings,
    sent: list[Sent],
    timers_key: str,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    settings.ORDERS = settings.ORDERS | {"TIMER_MODE": "batched", "TIMER_RESOLUTION": 1}
    client = broker.redis_client()
    now = timezone.now().replace(microsecond=0) + timedelta(days=uuid.uuid4().int % 10_000)
    with django_capture_on_commit_callbacks(execute=True):
        orders = [place(timeout=TIMEOUT + 0.1 * i, now=now) for i in range(1, 6)]

    deadline_bucket = scheduling.bucket_of(orders[-1].expires_at)
    reminder_bucket = scheduling.bucket_of(orders[-1].expires_at - timedelta(seconds=BEFORE))
    assert client.zrange(scheduling.timers_key(), 0, -1) == [
        f"remind:{reminder_bucket}".encode(),
        f"expire:{deadline_bucket}".encode(),
    ]
    assert sent == [], "no task is published until a bucket is due"


@pytest.mark.django_db
def test_a_reminder_bucket_reminds_the_orders_due_by_its_end_only(
    remind_before: int, settings: Settings
) -> None:
    settings.ORDERS = settings.ORDERS | {"TIMER_RESOLUTION": 1}
    early, late, later = (place(timeout=TIMEOUT + offset) for offset in (0.2, 0.9, 1.5))
    bucket = scheduling.bucket_of(late.expires_at - timedelta(seconds=BEFORE))

    assert services.remind_bucket(bucket=bucket, now=at(BEFORE + 1)) == 2

    assert [len(reminders(order)) for order in (early, late, later)] == [1, 1, 0]
    assert services.remind_bucket(bucket=bucket + 1000, now=at(BEFORE + 2)) == 1
    assert services.remind_bucket(bucket=bucket + 1000, now=at(BEFORE + 2)) == 0


@pytest.mark.django_db
def test_a_deadline_beyond_the_horizon_gets_its_reminder_when_the_sweep_arms_it(
    remind_before: int,
    sent: list[Sent],
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    now = timezone.now()
    with django_capture_on_commit_callbacks(execute=True):
        order = place(timeout=HORIZON + 600, now=now)
    assert sent == [], "nothing armed beyond the horizon"

    with django_capture_on_commit_callbacks(execute=True):
        report = services.sweep(now=now + timedelta(seconds=601))
    assert report.timers_armed == 1
    assert [s.args for s in timers(sent, "orders.remind_order")] == [
        (str(order.pk), order.expires_at.isoformat())
    ]


@pytest.mark.django_db
def test_nothing_is_armed_or_queried_for_reminders_when_they_are_off(
    sent: list[Sent],
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
    django_assert_num_queries: Callable[..., Any],
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        order = place(now=timezone.now())

    assert timers(sent, "orders.expire_order")
    assert not timers(sent, "orders.remind_order") + timers(sent, "orders.remind_bucket")
    with django_assert_num_queries(0):
        assert services.remind_due_orders(due_by=at(10**6), by=SWEEP) == 0
    assert services.remind_order(order_id=order.pk) == ReminderOutcome.OFF
    assert services.sweep(now=order.expires_at - timedelta(seconds=1)).reminders_sent == 0
    assert reminders(order) == []


# At once, on the real database -------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_timers_and_sweeps_racing_send_each_order_one_reminder(remind_before: int) -> None:
    orders = [services.place_order(amount="10.00", timeout=BEFORE - 60) for _ in range(10)]
    ids = [order.pk for order in orders]
    calls = iter(range(100))

    def timer_or_sweep() -> int:
        if next(calls) % 2:
            return services.remind_due_orders(due_by=timezone.now(), by=SWEEP)
        return sum(
            services.remind_order(order_id=pk, by=TIMER) == ReminderOutcome.SENT for pk in ids
        )

    sent = at_once(6, timer_or_sweep)

    assert sum(sent) == len(orders)
    for order in orders:
        assert len(reminders(order)) == 1


# A real worker on real Redis ---------------------------------------------------------------

WORKER_BEFORE = 2  # REMIND_BEFORE of the worker below (seconds)


@pytest.fixture(scope="module")
def reminding_worker(django_db_setup: Any, django_db_blocker: Any) -> Iterator[str]:
    """A worker with REMIND_BEFORE set (the session's has none), on keys of its own;
    yields the key prefix to publish to."""
    prefix = key_prefix("reminders")
    env = worker_env(CELERY_KEY_PREFIX=prefix, ORDERS_REMIND_BEFORE=str(WORKER_BEFORE))
    with django_db_blocker.unblock(), workers("reminders", 1, env):
        yield prefix


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("mode", ["per_order", "batched"])
def test_the_reminder_arrives_before_the_deadline_and_then_the_order_expires(
    reminding_worker: str, settings: Settings, mode: str
) -> None:
    settings.ORDERS = settings.ORDERS | {"REMIND_BEFORE": WORKER_BEFORE, "TIMER_MODE": mode}
    with publishing_to(settings.CELERY_BROKER_URL, reminding_worker):
        orders = [services.place_order(amount="10.00", timeout=4 + 0.3 * i) for i in range(3)]
        paid = services.place_order(amount="10.00", timeout=4)
        services.record_payment(order_id=paid.pk, payment_ref="pay-r", amount="10.00")
        ids = [order.pk for order in orders]

        wait_for(
            lambda: not Order.objects.filter(pk__in=ids, status=Status.CREATED).exists(),
            15,
            "the orders to expire",
        )
        time.sleep(0.5)  # a stray reminder would have come by now

    for order in Order.objects.filter(pk__in=ids):
        history = list(order.history.values_list("transition", "at"))
        assert [name for name, _ in history] == ["place", REMIND, "expire"], history
        reminded_at = history[1][1]
        early = (order.expires_at - reminded_at).total_seconds()
        assert 0 < early <= WORKER_BEFORE, f"reminded {early:.3f}s before the deadline"
        assert early > WORKER_BEFORE - 1.5, f"reminded {WORKER_BEFORE - early:.3f}s late"
        assert reminders(order)[0][0] == "expiry timer"
    assert reminders(paid) == [], "no reminder for a paid order"


# Randomized: payments, cancellations, extensions and duplicate timers at reminder time ----

CHAOS_BEFORE = 3  # REMIND_BEFORE of the randomized run (seconds)
ACTIONS = ("pay", "cancel", "extend")


def act(action: str, order_id: Any, rng: random.Random) -> str:
    """One customer's move on an order; what it came to."""
    try:
        if action == "pay":
            ref = f"pay-{order_id}"
            payment = services.record_payment(order_id=order_id, payment_ref=ref, amount="10.00")
            return f"pay {payment.outcome}"
        if action == "cancel":
            services.cancel_order(order_id=order_id, by="customer")
        else:
            services.extend_order(order_id=order_id, seconds=rng.uniform(1, 3), by="customer")
    except services.InvalidTransition:
        return f"{action} refused"
    return f"{action} done"


@pytest.mark.chaos
@pytest.mark.django_db(transaction=True)
def test_randomized_races_keep_one_reminder_per_deadline_and_none_after_pay_or_cancel(
    settings: Settings,
) -> None:
    seed = int(os.environ.get("ORDERS_CHAOS_SEED") or random.randrange(1_000_000))
    rng = random.Random(seed)
    mode = rng.choice(["per_order", "batched"])
    n = 60 if connection.vendor == "postgresql" else 40
    # Sweeps with no grace: they race the timers at every reminder time and deadline.
    settings.ORDERS = settings.ORDERS | {
        "REMIND_BEFORE": CHAOS_BEFORE,
        "TIMER_MODE": mode,
        "SWEEP_GRACE": 0,
    }
    print(f"\nrandomized reminders: seed {seed}, {n} orders, {mode}, {connection.vendor}")
    prefix = key_prefix("remind-chaos")
    env = worker_env(
        CELERY_KEY_PREFIX=prefix,
        ORDERS_REMIND_BEFORE=str(CHAOS_BEFORE),
        ORDERS_LOG_LEVEL="WARNING",
    )
    broker = redis_client()
    made: list[str] = []  # what each move came to (list.append: safe across threads)
    with workers("remind-chaos", 2, env), publishing_to(settings.CELERY_BROKER_URL, prefix):
        orders = [services.place_order(amount="10.00", timeout=rng.uniform(4, 8)) for _ in range(n)]
        scripts: list[list[tuple[float, str, Any]]] = [[], [], []]
        for order in orders:
            remind_at = order.expires_at.timestamp() - CHAOS_BEFORE
            if rng.random() < 0.7:
                when = remind_at + rng.uniform(-0.3, 0.3)
                rng.choice(scripts).append((when, rng.choice(ACTIONS), order.pk))
            for _ in range(2):  # its reminder timer, twice more
                remind_order_task.apply_async(
                    args=(str(order.pk), order.expires_at.isoformat()),
                    countdown=max(0.0, remind_at - time.time() + rng.uniform(-0.2, 0.2)),
                )

        def run(script: list[tuple[float, str, Any]], seed: int) -> None:
            own = random.Random(seed)
            try:
                for when, action, order_id in sorted(script, key=lambda step: step[0]):
                    time.sleep(max(0.0, when - time.time()))
                    made.append(act(action, order_id, own))
            finally:
                connection.close()

        actors = [threading.Thread(target=run, args=(s, rng.random())) for s in scripts]
        for actor in actors:
            actor.start()
        ids = [order.pk for order in orders]

        def settled() -> bool:
            services.sweep()
            time.sleep(0.2)
            unpaid = Order.objects.filter(pk__in=ids, status=Status.CREATED).exists()
            return not unpaid and queued(broker, prefix) == 0 and unacked(broker, prefix) == 0

        wait_for(settled, 60, "every order to settle and every timer to run")
        for actor in actors:
            actor.join(timeout=10)

    mine = Order.objects.filter(pk__in=ids)
    found = reminder_violations(mine, remind_before=CHAOS_BEFORE)
    sent = OrderTransition.objects.filter(order_id__in=ids, transition=REMIND)
    print(
        f"moves {dict(Counter(made))}; reminders {sent.count()} "
        f"({dict(Counter(sent.values_list('actor', flat=True)))}); violations {len(found)}"
    )
    assert len(made) == sum(len(s) for s in scripts), "every move was made"
    assert found == [], "\n".join(found[:30])
