"""The order's story, service by service, without a broker or a worker.

Time is injected with ``now=``. The test transaction never commits, so after-commit work
(timers, follow-up tasks, signals) runs only where a test asks for it, with the
publishers replaced by the ``published`` fixture so that nothing reaches Redis.
"""

from __future__ import annotations

import io
import logging
import math
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, ClassVar, NoReturn

import kombu.exceptions
import pytest
import redis
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.db.models import F
from pytest_django import DjangoCaptureOnCommitCallbacks, Settings

from orders import broker, events, get_order_model, scheduling, services, signals
from orders.conf import DEFAULTS
from orders.gateways import GatewayError, LocalLogisticsProvider
from orders.models import (
    PLACE,
    REFUND_PAYMENT,
    AbstractOrder,
    CancelReason,
    EventDelivery,
    OrderTransition,
    Payment,
    Status,
)
from orders.services import ExpiryOutcome, InvalidInput, InvalidTransition, OrderNotFound
from orders.signals import OrderSignal
from orders.tasks import expire_order_task, ship_order_task

Order = get_order_model()

pytestmark = pytest.mark.django_db

# A fixed moment in the past: services given ``now=`` never look at the clock, and the
# few that cannot be given it (parcel statuses) then act after everything else.
T0 = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)
HORIZON = DEFAULTS["TIMER_HORIZON"]
MAX_TIMEOUT = DEFAULTS["MAX_TIMEOUT"]
MISSING_ID = "00000000-0000-4000-8000-000000000000"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def place(*, timeout: float = 600, now: datetime = T0, amount: str = "10.00") -> AbstractOrder:
    return services.place_order(amount=amount, timeout=timeout, now=now)


def pay(
    order: AbstractOrder, *, ref: str = "pay-1", now: datetime | None = None, **kw: Any
) -> Payment:
    return services.record_payment(
        order_id=order.pk,
        payment_ref=ref,
        amount=kw.pop("amount", "10.00"),
        now=now or order.created_at + timedelta(seconds=10),
        **kw,
    )


def paid_order(*, now: datetime = T0) -> AbstractOrder:
    order = place(now=now)
    pay(order, now=now + timedelta(seconds=10))
    order.refresh_from_db()
    return order


def reloaded(order: AbstractOrder) -> AbstractOrder:
    return Order.objects.get(pk=order.pk)


def history(order: AbstractOrder) -> list[tuple[str, str, str, str, str]]:
    return list(order.history.values_list("transition", "source", "target", "actor", "reason"))


#: The first line of every order's history, as ``history()`` lists it: placed by the shop.
PLACED = (PLACE, "", "created", "shop", "")


def transitions(order: AbstractOrder) -> list[str]:
    return list(order.history.values_list("transition", flat=True))


def refuse(*args: Any, **kwargs: Any) -> NoReturn:
    raise kombu.exceptions.OperationalError("Error 111 connecting to redis. Connection refused.")


# Stand-ins for the broker and the payment gateway ----------------------------------------


@pytest.fixture(autouse=True)
def app_defaults(settings: Settings) -> None:
    """The app's defaults for what these tests count on, whatever the environment sets."""
    pinned = (
        "DEFAULT_TIMEOUT",
        "MIN_TIMEOUT",
        "MAX_TIMEOUT",
        "TIMER_HORIZON",
        "TIMER_MODE",
        "SWEEP_GRACE",
        "SWEEP_BATCH_SIZE",
        "SHIPPING_RETRY_AFTER",
        "CURRENCY",
        "PAYMENT_GATEWAY",
        "LOGISTICS_PROVIDER",
    )
    settings.ORDERS = settings.ORDERS | {key: DEFAULTS[key] for key in pinned}


@dataclass
class Published:
    """What would have reached the broker once the transaction committed: expiry timers,
    follow-up tasks (shipping, refunds), and the event dispatches (by their order ids),
    queued whenever something listens to an event, whichever receivers the shop has."""

    timers: list[tuple[str, datetime]] = field(default_factory=list)
    tasks: list[tuple[str, tuple[str | list[str], ...]]] = field(default_factory=list)
    dispatches: list[list[str]] = field(default_factory=list)


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> Published:
    record = Published()

    def publish_timer(order_id: str, deadline: datetime) -> None:
        record.timers.append((order_id, deadline))

    def enqueue_on_commit(task: Any, *args: str | list[str], what: str) -> None:
        if task.name == "orders.dispatch_events":
            [order_ids] = args
            assert isinstance(order_ids, list)
            transaction.on_commit(lambda: record.dispatches.append(order_ids))
        else:
            transaction.on_commit(lambda: record.tasks.append((task.name, args)))

    # The timer of either mode: its own countdown, or its bucket.
    monkeypatch.setattr(scheduling, "publish_expiry_timer", publish_timer)
    monkeypatch.setattr(scheduling, "publish_bucket_timer", publish_timer)
    monkeypatch.setattr(scheduling, "enqueue_on_commit", enqueue_on_commit)
    return record


#: The name the ``receipts`` receiver of a signal is known by (its delivery records').
def receipt_name(signal: OrderSignal) -> str:
    return f"tests.receipts.{signal.event_type}"


@pytest.fixture
def receipts() -> Iterator[Callable[[OrderSignal], list[dict[str, Any]]]]:
    """``receipts(signal)`` connects a receiver and returns the list it fills: every
    call's keyword arguments, ``sender`` included."""
    connected: list[OrderSignal] = []

    def listen(signal: OrderSignal) -> list[dict[str, Any]]:
        received: list[dict[str, Any]] = []

        def receiver(sender: Any, **kwargs: Any) -> None:
            received.append({"sender": sender, **kwargs})

        signal.connect(receiver, weak=False, dispatch_uid=receipt_name(signal))
        connected.append(signal)
        return received

    yield listen
    for signal in connected:
        signal.disconnect(dispatch_uid=receipt_name(signal))


class FailingGateway:
    def refund(
        self, *, payment_ref: str, amount: Decimal, currency: str, idempotency_key: str
    ) -> str:
        raise GatewayError("the gateway is unreachable")


class RecordingGateway:
    calls: ClassVar[list[str]] = []

    def refund(
        self, *, payment_ref: str, amount: Decimal, currency: str, idempotency_key: str
    ) -> str:
        RecordingGateway.calls.append(idempotency_key)
        return f"rf-{idempotency_key}"


class RacingGateway:
    """While the gateway confirms the first refund, another worker refunds the order."""

    calls: ClassVar[list[str]] = []

    def refund(
        self, *, payment_ref: str, amount: Decimal, currency: str, idempotency_key: str
    ) -> str:
        RacingGateway.calls.append(idempotency_key)
        if len(RacingGateway.calls) == 1:
            order_id = Payment.objects.get(reference=payment_ref).order_id
            services.refund_order(order_id=order_id, by="other worker", reason="double click")
        return f"rf-{idempotency_key}"


def use_gateway(settings: Settings, name: str) -> None:
    settings.ORDERS = settings.ORDERS | {"PAYMENT_GATEWAY": f"tests.test_services.{name}"}


# place_order --------------------------------------------------------------------------


def test_placed_order_is_due_after_the_default_timeout_of_30_minutes(settings: Settings) -> None:
    settings.ORDERS = {k: v for k, v in settings.ORDERS.items() if k != "DEFAULT_TIMEOUT"}

    order = services.place_order(amount="10.00", now=T0)

    order = reloaded(order)
    assert order.status == Status.CREATED
    assert order.created_at == T0
    assert order.expires_at == T0 + timedelta(seconds=1800)
    assert order.amount == Decimal("10.00")
    assert order.currency == "CNY"
    assert history(order) == [PLACED]
    assert order.history.get().at == T0


def test_order_placed_by_a_user_is_recorded_in_their_name() -> None:
    alice = User.objects.create_user(username="alice")

    order = services.place_order(amount="10.00", by=alice, now=T0)

    assert list(
        order.history.values_list("transition", "actor", "user_id", "at", "event_type")
    ) == [(PLACE, "alice", alice.pk, T0, "order.placed")]


def test_placed_order_takes_default_timeout_from_settings(settings: Settings) -> None:
    settings.ORDERS = settings.ORDERS | {"DEFAULT_TIMEOUT": 600}

    order = services.place_order(amount="10.00", now=T0)

    assert reloaded(order).expires_at == at(600)


def timeout_by_channel(order: AbstractOrder) -> int:
    """A shop's DEFAULT_TIMEOUT function: 2 minutes at the till, 15 online."""
    return 120 if order.metadata.get("channel") == "pos" else 900


def no_time_at_all(order: AbstractOrder) -> int:
    return 0


