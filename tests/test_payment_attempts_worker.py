"""Payment attempts on the real worker and Redis: the expiry timer (a countdown task, per
order or per bucket) finds a held order past its deadline, asks the provider, and pays,
expires or asks again; the close at the provider is a task on the worker too.

The local gateway answers what ``simulate`` told it, in this run's Redis, so the worker
and the test see the same provider. tests/settings.py gives the suite's worker a
payment method "quick" whose hold is capped at 4 s, and asks a pending attempt again
every second. Time is real here; tests/test_payment_attempts.py has the arithmetic with
time injected.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone
from pytest_django import Settings

from orders import get_order_model, services
from orders.gateways import LocalPaymentGateway, _local_redis, payment_gateway
from orders.models import (
    PAYMENT_FAILED,
    PAYMENT_PENDING,
    PLACE,
    REFUND_PAYMENT,
    AbstractOrder,
    CancelReason,
    OrderTransition,
    Payment,
    PaymentAttempt,
    Status,
)
from orders.services import InvalidTransition
from orders.tasks import close_payment_task, refund_payment_task
from tests.chaos import (
    attempt_violations,
    expired_by,
    key_prefix,
    outcome_counts,
    violations,
    wait_for,
)
from tests.conftest import WorkerProcess, at_once, worker_env
from tests.redis_server import publishing_to

Order = get_order_model()

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _per_order_timers(settings: Settings) -> None:
    """Per-order timers, whose log names each order's timer run; the batched engine is
    tested at the end."""
    settings.ORDERS = settings.ORDERS | {"TIMER_MODE": "per_order"}


AMOUNT = "10.00"
QUICK_CAP = 4  # ORDERS["PAYMENT_HOLD"]["quick"] in tests/settings.py


def ref(what: str = "att") -> str:
    """A reference no other test used (the local gateway keeps attempts in Redis)."""
    return f"{what}-{uuid.uuid4().hex[:12]}"


def gateway() -> LocalPaymentGateway:
    local = payment_gateway()
    assert isinstance(local, LocalPaymentGateway)
    return local


def close_calls(attempt_ref: str) -> int:
    """How often the provider was told to close the attempt (the local gateway counts)."""
    raw = _local_redis().hget(LocalPaymentGateway._key(attempt_ref), "close_calls")
    return int(raw or 0)


def place(timeout: float) -> AbstractOrder:
    return services.place_order(amount=AMOUNT, timeout=timeout)


def start(
    order: AbstractOrder, attempt_ref: str, *, hold_for: float | None, method: str = "quick"
) -> PaymentAttempt:
    return services.start_payment(
        order_id=order.pk, attempt_ref=attempt_ref, method=method, hold_for=hold_for
    )


def sleep_until(moment: datetime) -> None:
    time.sleep(max(0.0, (moment - timezone.now()).total_seconds()))


def fresh(order: AbstractOrder) -> AbstractOrder:
    return Order.objects.get(pk=order.pk)


def history(order: AbstractOrder) -> list[str]:
    return list(
        OrderTransition.objects.filter(order_id=order.pk)
        .order_by("at", "id")
        .values_list("transition", flat=True)
    )


def state(order: AbstractOrder) -> dict[str, Any]:
    """What a duplicate must not change: the order, its payments, attempts and history
    (not the event delivery columns, which the worker's dispatcher writes meanwhile)."""
    return {
        "order": Order.objects.filter(pk=order.pk).values().get(),
        "payments": list(Payment.objects.filter(order_id=order.pk).order_by("pk").values()),
        "attempts": list(PaymentAttempt.objects.filter(order_id=order.pk).order_by("pk").values()),
        "history": list(
            OrderTransition.objects.filter(order_id=order.pk)
            .order_by("pk")
            .values_list("pk", "transition", "actor", "at")
        ),
    }


def log_has(worker: WorkerProcess, text: str) -> bool:
    return text in worker.log()


def ran(worker: WorkerProcess, task_ids: list[str]) -> None:
    """Wait until the worker has run each of these tasks."""
    wait_for(
        lambda: all(f"[{task_id}] succeeded" in worker.log() for task_id in task_ids),
        10,
        f"the worker to run {len(task_ids)} tasks",
    )


# a. Paid after the original deadline -----------------------------------------------------


@pytest.mark.parametrize("paid", ["before the hold ends", "after it, found when asked again"])
def test_an_attempt_paid_after_the_deadline_pays_the_order_and_its_webhook_changes_nothing(
    celery_worker_process: WorkerProcess, paid: str
) -> None:
    order = place(timeout=2)
    attempt_ref, payment_ref = ref(), ref("pay")
    attempt = start(order, attempt_ref, hold_for=3, method="card")  # capped at 15 min

    sleep_until(order.expires_at)
    time.sleep(0.3)
    assert fresh(order).status == Status.CREATED, "held past its deadline"
    if paid != "before the hold ends":
        # Asked at the hold's end, "pending": re-armed to ask again a second later.
        wait_for(
            lambda: log_has(
                celery_worker_process,
                f"Expiry of order {order.pk} by the expiry timer: no-op, held by a payment",
            ),
            attempt.hold_until.timestamp() - time.time() + 5,
            "the timer to ask and be told pending",
        )
        assert fresh(order).status == Status.CREATED
    gateway().simulate(attempt_ref, "paid", payment_ref=payment_ref, amount=AMOUNT, currency="CNY")
    paid_after = timezone.now()

    wait_for(lambda: fresh(order).status == Status.DELIVERED, 10, "the order to be paid and ship")
    order = fresh(order)
    assert order.payment_ref == payment_ref
    assert order.paid_at is not None
    assert order.paid_at > order.deadline, "paid after the shop's own deadline"
    assert order.paid_at >= min(paid_after, attempt.hold_until)
    [payment] = Payment.objects.filter(order_id=order.pk)
    assert (payment.reference, payment.outcome) == (payment_ref, Payment.Outcome.ACCEPTED)
    assert not payment.needs_refund
    attempt.refresh_from_db()
    assert (attempt.outcome, attempt.payment_id) == (PaymentAttempt.Outcome.PAID, payment.pk)
    assert attempt.closed_at_provider is None
    assert history(order) == [PLACE, PAYMENT_PENDING, "pay", "ship"]

    # The provider's webhook for the same payment, late and named or not: a duplicate.
    before = state(order)
    for attempt_named in (attempt_ref, None):
        again = services.record_payment(
            order_id=order.pk, payment_ref=payment_ref, amount=AMOUNT, attempt_ref=attempt_named
        )
        assert again.pk == payment.pk
    assert state(order) == before
    assert close_calls(attempt_ref) == 0


# b. Failed at the provider ------------------------------------------------------------------


def test_an_attempt_that_fails_expires_the_order_at_the_end_of_its_hold(
    celery_worker_process: WorkerProcess,
) -> None:
    order = place(timeout=2)
    attempt_ref = ref()
    attempt = start(order, attempt_ref, hold_for=3)
    gateway().simulate(attempt_ref, "failed")

    sleep_until(order.expires_at)
    time.sleep(0.3)
    assert fresh(order).status == Status.CREATED, "held past its deadline"
    wait_for(lambda: fresh(order).status == Status.CANCELLED, 10, "the order to expire")

    order = fresh(order)
    attempt.refresh_from_db()
    assert order.cancel_reason == CancelReason.TIMEOUT
    assert order.cancelled_at is not None
    assert attempt.hold_until <= order.cancelled_at < attempt.hold_until + timedelta(seconds=1.5)
    assert attempt.outcome == PaymentAttempt.Outcome.FAILED
    assert "failed at the provider" in attempt.detail
    assert history(order) == [PLACE, PAYMENT_PENDING, PAYMENT_FAILED, "expire"]
    assert set(
        OrderTransition.objects.filter(
            order_id=order.pk, transition__in=[PAYMENT_FAILED, "expire"]
        ).values_list("actor", flat=True)
    ) == {"expiry timer"}
    attempt.refresh_from_db()
    assert attempt.closed_at_provider is None, "failed there: nothing to close"
    assert close_calls(attempt_ref) == 0


# c. A provider that never answers -------------------------------------------------------------


def test_a_provider_that_never_answers_expires_the_order_at_the_cap_and_is_closed_once(
    celery_worker_process: WorkerProcess,
) -> None:
    order = place(timeout=2)
    attempt_ref = ref()
    attempt = start(order, attempt_ref, hold_for=2)  # the hold ends with the deadline
    assert (attempt.cap_at - attempt.started_at).total_seconds() == QUICK_CAP
    gateway().simulate(attempt_ref, LocalPaymentGateway.SILENT)

    wait_for(lambda: fresh(order).status == Status.CANCELLED, QUICK_CAP + 8, "the order to expire")
    order = fresh(order)
    attempt.refresh_from_db()
    assert order.cancel_reason == CancelReason.TIMEOUT
    assert order.cancelled_at is not None
    assert order.cancelled_at >= attempt.cap_at, "expired at the cap, not before"
    assert order.cancelled_at < attempt.cap_at + timedelta(seconds=1.5)
    assert attempt.outcome == PaymentAttempt.Outcome.TIMED_OUT
    assert "did not answer" in attempt.detail
    assert history(order) == [PLACE, PAYMENT_PENDING, PAYMENT_FAILED, "expire"]
    # Asked at the hold's end, then every second until the cap: each one unanswered.
    asked = celery_worker_process.log().count(f"did not say what became of attempt {attempt_ref}")
    assert asked >= QUICK_CAP - 2, f"asked {asked} times"

    # Closed at the provider by the task, on the worker; once, however often it is sent.
    wait_for(
        lambda: PaymentAttempt.objects.get(pk=attempt.pk).closed_at_provider is not None,
        10,
        "the close task to run",
    )
    services.sweep()
    ran(celery_worker_process, [close_payment_task.delay(str(attempt.pk)).id for _ in range(3)])
    assert close_calls(attempt_ref) == 1


# d. Duplicate and late notifications ---------------------------------------------------------


def test_the_same_attempt_started_at_once_from_four_requests_is_one_attempt(
    celery_worker_process: WorkerProcess,
) -> None:
    order = place(timeout=60)
    attempt_ref = ref()
    answers = at_once(
        4,
        lambda: services.start_payment(
            order_id=order.pk, attempt_ref=attempt_ref, method="card", hold_for=120
        ),
    )
    assert len(answers) == 4
    assert len({attempt.pk for attempt in answers}) == 1
    [attempt] = PaymentAttempt.objects.filter(order_id=order.pk)
    assert attempt.reference == attempt_ref
    assert history(order) == [PLACE, PAYMENT_PENDING]
    order = fresh(order)
    assert (order.expires_at, order.original_expires_at) == (
        attempt.hold_until,
        order.created_at + timedelta(seconds=60),
    )


def test_an_attempt_started_after_the_order_expired_is_refused_and_changes_nothing(
    celery_worker_process: WorkerProcess,
) -> None:
    order = place(timeout=1)
    wait_for(lambda: fresh(order).status == Status.CANCELLED, 10, "the order to expire")
    before = state(order)
    with pytest.raises(InvalidTransition):
        start(order, ref(), hold_for=60)
    assert state(order) == before


def test_a_payment_for_an_attempt_already_closed_is_late_and_refunded_once(
    celery_worker_process: WorkerProcess,
) -> None:
    order = place(timeout=1)
    attempt_ref, payment_ref = ref(), ref("pay")
    start(order, attempt_ref, hold_for=1.5)
    gateway().simulate(attempt_ref, "failed")
    wait_for(lambda: fresh(order).status == Status.CANCELLED, 10, "the order to expire")

    # The provider's notification comes anyway, twice at once.
    payments = at_once(
        2,
        lambda: services.record_payment(
            order_id=order.pk, payment_ref=payment_ref, amount=AMOUNT, attempt_ref=attempt_ref
        ),
    )
    assert len({payment.pk for payment in payments}) == 1
    assert payments[0].outcome == Payment.Outcome.LATE
    wait_for(
        lambda: Payment.objects.get(reference=payment_ref).refunded_at is not None,
        10,
        "the refund task to run",
    )
    refunded = Payment.objects.get(reference=payment_ref)
    # Once more, the refund task and the webhook.
    services.record_payment(
        order_id=order.pk, payment_ref=payment_ref, amount=AMOUNT, attempt_ref=attempt_ref
    )
    ran(celery_worker_process, [refund_payment_task.delay(str(refunded.pk)).id])
    again = Payment.objects.get(reference=payment_ref)
    assert (again.refunded_at, again.refund_ref) == (refunded.refunded_at, refunded.refund_ref)
    assert history(order) == [PLACE, PAYMENT_PENDING, PAYMENT_FAILED, "expire", REFUND_PAYMENT]
    assert celery_worker_process.log().count(f"Payment {payment_ref} (late) of order") == 1
    attempt = PaymentAttempt.objects.get(reference=attempt_ref)
    assert (attempt.outcome, attempt.payment_id) == (PaymentAttempt.Outcome.FAILED, None)


# e. Attempts racing the sweep -------------------------------------------------------------------

ANSWERS = ("paid", "failed", "pending", LocalPaymentGateway.SILENT)


def place_held(count: int) -> tuple[list[AbstractOrder], datetime, set[str]]:
    """``count`` orders sharing one deadline, then, just before it, a "quick" attempt for
    each whose hold ends a second after it: the holds end together (within the 4 s cap
    of the first attempt started). Returns the orders, the holds' end and the ids of
    those held (an order whose turn comes too close to its deadline, on a slow machine,
    is left alone and expires as any other)."""
    postgres = connection.vendor == "postgresql"
    per_place, per_start = (0.02, 0.03) if postgres else (0.05, 0.06)
    placed_by = time.time() + count * per_place + 0.5
    deadline = placed_by + count * per_start + 0.5
    orders = [place(timeout=deadline - time.time()) for _ in range(count)]
    time.sleep(max(0.0, placed_by - time.time()))
    holds_end = deadline + 1.0
    held = set()
    for order in orders:
        if time.time() > deadline - 0.05:
            continue  # too late to be held: it expires as any other order
        start(order, f"race-{order.pk}", hold_for=holds_end - time.time())
        held.add(str(order.pk))
    return orders, datetime.fromtimestamp(holds_end, tz=UTC), held


@contextmanager
def sweeping(threads: int) -> Iterator[Counter[str]]:
    """``services.sweep()`` over and over in ``threads`` threads of this process, each with
    its own database connection, for as long as the block lasts. Yields the sweeps'
    totals; an exception in a sweep fails the test."""
    stop, errors = threading.Event(), []
    totals: Counter[str] = Counter()

    def run() -> None:
        try:
            while not stop.is_set():
                report = services.sweep()
                totals["sweeps"] += 1
                totals["expired"] += report.expired
                totals["payments closed"] += report.payments_closed
                totals["errors"] += len(report.errors)
        except Exception as exc:  # reported by the test, below
            errors.append(exc)
        finally:
            connection.close()

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for thread in workers:
        thread.start()
    try:
        yield totals
    finally:
        stop.set()
        for thread in workers:
            thread.join(timeout=60)
    assert errors == [], errors


def test_attempts_racing_the_sweep_each_order_has_one_outcome(
    celery_worker_process: WorkerProcess, settings: Settings
) -> None:
    """Many orders whose holds end together, the provider answering paid, failed,
    pending or nothing, while the worker's timers fire and three sweeps run without
    grace: each order ends once, as its answer says, and each attempt the provider could
    still take money for is closed there once."""
    settings.ORDERS = settings.ORDERS | {"SWEEP_GRACE": 0}
    count = 80 if connection.vendor == "postgresql" else 40
    orders, holds_end, held = place_held(count)
    answer = {str(o.pk): ANSWERS[i % len(ANSWERS)] for i, o in enumerate(orders)}
    with sweeping(3) as sweeps:
        sleep_until(min(o.expires_at for o in orders))  # past the shop's deadline
        for order_id in held:
            status = answer[order_id]
            gateway().simulate(
                f"race-{order_id}",
                status,
                payment_ref=f"pay-{order_id}" if status == "paid" else "",
                amount=AMOUNT if status == "paid" else None,
                currency="CNY" if status == "paid" else "",
            )
        answered = timezone.now()
        ids = [o.pk for o in orders]
        mine = Order.objects.filter(pk__in=ids)
        wait_for(
            lambda: not mine.filter(status__in=[Status.CREATED, Status.PAID]).exists(),
            QUICK_CAP + 20,
            "every order to settle",
        )
    unclosed = PaymentAttempt.objects.filter(
        order_id__in=ids,
        outcome__in=PaymentAttempt.CLOSE_AT_PROVIDER,
        closed_at_provider__isnull=True,
    )
    wait_for(lambda: not unclosed.exists(), 15, "every close task to run")

    attempts = {a.order_id: a for a in PaymentAttempt.objects.filter(order_id__in=ids)}
    calls = {a.reference: close_calls(a.reference) for a in attempts.values()}
    found = violations(mine, late_ok=None)
    found += attempt_violations(mine, close_calls=calls)
    expected = {
        "paid": (Status.DELIVERED, PaymentAttempt.Outcome.PAID),
        "failed": (Status.CANCELLED, PaymentAttempt.Outcome.FAILED),
        "pending": (Status.CANCELLED, PaymentAttempt.Outcome.TIMED_OUT),
        LocalPaymentGateway.SILENT: (Status.CANCELLED, PaymentAttempt.Outcome.TIMED_OUT),
    }
    for order in mine:
        if str(order.pk) not in held:
            if order.status != Status.CANCELLED or order.pk in attempts:
                found.append(f"order {order.pk}: not held, yet {order.status}")
            continue
        attempt = attempts[order.pk]
        said = answer[str(order.pk)]
        got = (order.status, attempt.outcome)
        if got != expected[said]:
            found.append(f"order {order.pk}: the provider said {said}, it ended {got}")
        if said == "paid" and order.payment_ref != f"pay-{order.pk}":
            found.append(f"order {order.pk}: paid by {order.payment_ref!r}")
        if order.status == Status.CANCELLED:
            assert order.cancelled_at is not None
            ends = attempt.cap_at if attempt.outcome == "timed_out" else attempt.hold_until
            if order.cancelled_at < ends:
                found.append(f"order {order.pk}: {said}, cancelled before {ends.isoformat()}")
    print(
        f"\n{len(held)} of {count} orders held ({connection.vendor}), holds ending "
        f"{holds_end.isoformat()}, "
        f"answered {answered.isoformat()}: outcomes {dict(outcome_counts(mine))}, expired by "
        f"{dict(expired_by(mine))}, sweeps {dict(sweeps)}; violations: {len(found)}"
    )
    assert found == [], "\n".join(found[:30])


# Batched timers ------------------------------------------------------------------------------


def test_batched_timers_ask_pay_expire_and_close_as_per_order_timers_do(settings: Settings) -> None:
    """Paid after the deadline, failed, and never answered, with batched timers: one task
    per bucket (held orders are re-armed in buckets too)."""
    settings.ORDERS = settings.ORDERS | {"TIMER_MODE": "batched"}
    prefix = key_prefix("attempts-batched")
    env = worker_env(CELERY_KEY_PREFIX=prefix, ORDERS_TIMER_MODE="batched")
    worker = WorkerProcess(name="attempts-batched", env=env)
    with publishing_to(settings.CELERY_BROKER_URL, prefix):
        worker.start()
        try:
            orders = {answer: place(timeout=2) for answer in ("paid", "failed", "silent")}
            attempts = {answer: start(order, ref(), hold_for=3) for answer, order in orders.items()}
            gateway().simulate(attempts["failed"].reference, "failed")
            gateway().simulate(attempts["silent"].reference, LocalPaymentGateway.SILENT)
            sleep_until(orders["paid"].expires_at)
            gateway().simulate(
                attempts["paid"].reference,
                "paid",
                payment_ref=f"pay-{orders['paid'].pk}",
                amount=AMOUNT,
                currency="CNY",
            )
            mine = Order.objects.filter(pk__in=[o.pk for o in orders.values()])
            wait_for(
                lambda: not mine.filter(status__in=[Status.CREATED, Status.PAID]).exists(),
                QUICK_CAP + 10,
                "every order to settle",
            )
            silent = PaymentAttempt.objects.get(pk=attempts["silent"].pk)
            wait_for(
                lambda: PaymentAttempt.objects.get(pk=silent.pk).closed_at_provider is not None,
                10,
                "the close task to run",
            )
            log = worker.log()
            # The local gateway's record is under this worker's key prefix.
            closed = {answer: close_calls(a.reference) for answer, a in attempts.items()}
        finally:
            worker.stop()

    paid, failed, never = (fresh(orders[a]) for a in ("paid", "failed", "silent"))
    assert (paid.status, paid.payment_ref) == (Status.DELIVERED, f"pay-{paid.pk}")
    assert not Payment.objects.get(order_id=paid.pk).needs_refund
    assert (failed.status, failed.cancel_reason) == (Status.CANCELLED, CancelReason.TIMEOUT)
    assert (never.status, never.cancel_reason) == (Status.CANCELLED, CancelReason.TIMEOUT)
    assert never.cancelled_at is not None
    assert never.cancelled_at >= silent.cap_at
    outcomes = {
        a: PaymentAttempt.objects.get(pk=attempt.pk).outcome for a, attempt in attempts.items()
    }
    assert outcomes == {"paid": "paid", "failed": "failed", "silent": "timed_out"}
    assert closed == {"paid": 0, "failed": 0, "silent": 1}
    assert "orders.expire_bucket[" in log
    assert "orders.expire_order[" not in log, "no per-order timer in batched mode"
