"""Payment attempts: a deadline that waits for a payment in flight, asks the provider
before it cancels, and closes the payment at the provider when the order ends otherwise.

Services only, with time injected (``now=``); the local gateway answers what
``simulate`` told it (kept in this run's Redis). The real worker's share is in
tests/test_payment_attempts_worker.py.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import transaction
from pytest_django import Settings

from orders import get_order_model, scheduling, services
from orders.gateways import GatewayError, LocalPaymentGateway, payment_gateway
from orders.models import (
    PAYMENT_FAILED,
    PAYMENT_PENDING,
    AbstractOrder,
    CancelReason,
    OrderTransition,
    Payment,
    PaymentAttempt,
    Status,
)
from orders.services import ExpiryOutcome, InvalidInput, InvalidTransition, OrderNotFound
from tests.dbstate import snapshot

Order = get_order_model()
pytestmark = pytest.mark.django_db

T0 = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)
CARD_CAP = 15 * 60  # ORDERS["PAYMENT_HOLD"]["card"], the default


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def ref() -> str:
    """An attempt reference no other test used (the local gateway keeps them in Redis)."""
    return f"att-{uuid.uuid4().hex[:12]}"


def gateway() -> LocalPaymentGateway:
    local = payment_gateway()
    assert isinstance(local, LocalPaymentGateway)
    return local


def place(timeout: float = 600) -> AbstractOrder:
    return services.place_order(amount="10.00", timeout=timeout, now=T0)


def start(
    order: AbstractOrder, attempt_ref: str, *, hold_for: float | None = None, when: float = 60
) -> PaymentAttempt:
    return services.start_payment(
        order_id=order.pk, attempt_ref=attempt_ref, method="card", hold_for=hold_for, now=at(when)
    )


def fresh(order: AbstractOrder) -> AbstractOrder:
    return Order.objects.get(pk=order.pk)


def rows(order: AbstractOrder, transition: str) -> list[OrderTransition]:
    return list(OrderTransition.objects.filter(order_id=order.pk, transition=transition))


# Starting a payment -----------------------------------------------------------------------


def test_an_attempt_holds_the_order_past_its_deadline_and_keeps_the_original() -> None:
    order = place(timeout=600)
    attempt = start(order, ref(), hold_for=900, when=500)

    order = fresh(order)
    assert order.expires_at == at(500 + 900)  # the hold's end: the effective deadline
    assert order.original_expires_at == at(600)
    assert order.deadline == at(600)
    assert (attempt.hold_until, attempt.cap_at) == (at(1400), at(500 + CARD_CAP))
    assert attempt.outcome == PaymentAttempt.Outcome.OPEN
    [row] = rows(order, PAYMENT_PENDING)
    assert row.event_type == "order.payment_pending"
    assert "card payment" in row.reason
    assert at(1400).isoformat() in row.reason


def test_a_hold_shorter_than_the_time_left_moves_no_deadline() -> None:
    order = place(timeout=600)
    attempt = start(order, ref(), hold_for=60, when=10)

    order = fresh(order)
    assert order.expires_at == at(600)
    assert order.is_held  # marked all the same: the sweep asks before expiring it
    assert order.original_expires_at == at(600)
    assert attempt.hold_until == at(70)
    assert len(rows(order, PAYMENT_PENDING)) == 1  # still in the history


def test_the_hold_is_capped_by_the_method_and_unknown_methods_take_the_default(
    settings: Settings,
) -> None:
    settings.ORDERS = settings.ORDERS | {"PAYMENT_HOLD": {"card": 100, "default": 40}}
    order = place(timeout=30)
    card = start(order, ref(), hold_for=10_000, when=0)
    other = services.start_payment(
        order_id=order.pk, attempt_ref=ref(), method="wechat_qr", now=at(0)
    )
    assert card.hold_until == card.cap_at == at(100)
    assert other.hold_until == other.cap_at == at(40)
    assert fresh(order).expires_at == at(100)


def test_the_same_attempt_again_changes_nothing() -> None:
    order = place()
    attempt_ref = ref()
    first = start(order, attempt_ref, when=60)
    before = snapshot()
    again = start(order, attempt_ref, hold_for=30, when=120)
    assert again.pk == first.pk
    assert again.hold_until == first.hold_until
    assert snapshot() == before


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"attempt_ref": "a\x00b"}, InvalidInput),
        ({"attempt_ref": "x" * 129}, InvalidInput),
        ({"attempt_ref": 12}, InvalidInput),
        ({"method": "Card"}, InvalidInput),
        ({"method": "m" * 33}, InvalidInput),
        ({"method": None}, InvalidInput),
        ({"hold_for": "1e400"}, InvalidInput),
        ({"hold_for": 0}, InvalidInput),
        ({"hold_for": -5}, InvalidInput),
        ({"hold_for": True}, InvalidInput),
        ({"order_id": "00000000-0000-4000-8000-000000000000"}, OrderNotFound),
        ({"order_id": "not-a-uuid"}, OrderNotFound),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(change: dict[str, object], error: type) -> None:
    order = place()
    before = snapshot()
    arguments: dict[str, object] = {
        "order_id": order.pk,
        "attempt_ref": ref(),
        "method": "card",
        "now": at(10),
    }
    with pytest.raises(error):
        services.start_payment(**(arguments | change))  # type: ignore[arg-type]
    assert snapshot() == before


def test_an_attempt_reference_of_another_order_is_refused() -> None:
    attempt_ref = ref()
    start(place(), attempt_ref)
    other = place()
    before = snapshot()
    with pytest.raises(InvalidInput, match="another order"):
        start(other, attempt_ref)
    assert snapshot() == before


@pytest.mark.parametrize("state", ["paid", "cancelled", "past its deadline"])
def test_only_an_unpaid_order_within_its_deadline_takes_an_attempt(state: str) -> None:
    order = place(timeout=600)
    if state == "paid":
        services.record_payment(order_id=order.pk, payment_ref=ref(), amount="10.00", now=at(1))
    elif state == "cancelled":
        services.cancel_order(order_id=order.pk, by="customer", now=at(1))
    before = snapshot()
    with pytest.raises(InvalidTransition):
        start(order, ref(), when=700 if state == "past its deadline" else 60)
    assert snapshot() == before


# Asking before cancelling ------------------------------------------------------------------


def test_a_held_order_is_not_expired_before_its_hold_ends() -> None:
    order = place(timeout=60)
    start(order, ref(), hold_for=300, when=30)
    assert services.expire_order(order_id=order.pk, now=at(61)) is not ExpiryOutcome.EXPIRED
    assert fresh(order).status == Status.CREATED


def test_paid_at_the_provider_after_the_deadline_pays_and_its_webhook_is_no_surplus() -> None:
    order = place(timeout=60)
    attempt_ref, payment_ref = ref(), ref()
    start(order, attempt_ref, hold_for=120, when=50)
    gateway().simulate(attempt_ref, "paid", payment_ref=payment_ref, amount="10.00", currency="CNY")

    assert services.expire_order(order_id=order.pk, now=at(171)) is ExpiryOutcome.PAID
    order = fresh(order)
    assert (order.status, order.payment_ref) == (Status.PAID, payment_ref)
    attempt = PaymentAttempt.objects.get(reference=attempt_ref)
    assert attempt.outcome == PaymentAttempt.Outcome.PAID
    assert attempt.payment is not None
    # The webhook that brings the same payment later is a duplicate: nothing to refund.
    again = services.record_payment(
        order_id=order.pk, payment_ref=payment_ref, amount="10.00", now=at(200)
    )
    assert again.outcome == Payment.Outcome.ACCEPTED
    assert Payment.objects.filter(order_id=order.pk).count() == 1
    assert not any(p.needs_refund for p in Payment.objects.filter(order_id=order.pk))


def test_failed_at_the_provider_the_attempt_closes_and_the_order_expires() -> None:
    order = place(timeout=60)
    attempt_ref = ref()
    start(order, attempt_ref, hold_for=120, when=50)
    gateway().simulate(attempt_ref, "failed")

    assert services.expire_order(order_id=order.pk, now=at(171)) is ExpiryOutcome.EXPIRED
    order = fresh(order)
    assert (order.status, order.cancel_reason) == (Status.CANCELLED, CancelReason.TIMEOUT)
    # It expired at the end of its hold; the shop's deadline is kept beside it.
    assert (order.expires_at, order.original_expires_at) == (at(170), at(60))
    attempt = PaymentAttempt.objects.get(reference=attempt_ref)
    assert attempt.outcome == PaymentAttempt.Outcome.FAILED
    assert attempt.closed_at_provider is None  # failed there: nothing to close
    [failed] = rows(order, PAYMENT_FAILED)
    assert failed.event_type == "order.payment_failed"
    assert "failed at the provider" in failed.reason
    assert [r.transition for r in order.history.all()] == [
        "place",
        PAYMENT_PENDING,
        PAYMENT_FAILED,
        "expire",
    ]


def test_pending_is_asked_again_until_the_cap_then_expired_and_closed_at_the_provider(
    settings: Settings,
) -> None:
    settings.ORDERS = settings.ORDERS | {"PAYMENT_STATUS_RECHECK": 60}
    order = place(timeout=60)
    attempt_ref = ref()
    attempt = start(order, attempt_ref, hold_for=120, when=50)  # hold 170, cap 950
    assert attempt.cap_at == at(950)

    assert services.expire_order(order_id=order.pk, now=at(171)) is ExpiryOutcome.HELD
    assert fresh(order).expires_at == at(231)  # asked again a minute later
    assert services.expire_order(order_id=order.pk, now=at(920)) is ExpiryOutcome.HELD
    assert fresh(order).expires_at == at(950)  # never past the cap
    assert services.expire_order(order_id=order.pk, now=at(951)) is ExpiryOutcome.EXPIRED

    attempt.refresh_from_db()
    assert attempt.outcome == PaymentAttempt.Outcome.TIMED_OUT
    assert "still pending" in attempt.detail
    # Closed at the provider, once however often it is asked to.
    for _ in range(3):
        services.close_payment(attempt_id=attempt.pk)
    attempt.refresh_from_db()
    assert attempt.closed_at_provider is not None
    assert _close_calls(attempt_ref) == 1


def test_a_provider_that_never_answers_does_not_hold_the_order_past_the_cap() -> None:
    order = place(timeout=60)
    attempt_ref = ref()
    start(order, attempt_ref, hold_for=120, when=50)
    gateway().simulate(attempt_ref, LocalPaymentGateway.SILENT)
    assert services.expire_order(order_id=order.pk, now=at(171)) is ExpiryOutcome.HELD
    assert services.expire_order(order_id=order.pk, now=at(950)) is ExpiryOutcome.EXPIRED
    attempt = PaymentAttempt.objects.get(reference=attempt_ref)
    assert attempt.outcome == PaymentAttempt.Outcome.TIMED_OUT
    assert "did not answer" in attempt.detail


def test_a_gateway_without_payment_status_counts_as_pending(settings: Settings) -> None:
    settings.ORDERS = settings.ORDERS | {
        "PAYMENT_GATEWAY": "tests.test_payment_attempts.RefundsOnly"
    }
    order = place(timeout=60)
    start(order, ref(), hold_for=120, when=50)
    assert services.expire_order(order_id=order.pk, now=at(171)) is ExpiryOutcome.HELD
    assert services.expire_order(order_id=order.pk, now=at(950)) is ExpiryOutcome.EXPIRED


class RefundsOnly:
    """A gateway from before payment attempts: refunds, nothing else."""

    def refund(
        self, *, payment_ref: str, amount: Decimal, currency: str, idempotency_key: str
    ) -> str:
        return "rf"


def _close_calls(attempt_ref: str) -> int:
    from orders.gateways import _local_redis

    raw = _local_redis().hget(LocalPaymentGateway._key(attempt_ref), "close_calls")
    return int(raw or 0)


def test_a_payment_webhook_for_an_open_attempt_past_its_hold_pays_the_order() -> None:
    order = place(timeout=60)
    attempt_ref = ref()
    start(order, attempt_ref, hold_for=120, when=50)  # held until 170
    payment = services.record_payment(
        order_id=order.pk,
        payment_ref=ref(),
        amount="10.00",
        attempt_ref=attempt_ref,
        now=at(180),  # past the hold, before anyone asked: what the order waited for
    )
    assert payment.outcome == Payment.Outcome.ACCEPTED
    assert fresh(order).status == Status.PAID
    assert PaymentAttempt.objects.get(reference=attempt_ref).outcome == PaymentAttempt.Outcome.PAID


def test_a_payment_for_a_closed_attempt_is_late_and_refunded() -> None:
    order = place(timeout=60)
    attempt_ref = ref()
    start(order, attempt_ref, hold_for=120, when=50)
    gateway().simulate(attempt_ref, "failed")
    services.expire_order(order_id=order.pk, now=at(171))
    payment = services.record_payment(
        order_id=order.pk, payment_ref=ref(), amount="10.00", attempt_ref=attempt_ref, now=at(200)
    )
    assert payment.outcome == Payment.Outcome.LATE
    assert payment.needs_refund


def test_paid_otherwise_the_other_open_attempts_close_here_and_at_the_provider() -> None:
    order = place(timeout=600)
    qr, card = ref(), ref()
    start(order, qr, when=10)
    start(order, card, when=20)
    services.record_payment(
        order_id=order.pk, payment_ref=ref(), amount="10.00", attempt_ref=card, now=at(30)
    )
    assert PaymentAttempt.objects.get(reference=card).outcome == PaymentAttempt.Outcome.PAID
    other = PaymentAttempt.objects.get(reference=qr)
    assert other.outcome == PaymentAttempt.Outcome.CLOSED
    services.close_payment(attempt_id=other.pk)
    assert _close_calls(qr) == 1
    assert _close_calls(card) == 0


def test_cancelling_closes_the_open_attempts() -> None:
    order = place(timeout=600)
    attempt_ref = ref()
    start(order, attempt_ref, when=10)
    services.cancel_order(order_id=order.pk, by="customer", now=at(20))
    attempt = PaymentAttempt.objects.get(reference=attempt_ref)
    assert attempt.outcome == PaymentAttempt.Outcome.CLOSED
    assert "cancelled" in attempt.detail


def test_close_payment_leaves_the_attempt_to_retry_when_the_gateway_fails(
    settings: Settings,
) -> None:
    settings.ORDERS = settings.ORDERS | {
        "PAYMENT_GATEWAY": "tests.test_payment_attempts.CannotClose"
    }
    order = place(timeout=600)
    attempt = start(order, ref(), when=10)
    services.cancel_order(order_id=order.pk, by="customer", now=at(20))
    with pytest.raises(GatewayError):
        services.close_payment(attempt_id=attempt.pk)
    attempt.refresh_from_db()
    assert attempt.closed_at_provider is None  # the sweep retries it


class CannotClose(LocalPaymentGateway):
    def close_payment(self, *, attempt_ref: str) -> None:
        raise GatewayError("timed out")


# The sweep and the set-based expiry ----------------------------------------------------


def test_the_sweep_expires_the_unheld_in_bulk_and_asks_about_the_held(settings: Settings) -> None:
    plain = place(timeout=60)
    held, failed = place(timeout=60), place(timeout=60)
    held_ref, failed_ref = ref(), ref()
    start(held, held_ref, hold_for=120, when=10)  # held until 130
    start(failed, failed_ref, hold_for=20, when=10)  # held until 60: due with the deadline
    gateway().simulate(failed_ref, "failed")

    expired, _ = services.expire_due_orders(due_by=at(100), by="sweep", now=at(100))
    assert expired == 2
    assert fresh(plain).status == Status.CANCELLED
    assert fresh(failed).status == Status.CANCELLED
    assert fresh(held).status == Status.CREATED  # its hold has not ended


def test_a_buckets_helper_tasks_leave_its_held_orders_to_the_buckets_own_task() -> None:
    """A held order due in a bucket is asked about once, by the bucket's own task: its
    helpers (``share=False``) take only the batches, so a provider is not asked the same
    question by every helper, and a bucket of held orders gets no helpers."""
    plain, held = place(timeout=60), place(timeout=60)
    held_ref = ref()
    start(held, held_ref, hold_for=20, when=10)  # held until 60: due with the deadline
    gateway().simulate(held_ref, "failed")
    bucket = scheduling.bucket_of(at(60))

    assert services.expire_bucket(bucket=bucket, now=at(61), share=False) == 1
    assert (fresh(plain).status, fresh(held).status) == (Status.CANCELLED, Status.CREATED)
    assert PaymentAttempt.objects.get(reference=held_ref).is_open  # nobody asked

    assert services.expire_bucket(bucket=bucket, now=at(61)) == 1
    assert fresh(held).status == Status.CANCELLED
    assert PaymentAttempt.objects.get(reference=held_ref).outcome == PaymentAttempt.Outcome.FAILED


def test_an_extension_moves_the_shops_deadline_and_keeps_the_hold() -> None:
    order = place(timeout=600)
    start(order, ref(), hold_for=900, when=10)  # held until 910
    services.extend_order(order_id=order.pk, seconds=600, by="staff", now=at(20))
    order = fresh(order)
    assert order.expires_at == at(1200)  # the new deadline is later than the hold
    assert order.original_expires_at == at(1200)  # and the order is still held
    services.extend_order(order_id=order.pk, seconds=1, by="staff", now=at(20))
    assert fresh(order).expires_at == at(1201)


def test_a_held_order_is_not_reminded(settings: Settings) -> None:
    settings.ORDERS = settings.ORDERS | {"REMIND_BEFORE": 120}
    order = place(timeout=600)
    start(order, ref(), hold_for=900, when=10)  # held until 910
    assert services.remind_due_orders(due_by=at(850), by="sweep", now=at(850)) == 0
    assert (
        services.remind_order(order_id=order.pk, now=at(850)) is not services.ReminderOutcome.SENT
    )


def test_a_short_hold_still_has_the_provider_asked_before_the_order_expires() -> None:
    order = place(timeout=60)
    attempt_ref, payment_ref = ref(), ref()
    start(order, attempt_ref, hold_for=5, when=10)  # the hold ends long before the deadline
    gateway().simulate(attempt_ref, "paid", payment_ref=payment_ref, amount="10.00", currency="CNY")
    expired, _ = services.expire_due_orders(due_by=at(61), by="sweep", now=at(61))
    assert expired == 0
    assert fresh(order).status == Status.PAID


def test_a_mismatched_payment_for_the_only_attempt_ends_the_hold() -> None:
    order = place(timeout=60)
    attempt_ref = ref()
    start(order, attempt_ref, hold_for=300, when=10)
    payment = services.record_payment(
        order_id=order.pk, payment_ref=ref(), amount="9.00", attempt_ref=attempt_ref, now=at(20)
    )
    assert payment.outcome == Payment.Outcome.MISMATCH
    order = fresh(order)
    assert (order.status, order.expires_at, order.is_held) == (Status.CREATED, at(60), False)
    assert (
        PaymentAttempt.objects.get(reference=attempt_ref).outcome == PaymentAttempt.Outcome.FAILED
    )


def test_a_pending_answer_heard_before_the_cap_does_not_time_the_attempt_out() -> None:
    # Asked just before the cap ("pending"), the lock taken just after it: the provider may
    # have said "paid" to someone else meanwhile. The attempt is asked again at once.
    order = place(timeout=60)
    attempt_ref, payment_ref = ref(), ref()
    attempt = start(order, attempt_ref, hold_for=120, when=50)  # hold 170, cap 950
    pending = services.AttemptStatus(status="pending")
    with transaction.atomic():
        outcome, _ = services._act_on_answers(
            Order.objects.select_for_update().get(pk=order.pk),
            {attempt.pk: pending},
            asked_at=at(949),
            by="test",
            now=at(951),
        )
    assert outcome is ExpiryOutcome.HELD
    attempt.refresh_from_db()
    assert attempt.is_open
    assert fresh(order).expires_at <= at(951)  # due again at once
    gateway().simulate(attempt_ref, "paid", payment_ref=payment_ref, amount="10.00", currency="CNY")
    assert services.expire_order(order_id=order.pk, now=at(952)) is ExpiryOutcome.PAID


def test_answers_for_an_order_a_twin_re_armed_meanwhile_wait_for_the_next_question() -> None:
    order = place(timeout=60)
    attempt_ref = ref()
    attempt = start(order, attempt_ref, hold_for=120, when=50)  # held until 170
    with transaction.atomic():
        outcome, _ = services._act_on_answers(
            Order.objects.select_for_update().get(pk=order.pk),
            {attempt.pk: services.AttemptStatus(status="failed")},
            asked_at=at(100),  # a sweep that began before the hold ended
            by="sweep",
            now=at(100),
        )
    assert outcome is ExpiryOutcome.WAITING
    attempt.refresh_from_db()
    assert attempt.is_open
    assert fresh(order).status == Status.CREATED


def test_a_provider_that_hangs_counts_as_no_answer(settings: Settings) -> None:
    settings.ORDERS = settings.ORDERS | {
        "PAYMENT_GATEWAY": "tests.test_payment_attempts.Hangs",
        "PAYMENT_STATUS_TIMEOUT": 1,
    }
    order = place(timeout=60)
    attempt = start(order, ref(), hold_for=120, when=50)  # cap at 950
    started = time.monotonic()
    assert services.expire_order(order_id=order.pk, now=at(951)) is ExpiryOutcome.EXPIRED
    assert time.monotonic() - started < 3  # waited for the time-out, not for the provider
    attempt.refresh_from_db()
    assert attempt.outcome == PaymentAttempt.Outcome.TIMED_OUT
    assert "did not answer" in attempt.detail


class Hangs(LocalPaymentGateway):
    def payment_status(self, *, attempt_ref: str) -> services.AttemptStatus:
        time.sleep(5)  # a socket with no time-out, as far as the caller can tell
        return services.AttemptStatus(status="paid")