def test_default_timeout_may_be_a_function_of_the_order(settings: Settings) -> None:
    settings.ORDERS = settings.ORDERS | {
        "DEFAULT_TIMEOUT": "tests.test_services.timeout_by_channel"
    }

    at_the_till = services.place_order(amount="10.00", metadata={"channel": "pos"}, now=T0)
    online = services.place_order(amount="10.00", metadata={"channel": "web"}, now=T0)
    given = services.place_order(amount="10.00", metadata={"channel": "pos"}, timeout=30, now=T0)

    assert reloaded(at_the_till).expires_at == at(120)
    assert reloaded(online).expires_at == at(900)
    assert reloaded(given).expires_at == at(30), "a timeout given wins"


def test_a_default_timeout_function_out_of_bounds_is_refused_and_nothing_stored(
    settings: Settings,
) -> None:
    settings.ORDERS = settings.ORDERS | {"DEFAULT_TIMEOUT": "tests.test_services.no_time_at_all"}

    with pytest.raises(InvalidInput, match=r"tests.test_services.no_time_at_all\(\) returned"):
        services.place_order(amount="10.00", now=T0)

    assert Order.objects.count() == 0


@pytest.mark.parametrize(
    ("timeout", "seconds"),
    [(90, 90), (2.5, 2.5), (timedelta(minutes=5), 300), (MAX_TIMEOUT, MAX_TIMEOUT)],
)
def test_placed_order_is_due_after_its_own_timeout(timeout: Any, seconds: float) -> None:
    order = services.place_order(amount="10.00", timeout=timeout, now=T0)

    assert reloaded(order).expires_at == at(seconds)


def test_placed_order_takes_a_lowercase_currency_as_its_code() -> None:
    order = services.place_order(amount="12.5", currency="usd", now=T0)

    order = reloaded(order)
    assert (order.amount, order.currency) == (Decimal("12.50"), "USD")


def test_deadline_within_the_horizon_arms_the_timer_after_commit(
    published: Published, django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        order = place(timeout=HORIZON)
        assert published.timers == [], "the timer must wait for the commit"

    assert reloaded(order).timer_armed_for == order.expires_at == at(HORIZON)
    assert published.timers == [(str(order.pk), order.expires_at)]


def test_deadline_beyond_the_horizon_is_left_for_the_sweep(
    published: Published, django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        order = place(timeout=HORIZON + 1)

    assert reloaded(order).timer_armed_for is None
    assert published.timers == []


def test_horizon_comes_from_settings(
    settings: Settings,
    published: Published,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    settings.ORDERS = settings.ORDERS | {"TIMER_HORIZON": 600}

    with django_capture_on_commit_callbacks(execute=True):
        near, far = place(timeout=600), place(timeout=601)

    assert reloaded(near).timer_armed_for == near.expires_at
    assert reloaded(far).timer_armed_for is None
    assert published.timers == [(str(near.pk), near.expires_at)]


@pytest.mark.parametrize(
    "amount",
    [
        0,
        "0",
        "0.00",
        "-1.00",
        -5,
        10.5,
        True,
        None,
        "abc",
        "",
        "1.005",
        "NaN",
        "Infinity",
        "-Infinity",
        "10000000000",
        "99999999999.99",
    ],
)
def test_place_order_rejects_an_amount_that_is_not_money(amount: Any) -> None:
    with pytest.raises(InvalidInput, match="amount"):
        services.place_order(amount=amount, now=T0)

    assert Order.objects.count() == 0


@pytest.mark.parametrize(
    "amount",
    [
        "\uff11\uff12.\uff15\uff10",  # full-width digits
        "\u0661\u0662",  # Arabic-Indic digits
        "1_000",
        "1e3",
        " 12.50",
        "12.50\n",
        "+5",
        ".5",
        "5.",
        "1" * 10_000,
        Decimal("NaN"),
        Decimal("-Infinity"),
        ["12.50"],
    ],
    ids=[
        "full-width",
        "arabic-indic",
        "underscore",
        "exponent",
        "leading space",
        "trailing newline",
        "plus sign",
        "no integer part",
        "no decimals",
        "huge string",
        "Decimal NaN",
        "Decimal -Infinity",
        "list",
    ],
)
def test_an_amount_must_be_plain_ascii_decimal_digits(amount: Any) -> None:
    # Decimal() alone reads all of these strings as numbers.
    with pytest.raises(InvalidInput, match="amount") as refused:
        services.place_order(amount=amount, now=T0)

    assert len(str(refused.value)) < 200, "the refusal does not echo a huge value back"
    assert Order.objects.count() == 0


@pytest.mark.parametrize(
    ("amount", "stored"),
    [("12.50", "12.50"), ("7", "7.00"), (7, "7.00"), (Decimal("9.9"), "9.90"), ("012.5", "12.50")],
)
def test_an_amount_of_ascii_digits_an_int_or_a_decimal_is_accepted(
    amount: Any, stored: str
) -> None:
    assert services.place_order(amount=amount, now=T0).amount == Decimal(stored)


@pytest.mark.parametrize("amount", ["1e30", "99999999999999999999999999999"])
def test_place_order_rejects_an_amount_beyond_decimal_precision_as_invalid_input(
    amount: str,
) -> None:
    with pytest.raises(InvalidInput, match="amount"):
        services.place_order(amount=amount, now=T0)


@pytest.mark.parametrize("currency", ["US", "EURO", "12A", "", "E R", "€UR", 840, b"USD"])
def test_place_order_rejects_a_currency_that_is_not_an_iso_code(currency: Any) -> None:
    with pytest.raises(InvalidInput, match="currency"):
        services.place_order(amount="10.00", currency=currency, now=T0)

    assert Order.objects.count() == 0


def test_place_order_rejects_a_currency_with_a_trailing_newline() -> None:
    with pytest.raises(InvalidInput, match="currency"):
        services.place_order(amount="10.00", currency="usd\n", now=T0)


@pytest.mark.parametrize(
    "timeout",
    [
        0,
        -1,
        0.5,
        timedelta(0),
        MAX_TIMEOUT + 1,
        math.nan,
        math.inf,
        -math.inf,
        True,
        False,
        "600",
        Decimal("600"),
    ],
)
def test_place_order_rejects_a_timeout_that_is_not_a_sensible_number_of_seconds(
    timeout: Any,
) -> None:
    with pytest.raises(InvalidInput, match="timeout"):
        services.place_order(amount="10.00", timeout=timeout, now=T0)

    assert Order.objects.count() == 0


def test_place_order_rejects_an_astronomical_timeout_as_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="timeout"):
        services.place_order(amount="10.00", timeout=10**400, now=T0)


@pytest.mark.parametrize("mode", ["batched", "per_order"])
def test_broker_down_when_arming_a_timer_keeps_the_order_and_leaves_the_timer_to_the_sweep(
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
    mode: str,
) -> None:
    settings.ORDERS = settings.ORDERS | {"TIMER_MODE": mode}
    monkeypatch.setattr(expire_order_task, "apply_async", refuse)
    monkeypatch.setattr(
        scheduling, "_redis", lambda: redis.Redis(port=1, socket_connect_timeout=0.2)
    )

    with (
        caplog.at_level(logging.ERROR, logger="orders"),
        django_capture_on_commit_callbacks(execute=True),
    ):
        order = place(timeout=600)

    order = reloaded(order)
    assert order.status == Status.CREATED
    assert order.timer_armed_for is None
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert str(order.pk) in errors[0].getMessage()

    # The sweep arms it once the broker is back.
    monkeypatch.undo()
    settings.ORDERS = settings.ORDERS | {"TIMER_MODE": mode}
    assert services.sweep(now=at(1)).timers_armed == 1
    assert reloaded(order).timer_armed_for == order.expires_at


def test_broker_down_when_queueing_shipping_keeps_the_payment(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    order = place()
    monkeypatch.setattr(ship_order_task, "apply_async", refuse)

    with (
        caplog.at_level(logging.ERROR, logger="orders"),
        django_capture_on_commit_callbacks(execute=True),
    ):
        pay(order, now=at(10))

    assert reloaded(order).status == Status.PAID
    assert Payment.objects.get().outcome == Payment.Outcome.ACCEPTED
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert str(order.pk) in errors[0].getMessage()
    assert "shipping" in errors[0].getMessage()


# record_payment -----------------------------------------------------------------------


def test_payment_before_the_deadline_pays_the_order(
    published: Published, django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks
) -> None:
    order = place(timeout=600)

    with django_capture_on_commit_callbacks(execute=True):
        payment = pay(order, ref="pay-1", now=at(100))

    order = reloaded(order)
    assert order.status == Status.PAID
    assert order.paid_at == at(100)
    assert order.payment_ref == "pay-1"
    assert (payment.reference, payment.outcome, payment.order_id) == (
        "pay-1",
        Payment.Outcome.ACCEPTED,
        order.pk,
    )
    assert (payment.amount, payment.currency, payment.received_at) == (
        Decimal("10.00"),
        "CNY",
        at(100),
    )
    assert not payment.needs_refund
    assert history(order) == [PLACED, ("pay", "created", "paid", "payment gateway", "")]
    assert published.tasks == [("orders.ship_order", (str(order.pk),))]


def test_payment_exactly_at_the_deadline_is_accepted() -> None:
    order = place(timeout=600)

    payment = pay(order, now=order.expires_at)

    assert payment.outcome == Payment.Outcome.ACCEPTED
    assert reloaded(order).status == Status.PAID


def test_duplicate_payment_notification_changes_nothing() -> None:
    order = place()
    first = pay(order, ref="pay-1", now=at(10))

    again = pay(order, ref="pay-1", now=at(20))

    assert again.pk == first.pk
    assert again.received_at == at(10)
    assert Payment.objects.count() == 1
    assert transitions(order) == [PLACE, "pay"]
    assert reloaded(order).paid_at == at(10)


def test_duplicate_of_a_late_payment_is_not_refunded_twice(
    published: Published, django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks
) -> None:
    order = place(timeout=60)

    with django_capture_on_commit_callbacks(execute=True):
        first = pay(order, ref="late-1", now=at(120))
        pay(order, ref="late-1", now=at(130))

    assert Payment.objects.count() == 1
    assert published.tasks == [("orders.refund_payment", (str(first.pk),))]


def test_payment_reference_already_used_for_another_order_is_refused() -> None:
    first, second = place(), place()
    pay(first, ref="pay-1", now=at(10))

    with pytest.raises(InvalidInput, match="pay-1"):
        pay(second, ref="pay-1", now=at(20))

    assert reloaded(second).status == Status.CREATED
    assert Payment.objects.count() == 1
    assert history(second) == [PLACED]


@pytest.mark.parametrize("ref", ["", "x" * 129, None, 42, "pay\x00-1", "pay-1\nforged", "\u2028"])
def test_payment_without_a_usable_reference_is_refused(ref: Any) -> None:
    order = place()

    with pytest.raises(InvalidInput, match="payment_ref"):
        services.record_payment(order_id=order.pk, payment_ref=ref, amount="10.00", now=at(10))

    assert Payment.objects.count() == 0


def test_payment_after_the_deadline_expires_the_order_and_is_refunded(
    published: Published, django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks
) -> None:
    order = place(timeout=600)

    with django_capture_on_commit_callbacks(execute=True):
        payment = pay(order, ref="late-1", now=at(601))

    order = reloaded(order)
    assert order.status == Status.CANCELLED
    assert order.cancel_reason == CancelReason.TIMEOUT
    assert order.cancelled_at == at(601)
    assert order.payment_ref == ""
    placed, expiry = order.history.all()
    assert placed.transition == PLACE
    assert (expiry.transition, expiry.source, expiry.target) == ("expire", "created", "cancelled")
    assert "deadline" in expiry.reason
    assert expiry.at == at(601)
    assert payment.outcome == Payment.Outcome.LATE
    assert payment.needs_refund
    assert published.tasks == [("orders.refund_payment", (str(payment.pk),))]


def test_payment_for_a_cancelled_order_is_late() -> None:
    order = place()
    services.cancel_order(order_id=order.pk, by="customer", now=at(10))

    payment = pay(order, now=at(20))

    assert payment.outcome == Payment.Outcome.LATE
    assert payment.needs_refund
    assert reloaded(order).status == Status.CANCELLED
    assert transitions(order) == [PLACE, "cancel"]


def test_second_payment_for_a_paid_order_is_surplus() -> None:
    order = place()
    pay(order, ref="pay-1", now=at(10))

    surplus = pay(order, ref="pay-2", now=at(20))

    assert surplus.outcome == Payment.Outcome.SURPLUS
    assert surplus.needs_refund
    order = reloaded(order)
    assert (order.status, order.payment_ref, order.paid_at) == (Status.PAID, "pay-1", at(10))
    assert transitions(order) == [PLACE, "pay"]


@pytest.mark.parametrize(
    ("amount", "currency"), [("9.99", None), ("10.01", None), ("10.00", "USD")]
)
def test_payment_of_the_wrong_amount_or_currency_is_a_mismatch(
    amount: str, currency: str | None
) -> None:
    order = place()

    payment = services.record_payment(
        order_id=order.pk, payment_ref="odd-1", amount=amount, currency=currency, now=at(10)
    )

    assert payment.outcome == Payment.Outcome.MISMATCH
    assert payment.needs_refund
    assert reloaded(order).status == Status.CREATED
    assert history(order) == [PLACED]

    # The customer can still pay the right amount.
    assert pay(order, ref="pay-1", now=at(20)).outcome == Payment.Outcome.ACCEPTED


def test_payment_in_the_order_currency_written_in_lowercase_is_accepted() -> None:
    order = place()

    assert pay(order, currency="cny", now=at(10)).outcome == Payment.Outcome.ACCEPTED


@pytest.mark.parametrize("amount", ["0", "-10.00", 10.0, "ten", "10.001"])
def test_payment_of_an_amount_that_is_not_money_is_refused(amount: Any) -> None:
    order = place()

    with pytest.raises(InvalidInput, match="amount"):
        pay(order, amount=amount, now=at(10))

    assert Payment.objects.count() == 0


@pytest.mark.parametrize("order_id", [MISSING_ID, 12345, None])
def test_payment_for_an_unknown_order_is_not_found(order_id: Any) -> None:
    with pytest.raises(OrderNotFound):
        services.record_payment(order_id=order_id, payment_ref="pay-1", amount="10.00", now=T0)

    assert Payment.objects.count() == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda oid: services.record_payment(order_id=oid, payment_ref="p", amount="1.00"),
        lambda oid: services.cancel_order(order_id=oid, by="customer"),
        lambda oid: services.extend_order(order_id=oid, seconds=60, by="customer"),
        lambda oid: services.ship_order(order_id=oid),
        lambda oid: services.refund_order(order_id=oid, by="staff", reason="r"),
        lambda oid: services.record_parcel_status(
            order_id=oid, tracking_number="TRK-1", status="returned"
        ),
    ],
    ids=["record_payment", "cancel_order", "extend_order", "ship_order", "refund", "parcel"],
)
def test_malformed_order_id_is_not_found(call: Callable[[str], object]) -> None:
    with pytest.raises(OrderNotFound):
        call("not-a-uuid")


# expire_order -------------------------------------------------------------------------


def test_overdue_unpaid_order_is_expired_by_the_timer() -> None:
    order = place(timeout=600)

    outcome = services.expire_order(order_id=order.pk, now=at(600.2))

    assert outcome == ExpiryOutcome.EXPIRED
    order = reloaded(order)
    assert order.status == Status.CANCELLED
    assert order.cancel_reason == CancelReason.TIMEOUT
    assert order.cancelled_at == at(600.2)
    assert history(order) == [
        PLACED,
        ("expire", "created", "cancelled", "expiry timer", "not paid in time"),
    ]


def test_timer_fired_many_times_expires_the_order_once() -> None:
    order = place(timeout=600)

    outcomes = [services.expire_order(order_id=order.pk, now=at(601 + i)) for i in range(10)]

    assert outcomes == [ExpiryOutcome.EXPIRED] + [ExpiryOutcome.NOT_UNPAID] * 9
    assert transitions(order) == [PLACE, "expire"]
    assert reloaded(order).cancelled_at == at(601)


def test_timer_before_the_deadline_waits_when_its_timer_is_armed() -> None:
    order = place(timeout=600)

    assert services.expire_order(order_id=order.pk, now=at(300)) == ExpiryOutcome.WAITING

    order = reloaded(order)
    assert order.status == Status.CREATED
    assert order.timer_armed_for == order.expires_at
    assert history(order) == [PLACED]


def test_timer_before_an_unarmed_deadline_within_the_horizon_re_arms_it(
    published: Published, django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks
) -> None:
    order = place(timeout=HORIZON + 600)
    assert order.timer_armed_for is None

    with django_capture_on_commit_callbacks(execute=True):
        outcome = services.expire_order(order_id=order.pk, now=at(600))

    assert outcome == ExpiryOutcome.REARMED
    assert reloaded(order).timer_armed_for == order.expires_at
    assert published.timers == [(str(order.pk), order.expires_at)]
    assert services.expire_order(order_id=order.pk, now=at(601)) == ExpiryOutcome.WAITING


def test_timer_before_a_deadline_beyond_the_horizon_waits() -> None:
    order = place(timeout=HORIZON + 600)

    assert services.expire_order(order_id=order.pk, now=at(10)) == ExpiryOutcome.WAITING
    assert reloaded(order).timer_armed_for is None


def test_timer_for_a_paid_order_does_nothing() -> None:
    order = paid_order()

    assert services.expire_order(order_id=order.pk, now=at(601)) == ExpiryOutcome.NOT_UNPAID

    assert reloaded(order).status == Status.PAID
    assert transitions(order) == [PLACE, "pay"]


def test_timer_for_a_missing_order_reports_it() -> None:
    assert services.expire_order(order_id=MISSING_ID, now=T0) == ExpiryOutcome.MISSING


def test_timer_for_a_malformed_order_id_reports_it_missing() -> None:
    assert services.expire_order(order_id="not-a-uuid", now=T0) == ExpiryOutcome.MISSING


def test_old_timer_after_an_extension_within_the_horizon_waits() -> None:
    order = place(timeout=600)
    services.extend_order(order_id=order.pk, seconds=600, by="customer", now=at(100))

    # The first timer fires at the old deadline; the new one is already armed.
    assert services.expire_order(order_id=order.pk, now=at(601)) == ExpiryOutcome.WAITING

    order = reloaded(order)
    assert order.status == Status.CREATED
    assert order.timer_armed_for == order.expires_at == at(1200)


def test_old_timer_re_arms_an_extended_deadline_whose_timer_was_lost() -> None:
    order = place(timeout=600)
    services.extend_order(order_id=order.pk, seconds=600, by="customer", now=at(100))
    Order.objects.filter(pk=order.pk).update(timer_armed_for=None)  # the broker was down

    assert services.expire_order(order_id=order.pk, now=at(601)) == ExpiryOutcome.REARMED
    assert reloaded(order).timer_armed_for == at(1200)
    assert services.expire_order(order_id=order.pk, now=at(602)) == ExpiryOutcome.WAITING


def test_extension_beyond_the_horizon_is_armed_by_the_sweep_once_within_it() -> None:
    order = place(timeout=600)
    services.extend_order(order_id=order.pk, seconds=HORIZON + 60, by="customer", now=T0)
    assert reloaded(order).timer_armed_for == at(600), "only the old timer is armed"

    # The old timer fires while the new deadline is still beyond the horizon.
    assert services.expire_order(order_id=order.pk, now=at(600)) == ExpiryOutcome.WAITING
    assert reloaded(order).timer_armed_for == at(600)
    assert services.sweep(now=at(659)).timers_armed == 0
    assert services.sweep(now=at(660)).timers_armed == 1
    order = reloaded(order)
    assert order.timer_armed_for == order.expires_at == at(660 + HORIZON)
    assert order.status == Status.CREATED


# extend_order -------------------------------------------------------------------------


def test_extension_moves_the_deadline_and_arms_a_timer_for_it(
    published: Published, django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks
) -> None:
    order = place(timeout=600)

    with django_capture_on_commit_callbacks(execute=True):
        extended = services.extend_order(order_id=order.pk, seconds=300, by="customer", now=at(100))

    assert extended.expires_at == at(900)
    order = reloaded(order)
    assert order.expires_at == order.timer_armed_for == at(900)
    assert order.status == Status.CREATED
    assert published.timers == [(str(order.pk), at(900))]


def test_extension_accepts_a_timedelta() -> None:
    order = place(timeout=600)

    services.extend_order(order_id=order.pk, seconds=timedelta(minutes=1), by="staff", now=T0)

    assert reloaded(order).expires_at == at(660)


def test_paid_order_cannot_be_extended() -> None:
    order = paid_order()

    with pytest.raises(InvalidTransition, match="paid"):
        services.extend_order(order_id=order.pk, seconds=60, by="customer", now=at(20))

    assert reloaded(order).expires_at == at(600)


@pytest.mark.parametrize("now", [at(600), at(601)])
def test_overdue_order_cannot_be_extended(now: datetime) -> None:
    order = place(timeout=600)

    with pytest.raises(InvalidTransition, match="deadline"):
        services.extend_order(order_id=order.pk, seconds=60, by="customer", now=now)

    assert reloaded(order).expires_at == at(600)


@pytest.mark.parametrize(
    "seconds", [0, -60, 0.5, "60", True, math.nan, math.inf, None, MAX_TIMEOUT + 1]
)
def test_extension_by_a_bad_number_of_seconds_is_refused(seconds: Any) -> None:
    order = place(timeout=600)

    with pytest.raises(InvalidInput, match="seconds"):
        services.extend_order(order_id=order.pk, seconds=seconds, by="customer", now=T0)

    assert reloaded(order).expires_at == at(600)


def test_extension_past_the_max_timeout_from_now_is_refused() -> None:
    # A conflict with the order's deadline (409 over HTTP), not a malformed request: the
    # same number of seconds is a valid extension of a younger order.
    order = place(timeout=600)

    with pytest.raises(InvalidTransition, match="MAX_TIMEOUT"):
        services.extend_order(order_id=order.pk, seconds=MAX_TIMEOUT, by="customer", now=T0)

    assert reloaded(order).expires_at == at(600)


def test_extension_up_to_the_max_timeout_from_now_is_allowed() -> None:
    order = place(timeout=600)

    services.extend_order(order_id=order.pk, seconds=MAX_TIMEOUT - 600, by="staff", now=T0)

    assert reloaded(order).expires_at == at(MAX_TIMEOUT)


def test_extension_of_an_unknown_order_is_not_found() -> None:
    with pytest.raises(OrderNotFound):
        services.extend_order(order_id=MISSING_ID, seconds=60, by="customer", now=T0)


# cancel_order -------------------------------------------------------------------------


def test_customer_cancels_an_unpaid_order() -> None:
    order = place()

    services.cancel_order(order_id=order.pk, by="customer", reason="changed my mind", now=at(5))

    order = reloaded(order)
    assert order.status == Status.CANCELLED
    assert order.cancel_reason == CancelReason.CUSTOMER
    assert order.cancelled_at == at(5)
    assert history(order) == [
        PLACED,
        ("cancel", "created", "cancelled", "customer", "changed my mind"),
    ]


def test_staff_cancels_an_unpaid_order_in_their_name() -> None:
    alice = User.objects.create_user(username="alice", is_staff=True)
    order = place()

    services.cancel_order(
        order_id=order.pk,
        by=alice,
        reason="fraud suspected",
        cancel_reason=CancelReason.STAFF,
        now=at(5),
    )

    order = reloaded(order)
    assert (order.status, order.cancel_reason) == (Status.CANCELLED, CancelReason.STAFF)
    placed, row = order.history.all()
    assert placed.transition == PLACE
    assert (row.transition, row.actor, row.user_id, row.reason, row.at) == (
        "cancel",
        "alice",
        alice.pk,
        "fraud suspected",
        at(5),
    )


@pytest.mark.parametrize("make", [paid_order, lambda: cancelled_order()])
def test_only_an_unpaid_order_can_be_cancelled(make: Callable[[], AbstractOrder]) -> None:
    order = make()
    before = history(order)

    with pytest.raises(InvalidTransition):
        services.cancel_order(order_id=order.pk, by="customer", now=at(30))

    assert history(order) == before


def cancelled_order() -> AbstractOrder:
    order = place()
    services.cancel_order(order_id=order.pk, by="customer", now=at(5))
    return order


@pytest.mark.parametrize(
    "reason",
    ["nul \x00 byte", "x" * 1001, 5, ["x"]],
    ids=["NUL", "longer than 1000 characters", "int", "list"],
)
def test_cancel_or_refund_with_an_unstorable_reason_is_refused(reason: Any) -> None:
    # A NUL is a DataError on PostgreSQL; a megabyte of reason is not a reason.
    unpaid, paid = place(), paid_order()

    with pytest.raises(InvalidInput, match="reason"):
        services.cancel_order(order_id=unpaid.pk, by="customer", reason=reason, now=at(20))
    with pytest.raises(InvalidInput, match="reason"):
        services.refund_order(order_id=paid.pk, by="staff", reason=reason, now=at(20))

    assert (reloaded(unpaid).status, reloaded(paid).status) == (Status.CREATED, Status.PAID)
    assert OrderTransition.objects.filter(transition__in=["cancel", "refund"]).count() == 0
    assert Payment.objects.get().refunded_at is None


def test_a_reason_of_exactly_the_limit_with_line_breaks_is_kept() -> None:
    order = place()
    reason = "line one\nline two " + "x" * 982

    services.cancel_order(order_id=order.pk, by="customer", reason=reason, now=at(20))

    assert len(reason) == 1000
    assert history(reloaded(order))[-1][-1] == reason


def test_cancelling_an_unknown_order_is_not_found() -> None:
    with pytest.raises(OrderNotFound):
        services.cancel_order(order_id=MISSING_ID, by="customer")


# ship_order ---------------------------------------------------------------------------


def test_paid_order_ships_with_a_tracking_number_from_the_provider() -> None:
    order = paid_order()

    shipped = services.ship_order(order_id=order.pk, now=at(60))

    order = reloaded(order)
    assert shipped.status == order.status == Status.DELIVERED
    assert order.delivered_at == at(60)
    assert order.tracking_number.startswith("TRK_")
    assert order.tracking_number == LocalLogisticsProvider().create_shipment(
        order_id=str(order.pk), idempotency_key=f"ship:{order.pk}"
    )
    assert history(order)[-1] == ("ship", "paid", "delivered", "shipping", "")


def test_shipping_again_keeps_the_tracking_number_and_ships_once() -> None:
    order = paid_order()
    first = services.ship_order(order_id=order.pk, now=at(60)).tracking_number

    again = services.ship_order(order_id=order.pk, now=at(120))

    assert again.tracking_number == first
    assert reloaded(order).delivered_at == at(60)
    assert transitions(order) == [PLACE, "pay", "ship"]


def test_local_logistics_provider_gives_the_same_number_for_the_same_key() -> None:
    provider = LocalLogisticsProvider()

    first = provider.create_shipment(order_id="a", idempotency_key="ship:a")

    assert provider.create_shipment(order_id="a", idempotency_key="ship:a") == first
    assert provider.create_shipment(order_id="b", idempotency_key="ship:b") != first


def test_shipping_an_unpaid_order_does_nothing() -> None:
    order = place()

    returned = services.ship_order(order_id=order.pk, now=at(60))

    assert returned.status == reloaded(order).status == Status.CREATED
    assert reloaded(order).tracking_number == ""
    assert history(order) == [PLACED]


# refund_order -------------------------------------------------------------------------


@pytest.mark.parametrize("shipped", [False, True], ids=["paid", "delivered"])
def test_refund_refunds_the_payment_and_closes_the_order(shipped: bool) -> None:
    alice = User.objects.create_user(username="alice", is_staff=True)
    order = paid_order()
    if shipped:
        services.ship_order(order_id=order.pk, now=at(60))
    source = Status.DELIVERED if shipped else Status.PAID

    services.refund_order(order_id=order.pk, by=alice, reason="damaged parcel", now=at(120))

    order = reloaded(order)
    assert order.status == Status.CANCELLED
    assert order.cancel_reason == CancelReason.REFUND
    assert order.refunded_at == order.cancelled_at == at(120)
    assert order.refund_ref.startswith("rf_")
    assert history(order)[-2:] == [
        ("refund", source, "refunded", "alice", "damaged parcel"),
        ("close", "refunded", "cancelled", "system", "closed after refund"),
    ]
    refund_row = order.history.get(transition="refund")
    assert (refund_row.user_id, refund_row.at) == (alice.pk, at(120))
    payment = Payment.objects.get(order_id=order.pk)
    assert (payment.refunded_at, payment.refund_ref) == (at(120), order.refund_ref)
    assert payment.outcome == Payment.Outcome.ACCEPTED


def test_unpaid_order_cannot_be_refunded() -> None:
    order = place()

    with pytest.raises(InvalidTransition, match="created"):
        services.refund_order(order_id=order.pk, by="staff", reason="why not", now=at(60))

    assert reloaded(order).status == Status.CREATED
    assert history(order) == [PLACED]


@pytest.mark.parametrize("reason", ["", "   ", "\n"])
def test_refund_without_a_reason_is_refused(reason: str) -> None:
    order = paid_order()

    with pytest.raises(InvalidInput, match="reason"):
        services.refund_order(order_id=order.pk, by="staff", reason=reason, now=at(60))

    assert reloaded(order).status == Status.PAID
    assert Payment.objects.get().refunded_at is None


def test_refund_the_gateway_refuses_leaves_the_order_paid(settings: Settings) -> None:
    order = paid_order()
    use_gateway(settings, "FailingGateway")

    with pytest.raises(GatewayError):
        services.refund_order(order_id=order.pk, by="staff", reason="damaged", now=at(60))

    order = reloaded(order)
    assert (order.status, order.refunded_at, order.refund_ref) == (Status.PAID, None, "")
    assert transitions(order) == [PLACE, "pay"]
    assert Payment.objects.get().refunded_at is None


def test_refunding_twice_is_refused_and_refunds_once(settings: Settings) -> None:
    order = paid_order()
    RecordingGateway.calls = []
    use_gateway(settings, "RecordingGateway")
    services.refund_order(order_id=order.pk, by="staff", reason="damaged", now=at(60))

    with pytest.raises(InvalidTransition, match="cancelled"):
        services.refund_order(order_id=order.pk, by="staff", reason="damaged", now=at(70))

    assert RecordingGateway.calls == ["refund:pay-1"]
    assert transitions(order) == [PLACE, "pay", "refund", "close"]
    assert reloaded(order).refund_ref == "rf-refund:pay-1"


def test_concurrent_refunds_ask_the_gateway_with_one_key_and_refund_once(
    settings: Settings,
) -> None:
    order = paid_order()
    RacingGateway.calls = []
    use_gateway(settings, "RacingGateway")

    returned = services.refund_order(order_id=order.pk, by="staff", reason="damaged", now=at(60))

    assert RacingGateway.calls == ["refund:pay-1", "refund:pay-1"]
    assert returned.status == Status.CANCELLED
    assert history(order)[2:] == [
        ("refund", "paid", "refunded", "other worker", "double click"),
        ("close", "refunded", "cancelled", "system", "closed after refund"),
    ]


def test_refunding_an_unknown_order_is_not_found() -> None:
    with pytest.raises(OrderNotFound):
        services.refund_order(order_id=MISSING_ID, by="staff", reason="r")


# refund_payment -----------------------------------------------------------------------


def test_late_payment_is_refunded_once() -> None:
    order = place(timeout=60)
    late = pay(order, ref="late-1", now=at(120))

    refunded = services.refund_payment(payment_id=late.pk, now=at(130))
    again = services.refund_payment(payment_id=late.pk, now=at(140))

    payment = Payment.objects.get(pk=late.pk)
    assert payment.refunded_at == refunded.refunded_at == again.refunded_at == at(130)
    assert payment.refund_ref.startswith("rf_")
    assert again.refund_ref == payment.refund_ref
    assert not payment.needs_refund
    assert reloaded(order).status == Status.CANCELLED
    # One line of the order's history, naming the payment: the payment.refunded event.
    assert list(
        order.history.filter(transition=REFUND_PAYMENT).values_list(
            "source", "target", "actor", "at", "payment_id", "event_type"
        )
    ) == [("cancelled", "cancelled", "system", at(130), late.pk, "payment.refunded")]


def test_late_payment_refund_asks_the_gateway_with_its_reference_as_key(
    settings: Settings,
) -> None:
    order = place(timeout=60)
    late = pay(order, ref="late-1", now=at(120))
    RecordingGateway.calls = []
    use_gateway(settings, "RecordingGateway")

    services.refund_payment(payment_id=late.pk, now=at(130))
    services.refund_payment(payment_id=late.pk, now=at(140))

    assert RecordingGateway.calls == ["refund:late-1"]
    assert Payment.objects.get(pk=late.pk).refund_ref == "rf-refund:late-1"


def test_late_payment_refund_the_gateway_refuses_is_left_for_a_retry(
    settings: Settings,
) -> None:
    order = place(timeout=60)
    late = pay(order, ref="late-1", now=at(120))
    use_gateway(settings, "FailingGateway")

    with pytest.raises(GatewayError):
        services.refund_payment(payment_id=late.pk, now=at(130))

    assert Payment.objects.get(pk=late.pk).needs_refund
    assert transitions(order) == [PLACE, "expire"]


def test_refunding_an_accepted_payment_does_nothing() -> None:
    order = paid_order()
    payment = Payment.objects.get(order_id=order.pk)

    services.refund_payment(payment_id=payment.pk, now=at(60))

    payment.refresh_from_db()
    assert (payment.refunded_at, payment.refund_ref) == (None, "")
    assert reloaded(order).status == Status.PAID
    assert transitions(order) == [PLACE, "pay"]


# record_parcel_status -----------------------------------------------------------------


def delivered_order() -> AbstractOrder:
    order = paid_order()
    services.ship_order(order_id=order.pk, now=at(60))
    return reloaded(order)


def test_returned_parcel_refunds_and_closes_the_order() -> None:
    order = delivered_order()

    services.record_parcel_status(
        order_id=order.pk, tracking_number=order.tracking_number, status="returned"
    )

    order = reloaded(order)
    assert (order.status, order.cancel_reason) == (Status.CANCELLED, CancelReason.REFUND)
    assert history(order)[-2:] == [
        ("refund", "delivered", "refunded", "logistics", "parcel returned to sender"),
        ("close", "refunded", "cancelled", "system", "closed after refund"),
    ]
    assert Payment.objects.get().refunded_at is not None


def test_returned_parcel_reported_twice_is_refunded_once() -> None:
    order = delivered_order()

    services.record_parcel_status(
        order_id=order.pk, tracking_number=order.tracking_number, status="returned"
    )
    services.record_parcel_status(
        order_id=order.pk, tracking_number=order.tracking_number, status="returned"
    )

    assert transitions(order) == [PLACE, "pay", "ship", "refund", "close"]


@pytest.mark.parametrize("status", ["in_transit", "delivered"])
def test_parcel_on_its_way_changes_nothing(status: str) -> None:
    order = delivered_order()

    services.record_parcel_status(
        order_id=order.pk, tracking_number=order.tracking_number, status=status
    )

    assert reloaded(order).status == Status.DELIVERED
    assert transitions(order) == [PLACE, "pay", "ship"]


@pytest.mark.parametrize("status", ["lost", "", "RETURNED", None])
def test_unknown_parcel_status_is_refused(status: Any) -> None:
    order = delivered_order()

    with pytest.raises(InvalidInput, match="status"):
        services.record_parcel_status(
            order_id=order.pk, tracking_number=order.tracking_number, status=status
        )

    assert reloaded(order).status == Status.DELIVERED


# sweep --------------------------------------------------------------------------------


def test_sweep_expires_orders_past_their_grace_but_not_within_it() -> None:
    late = place(timeout=60)  # 12 s late at the sweep
    recent = place(timeout=70)  # 2 s late: its own timer should fire first

    report = services.sweep(now=at(72))

    assert (report.expired, report.max_lateness) == (1, 12.0)
    late = reloaded(late)
    assert (late.status, late.cancel_reason, late.cancelled_at) == (
        Status.CANCELLED,
        CancelReason.TIMEOUT,
        at(72),
    )
    assert history(late) == [
        PLACED,
        ("expire", "created", "cancelled", "sweep", "not paid in time"),
    ]
    assert reloaded(recent).status == Status.CREATED
    assert history(recent) == [PLACED]


def test_sweep_grace_comes_from_settings(settings: Settings) -> None:
    settings.ORDERS = settings.ORDERS | {"SWEEP_GRACE": 0}
    order = place(timeout=60)

    assert services.sweep(now=at(60.5)).expired == 1
    assert reloaded(order).status == Status.CANCELLED


def test_sweep_leaves_paid_and_cancelled_orders_alone() -> None:
    paid, cancelled = paid_order(), cancelled_order()

    report = services.sweep(now=at(3600))

    assert report.expired == 0
    assert reloaded(paid).status == Status.DELIVERED  # shipped by the retry, not expired
    assert transitions(cancelled) == [PLACE, "cancel"]


def test_sweep_arms_timers_that_came_within_the_horizon_or_were_lost(
    published: Published, django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks
) -> None:
    came_near = place(now=at(-4000), timeout=6000)  # due at +2000, placed beyond the horizon
    lost = place(timeout=600)
    Order.objects.filter(pk=lost.pk).update(timer_armed_for=None)  # broker was down
    moved = place(timeout=900)
    Order.objects.filter(pk=moved.pk).update(timer_armed_for=at(300))  # for an old deadline
    armed = place(timeout=1200)
    far = place(timeout=HORIZON + 1)
    assert came_near.timer_armed_for is None
    assert far.timer_armed_for is None

    with django_capture_on_commit_callbacks(execute=True):
        report = services.sweep(now=T0)

    assert report.timers_armed == 3
    assert report.expired == 0
    for order in (came_near, lost, moved, armed):
        order = reloaded(order)
        assert order.timer_armed_for == order.expires_at
    assert reloaded(far).timer_armed_for is None
    assert sorted(published.timers) == sorted(
        (str(o.pk), o.expires_at) for o in (came_near, lost, moved)
    )
    assert services.sweep(now=T0).timers_armed == 0


def test_sweep_retries_shipping_of_paid_orders_left_unshipped() -> None:
    stuck = place(now=at(-200))
    pay(stuck, now=at(-120))
    fresh = place(now=at(-40))
    pay(fresh, ref="pay-2", now=at(-30))

    report = services.sweep(now=T0)

    assert report.shipments_retried == 1
    assert report.errors == []
    stuck = reloaded(stuck)
    assert stuck.status == Status.DELIVERED
    assert stuck.tracking_number
    assert reloaded(fresh).status == Status.PAID


def test_sweep_refunds_late_payments_left_unrefunded() -> None:
    order = place(now=at(-1000), timeout=60)
    stale = pay(order, ref="late-1", now=at(-500))
    fresh = pay(order, ref="late-2", now=at(-10))

    report = services.sweep(now=T0)

    assert report.refunds_retried == 1
    assert report.errors == []
    assert Payment.objects.get(pk=stale.pk).refunded_at is not None
    assert Payment.objects.get(pk=fresh.pk).needs_refund
    assert services.sweep(now=T0).refunds_retried == 0


def test_sweep_reports_a_refund_the_gateway_refuses_and_carries_on(
    settings: Settings,
) -> None:
    order = place(now=at(-1000), timeout=60)
    late = pay(order, ref="late-1", now=at(-500))
    stuck = place(now=at(-200))
    pay(stuck, now=at(-120))
    use_gateway(settings, "FailingGateway")

    report = services.sweep(now=T0)

    assert report.refunds_retried == 1
    assert len(report.errors) == 1
    assert "refund" in report.errors[0]
    assert Payment.objects.get(pk=late.pk).needs_refund
    assert reloaded(stuck).status == Status.DELIVERED


def test_sweep_expires_every_overdue_order_batch_by_batch(settings: Settings) -> None:
    settings.ORDERS = settings.ORDERS | {"EXPIRY_BATCH_SIZE": 2}
    orders = [place(timeout=60 + i) for i in range(5)]

    report = services.sweep(now=at(600))

    assert (report.expired, report.max_lateness) == (5, 540.0)
    assert {reloaded(o).status for o in orders} == {Status.CANCELLED}
    assert [transitions(o) for o in orders] == [[PLACE, "expire"]] * 5


def test_bucket_timer_expires_the_orders_due_within_its_tenth_of_a_second() -> None:
    in_bucket = [place(timeout=600.11), place(timeout=600.15), place(timeout=600.2)]
    next_bucket = place(timeout=600.25)
    bucket = scheduling.bucket_of(at(600.11))
    assert bucket == scheduling.bucket_of(at(600.2)) == int(at(600.2).timestamp() * 1000)

    assert services.expire_bucket(bucket=bucket, now=at(600.21)) == 3
    assert services.expire_bucket(bucket=bucket, now=at(600.22)) == 0

    for order in in_bucket:
        assert history(reloaded(order)) == [
            PLACED,
            ("expire", "created", "cancelled", "expiry timer", "not paid in time"),
        ]
    assert reloaded(next_bucket).status == Status.CREATED


def test_bucket_timer_fired_early_expires_nothing_before_its_deadline_and_comes_again(
    timers_key: str,
) -> None:
    order = place(timeout=600.5)
    bucket = scheduling.bucket_of(at(600.5))

    assert services.expire_bucket(bucket=bucket, now=at(600.4)) == 0

    assert reloaded(order).status == Status.CREATED
    assert broker.redis_client().zscore(timers_key, f"expire:{bucket}") == bucket


def test_a_bucket_fired_at_its_earliest_deadline_comes_again_only_for_later_ones(
    timers_key: str,
) -> None:
    first, later = place(timeout=600.41), place(timeout=600.47)
    bucket = scheduling.bucket_of(at(600.41))
    client = broker.redis_client()

    assert services.expire_bucket(bucket=bucket, now=at(600.41)) == 1
    assert client.zscore(timers_key, f"expire:{bucket}") == bucket  # for the later order
    client.delete(timers_key)
    assert services.expire_bucket(bucket=bucket, now=at(600.47)) == 1
    assert client.zscore(timers_key, f"expire:{bucket}") is None  # nothing left in it

    assert (reloaded(first).status, reloaded(later).status) == (Status.CANCELLED,) * 2


def test_a_bucket_task_that_ends_after_the_bucket_still_comes_again_for_what_it_left(
    timers_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The task decides what is its own once: a clock that moves on while it works (here
    30 ms a reading) does not make it drop the orders due after that moment."""
    first, later = place(timeout=600.41), place(timeout=600.47)
    bucket = scheduling.bucket_of(at(600.41))
    readings = iter(range(1000))
    monkeypatch.setattr(services.timezone, "now", lambda: at(600.41 + 0.03 * next(readings)))

    assert services.expire_bucket(bucket=bucket) == 1

    assert (reloaded(first).status, reloaded(later).status) == (Status.CANCELLED, Status.CREATED)
    assert broker.redis_client().zscore(timers_key, f"expire:{bucket}") == bucket


def test_a_bucket_comes_again_for_its_later_deadlines_before_its_task_expires_anything(
    timers_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bucket is added back first: a task that runs long (a sale's batches, a
    provider asked about a held order) or dies does not hold back the later deadlines."""
    first, later = place(timeout=600.41), place(timeout=600.47)
    bucket = scheduling.bucket_of(at(600.41))

    def worker_lost(**kwargs: Any) -> NoReturn:
        raise SystemExit("worker lost")

    monkeypatch.setattr(services, "expire_due_orders", worker_lost)
    with pytest.raises(SystemExit):
        services.expire_bucket(bucket=bucket, now=at(600.41))

    assert broker.redis_client().zscore(timers_key, f"expire:{bucket}") == bucket
    assert (reloaded(first).status, reloaded(later).status) == (Status.CREATED,) * 2


@pytest.mark.parametrize(("helpers", "published"), [(3, 2), (1, 1), (0, 0)])
def test_a_bucket_of_more_than_one_batch_is_shared_by_helpers_that_do_not_share_again(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, helpers: int, published: int
) -> None:
    settings.ORDERS = settings.ORDERS | {"EXPIRY_BATCH_SIZE": 2, "EXPIRY_HELPERS": helpers}
    sent: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(scheduling, "publish", lambda task, **kw: sent.append((task.name, kw)))
    bucket = scheduling.bucket_of(at(600.15))
    first = [place(timeout=600.15) for _ in range(5)]  # three batches

    assert services.expire_bucket(bucket=bucket, now=at(601)) == 5

    if connection.vendor == "sqlite":  # no skip_locked: one task a bucket
        published = 0
    helper = ("orders.expire_bucket", {"args": (bucket,), "kwargs": {"share": False}})
    assert sent == [helper] * published
    assert {reloaded(o).status for o in first} == {Status.CANCELLED}
    sent.clear()
    more = [place(timeout=600.12) for _ in range(5)]
    assert services.expire_bucket(bucket=bucket, now=at(601), share=False) == 5
    assert sent == []
    assert {reloaded(o).status for o in more} == {Status.CANCELLED}


def test_a_bucket_not_shared_for_want_of_a_broker_is_expired_by_its_own_task(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def down(task: Any, **options: Any) -> NoReturn:
        raise kombu.exceptions.OperationalError("connection refused")

    monkeypatch.setattr(scheduling, "publish", down)

    scheduling.share_bucket(1_700_000_000_100, 2)  # no error: the caller goes on alone

    assert "Timer bucket 1700000000100 not shared, the broker is unreachable" in caplog.text


def test_a_bucket_fired_early_with_redis_down_is_left_to_the_sweep(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    order = place(timeout=600.5)
    bucket = scheduling.bucket_of(at(600.5))

    def down(kind: str, buckets: Any) -> NoReturn:
        raise redis.ConnectionError("connection refused")

    monkeypatch.setattr(scheduling, "add_buckets", down)

    assert services.expire_bucket(bucket=bucket, now=at(600.4)) == 0
    assert reloaded(order).status == Status.CREATED
    assert "could NOT be armed again" in caplog.text
    assert services.sweep(now=at(700)).expired == 1


def test_a_bucket_timer_leaves_the_orders_of_earlier_buckets_to_theirs_and_the_sweep() -> None:
    earlier, own = place(timeout=599.9), place(timeout=600.05)

    assert services.expire_bucket(bucket=scheduling.bucket_of(at(600.05)), now=at(601)) == 1

    assert (reloaded(earlier).status, reloaded(own).status) == (Status.CREATED, Status.CANCELLED)


def test_a_bucket_task_queued_by_the_previous_version_in_whole_seconds_still_works() -> None:
    order = place(timeout=600.5)

    assert services.expire_bucket(bucket=int(at(601).timestamp()), now=at(601)) == 1
    assert reloaded(order).status == Status.CANCELLED
    assert services.expire_bucket(bucket=int(at(600).timestamp()), now=at(601)) == 0


# Signals ------------------------------------------------------------------------------
# Nothing is called when a transition commits: a dispatch is queued, and the dispatcher
# (orders.events) calls each receiver once per event, with a delivery record, however
# often it runs. Here the dispatch runs in the test, twice, as a task delivered twice.


def dispatch_twice(order: AbstractOrder) -> None:
    for _ in range(2):
        events.dispatch([order.pk])


def took(received: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Each call of a ``receipts`` receiver: its signal, sender, order and event."""
    return [
        (r["signal"], r["sender"], r["order"].pk, r["event_id"], r["event"].pk) for r in received
    ]


def once(signal: OrderSignal, event: OrderTransition) -> list[tuple[Any, ...]]:
    """``took()`` of a receiver of ``signal`` that was called for ``event`` alone, once;
    and its delivery record says so."""
    delivery = EventDelivery.objects.get(event=event, receiver=receipt_name(signal))
    assert (delivery.attempts, delivery.parked_at) == (1, None)
    assert delivery.delivered_at is not None
    return [(signal, Order, event.order_id, event.event_id, event.pk)]


def test_order_placed_is_delivered_once_by_the_dispatcher_not_on_commit(
    published: Published,
    receipts: Callable[[OrderSignal], list[dict[str, Any]]],
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    placed = receipts(signals.order_placed)

    with django_capture_on_commit_callbacks(execute=True):
        order = place()

    assert placed == []
    assert published.dispatches == [[str(order.pk)]]
    event = order.history.get()
    assert (event.transition, event.event_type, event.next_dispatch_at) == (
        PLACE,
        "order.placed",
        T0,
    )

    dispatch_twice(order)

    assert took(placed) == once(signals.order_placed, event)
    assert placed[0]["order"].status == Status.CREATED
    event.refresh_from_db()
    assert event.next_dispatch_at is None


def test_order_paid_is_delivered_once_by_the_dispatcher_not_on_commit(
    published: Published,
    receipts: Callable[[OrderSignal], list[dict[str, Any]]],
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    order = place()
    paid = receipts(signals.order_paid)
    expired = receipts(signals.order_expired)

    with django_capture_on_commit_callbacks(execute=True):
        pay(order, ref="pay-1", now=at(10))
        pay(order, ref="pay-1", now=at(11))  # the webhook, delivered twice
        pay(order, ref="pay-2", now=at(12))  # a surplus payment

    assert paid == []
    assert published.dispatches == [[str(order.pk)]]

    dispatch_twice(order)

    assert took(paid) == once(signals.order_paid, order.history.get(transition="pay"))
    assert paid[0]["order"].status == Status.PAID
    assert expired == []


def test_order_expired_is_delivered_once_by_the_dispatcher_not_on_commit(
    published: Published,
    receipts: Callable[[OrderSignal], list[dict[str, Any]]],
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    order = place(timeout=600)
    expired = receipts(signals.order_expired)

    with django_capture_on_commit_callbacks(execute=True):
        for i in range(10):
            services.expire_order(order_id=order.pk, now=at(601 + i))
        services.sweep(now=at(700))

    assert expired == []

    dispatch_twice(order)

    assert took(expired) == once(signals.order_expired, order.history.get(transition="expire"))


def test_late_payment_delivers_order_expired_not_order_paid(
    published: Published,
    receipts: Callable[[OrderSignal], list[dict[str, Any]]],
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    order = place(timeout=600)
    expired, paid = receipts(signals.order_expired), receipts(signals.order_paid)

    with django_capture_on_commit_callbacks(execute=True):
        pay(order, now=at(601))

    assert expired == []

    dispatch_twice(order)

    assert took(expired) == once(signals.order_expired, order.history.get(transition="expire"))
    assert paid == []
    assert not EventDelivery.objects.filter(receiver=receipt_name(signals.order_paid)).exists()


def test_order_refunded_is_delivered_once_by_the_dispatcher_not_on_commit(
    published: Published,
    receipts: Callable[[OrderSignal], list[dict[str, Any]]],
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    order = services.ship_order(order_id=paid_order().pk, now=at(30))
    refunded = receipts(signals.order_refunded)
    cancelled = receipts(signals.order_cancelled)

    with django_capture_on_commit_callbacks(execute=True):
        services.refund_order(order_id=order.pk, by="staff", reason="damaged", now=at(60))
        with pytest.raises(InvalidTransition):
            services.refund_order(order_id=order.pk, by="staff", reason="damaged", now=at(70))
        services.record_parcel_status(
            order_id=order.pk, tracking_number=order.tracking_number, status="returned"
        )

    assert refunded == cancelled == []

    dispatch_twice(order)

    assert took(refunded) == once(signals.order_refunded, order.history.get(transition="refund"))
    # The refunded order closes itself: order.cancelled, with the reason "refund".
    assert took(cancelled) == once(signals.order_cancelled, order.history.get(transition="close"))
    assert cancelled[0]["order"].cancel_reason == CancelReason.REFUND


def test_payment_refunded_is_delivered_once_by_the_dispatcher_not_on_commit(
    published: Published,
    receipts: Callable[[OrderSignal], list[dict[str, Any]]],
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    order = place(timeout=60)
    late = pay(order, ref="late-1", now=at(120))
    refunded = receipts(signals.payment_refunded)

    with django_capture_on_commit_callbacks(execute=True):
        services.refund_payment(payment_id=late.pk, now=at(130))
        services.refund_payment(payment_id=late.pk, now=at(140))

    assert refunded == []

    dispatch_twice(order)

    event = order.history.get(transition=REFUND_PAYMENT)
    assert took(refunded) == once(signals.payment_refunded, event)
    assert refunded[0]["payment"].pk == late.pk
    assert refunded[0]["payment"].refunded_at == at(130)


def test_nothing_is_delivered_when_the_transaction_rolls_back(
    published: Published,
    receipts: Callable[[OrderSignal], list[dict[str, Any]]],
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    order = place()
    paid = receipts(signals.order_paid)

    def pay_in_a_failing_transaction() -> None:
        with transaction.atomic():
            pay(order, now=at(10))
            raise RuntimeError("the caller's transaction fails")

    with django_capture_on_commit_callbacks(execute=True), pytest.raises(RuntimeError):
        pay_in_a_failing_transaction()
    events.dispatch([order.pk])

    assert paid == []
    assert (published.tasks, published.dispatches) == ([], [])
    assert history(order) == [PLACED]
    assert reloaded(order).status == Status.CREATED
    assert Payment.objects.count() == 0
    assert EventDelivery.objects.count() == 0


# The transition log -------------------------------------------------------------------


def test_every_transition_of_a_lifecycle_leaves_one_history_row() -> None:
    alice = User.objects.create_user(username="alice", is_staff=True)
    order = place()
    pay(order, now=at(10))
    services.ship_order(order_id=order.pk, now=at(20))
    services.refund_order(order_id=order.pk, by=alice, reason="damaged", now=at(30))

    rows = list(
        OrderTransition.objects.filter(order_id=order.pk).values_list(
            "transition", "source", "target", "actor", "at"
        )
    )

    assert rows == [
        (PLACE, "", "created", "shop", T0),
        ("pay", "created", "paid", "payment gateway", at(10)),
        ("ship", "paid", "delivered", "shipping", at(20)),
        ("refund", "delivered", "refunded", "alice", at(30)),
        ("close", "refunded", "cancelled", "system", at(30)),
    ]


@pytest.mark.parametrize(
    ("act", "expected"),
    [
        (
            lambda o: services.expire_order(order_id=o.pk, now=at(601)),
            ("expire", "created", "cancelled", "expiry timer", at(601)),
        ),
        (
            lambda o: services.cancel_order(order_id=o.pk, by="customer", now=at(5)),
            ("cancel", "created", "cancelled", "customer", at(5)),
        ),
        (
            lambda o: services.sweep(now=at(700)),
            ("expire", "created", "cancelled", "sweep", at(700)),
        ),
    ],
    ids=["expire", "cancel", "sweep"],
)
def test_ending_an_unpaid_order_leaves_one_history_row(
    act: Callable[[AbstractOrder], object], expected: tuple[str, str, str, str, datetime]
) -> None:
    order = place(timeout=600)

    act(order)

    rows = list(order.history.values_list("transition", "source", "target", "actor", "at"))
    assert rows == [(PLACE, "", "created", "shop", T0), expected]


def test_status_cannot_be_assigned_directly() -> None:
    order = place()

    with pytest.raises(AttributeError):
        order.status = Status.PAID

    assert reloaded(order).status == Status.CREATED
    assert history(order) == [PLACED]


@pytest.mark.django_db
def test_batched_rearm_adds_a_bucket_not_an_order_and_marks_all_in_few_queries(
    settings: Settings, django_assert_max_num_queries: Any, timers_key: str
) -> None:
    settings.ORDERS = settings.ORDERS | {"TIMER_MODE": "batched", "REMIND_BEFORE": 60}
    client = broker.redis_client()
    now = datetime.now(UTC).replace(microsecond=0) + timedelta(days=uuid.uuid4().int % 10_000)
    orders = [services.place_order(amount="10.00", timeout=600 + i % 3, now=now) for i in range(60)]
    services.start_payment(
        order_id=orders[0].pk, attempt_ref=f"att-{uuid.uuid4().hex}", method="card", now=now
    )
    Order.objects.update(timer_armed_for=None)  # Redis lost them

    for run in (1, 2):  # a second run (or one beside the waker) adds nothing twice
        with django_assert_max_num_queries(6):
            for _ in services.rearm_timers(now=now):
                pass

        deadlines = {scheduling.bucket_of(order.expires_at) for order in orders[1:]}
        held = Order.objects.get(pk=orders[0].pk)
        deadlines.add(scheduling.bucket_of(held.expires_at))
        reminders = {
            scheduling.bucket_of(order.expires_at - timedelta(seconds=60)) for order in orders[1:]
        }
        members = client.zrange(scheduling.timers_key(), 0, -1, withscores=True)
        assert sorted(members, key=lambda m: m[0]) == sorted(
            [(f"expire:{b}".encode(), float(b)) for b in deadlines]
            + [(f"remind:{b}".encode(), float(b)) for b in reminders]
        ), f"run {run}"
        assert not Order.objects.exclude(timer_armed_for=F("expires_at")).exists()


def test_a_rearmed_bucket_comes_due_at_the_earliest_deadline_in_it(
    settings: Settings, timers_key: str
) -> None:
    """As arming one order at a time does: a sale's orders expire from their deadline,
    not up to a bucket's width later, after ``orders_rearm`` too."""
    settings.ORDERS = settings.ORDERS | {"TIMER_MODE": "batched"}
    now = datetime.now(UTC).replace(microsecond=0) + timedelta(days=uuid.uuid4().int % 10_000)
    orders = [services.place_order(amount="10.00", timeout=t, now=now) for t in (600.07, 600.03)]
    Order.objects.update(timer_armed_for=None)
    broker.redis_client().delete(timers_key)  # Redis lost them

    for _ in services.rearm_timers(now=now):
        pass

    [bucket] = {scheduling.bucket_of(order.expires_at) for order in orders}
    due = scheduling.ms_after(now + timedelta(seconds=600.03))
    assert due < bucket
    assert broker.redis_client().zscore(timers_key, f"expire:{bucket}") == due


@pytest.mark.django_db
def test_batched_rearm_with_the_broker_down_marks_nothing_and_says_so(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.ORDERS = settings.ORDERS | {"TIMER_MODE": "batched"}
    services.place_order(amount="10.00", timeout=600)
    monkeypatch.setattr(
        scheduling, "_redis", lambda: redis.Redis(port=1, socket_connect_timeout=0.2)
    )
    Order.objects.update(timer_armed_for=None)

    with pytest.raises(CommandError, match="broker is unreachable"):
        call_command("orders_rearm", stdout=io.StringIO(), stderr=io.StringIO())
    assert not Order.objects.filter(timer_armed_for__isnull=False).exists()


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"colour": "red"}, f"'colour' is not a field of {Order._meta.label}"),
        ({"status": "paid"}, "status is set by the order's lifecycle"),
        ({"expires_at": T0}, "expires_at is set by the order's lifecycle"),
    ],
)
def test_place_order_refuses_fields_the_order_model_does_not_let_it_set(
    fields: dict[str, Any], says: str
) -> None:
    with pytest.raises(InvalidInput, match=says):
        services.place_order(amount="10.00", now=T0, **fields)

    assert Order.objects.count() == 0


def test_orders_without_a_reference_are_many_and_one_with_a_reference_is_one() -> None:
    unreferenced = [services.place_order(amount="10.00", now=T0) for _ in range(3)]
    first = services.place_order(amount="10.00", reference="shop-7", metadata={"a": 1}, now=T0)

    with pytest.raises(services.DuplicateReference, match=f"Order {first.pk} already has"):
        services.place_order(amount="10.00", reference="shop-7", now=T0)

    assert [o.reference for o in unreferenced] == [None, None, None]
    assert Order.objects.get(reference="shop-7").metadata == {"a": 1}
    assert Order.objects.count() == 4
    assert reloaded(unreferenced[0]).metadata == {}


def test_after_the_resolution_is_lowered_a_rearm_gives_each_order_a_bucket_of_the_new_width(
    settings: Settings, timers_key: str
) -> None:
    """A bucket armed before the change keeps its old end; its task takes only the new
    width before that end. ``orders_rearm`` (README, TIMER_RESOLUTION) arms the rest."""
    settings.ORDERS = settings.ORDERS | {"TIMER_MODE": "batched", "TIMER_RESOLUTION": 1.0}
    early, late = place(timeout=600.2), place(timeout=600.95)
    old_bucket = scheduling.bucket_of(at(600.2))
    assert old_bucket == scheduling.bucket_of(at(600.95))  # one bucket, a second wide

    settings.ORDERS = settings.ORDERS | {"TIMER_RESOLUTION": 0.1}
    assert services.expire_bucket(bucket=old_bucket, now=at(601.05)) == 1
    assert (reloaded(early).status, reloaded(late).status) == (Status.CREATED, Status.CANCELLED)

    for _ in services.rearm_timers(now=at(601.05)):
        pass
    new_bucket = scheduling.bucket_of(at(600.2))
    assert new_bucket != old_bucket
    assert broker.redis_client().zscore(timers_key, f"expire:{new_bucket}") is not None
    assert services.expire_bucket(bucket=new_bucket, now=at(601.05)) == 1
    assert reloaded(early).status == Status.CANCELLED
