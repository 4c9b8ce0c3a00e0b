"""The order's story, one use case per function. Every write to an order goes through here.

Each function that moves an order locks its row first (``select_for_update``; on SQLite
every write transaction is IMMEDIATE, which serialises them), re-checks the state under
the lock, and queues its follow-up tasks only after the commit. So a payment and an
expiry cannot both win, and a task or webhook delivered twice does what it did once.
What the shop hears is the history row each step writes in its own transaction
(``orders.events``): nothing it must hear rides on an ``on_commit`` hook alone.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cache, partial
from typing import Any

from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone
from django.utils.module_loading import import_string
from django_fsm import can_proceed

from orders import events, get_order_model, scheduling
from orders.conf import PAYMENT_METHOD_PATTERN, get_settings
from orders.gateways import (
    AsksPaymentStatus,
    AttemptStatus,
    ClosesPayments,
    GatewayError,
    logistics_provider,
    payment_gateway,
)
from orders.logging import log_event
from orders.models import (
    EXPIRED_REASON,
    LATE_PAYMENT_REASON,
    PAYMENT_FAILED,
    PAYMENT_PENDING,
    PLACE,
    REASON_MAX_LENGTH,
    REFERENCE_MAX_LENGTH,
    REFUND_PAYMENT,
    REMIND,
    SWEEP,
    SYSTEM,
    TIMER,
    AbstractOrder,
    Actor,
    CancelReason,
    IdempotencyRecord,
    OrderTransition,
    ParcelEvent,
    ParcelStatus,
    Payment,
    PaymentAttempt,
    Status,
    SweepRun,
    concrete_field,
    event_type_of,
)

logger = logging.getLogger("orders")


class OrderError(Exception):
    """A request the order cannot honour. The message is meant for the person who made it."""


class InvalidInput(OrderError):
    pass


class OrderNotFound(OrderError):
    pass


class InvalidTransition(OrderError):
    pass


class DuplicateReference(OrderError):
    """Another order already has the ``reference`` given (a conflict: a 409)."""


def _locked(order_id: Any) -> AbstractOrder:
    return _get(order_id, lock=True)


def _get(order_id: Any, *, lock: bool = False) -> AbstractOrder:
    model = get_order_model()
    orders = model.objects.select_for_update() if lock else model.objects.all()
    try:
        return orders.get(pk=order_id)
    except (model.DoesNotExist, ValidationError, ValueError) as exc:  # or not a UUID at all
        raise OrderNotFound(f"No order with id {order_id!r}.") from exc


# Input checks -------------------------------------------------------------------------
# Every value from outside (API, webhooks, admin forms, tasks) is checked here, once, so
# that whichever door it came through, a bad value is a clear InvalidInput (a 400), never
# a database error (a 500) or a surprise stored.

# ASCII letters before upper(), which turns "ß" into "SS" and "ﬀ" into "FF".
CURRENCY_PATTERN = "[A-Za-z]{3}"
_CURRENCY = re.compile(CURRENCY_PATTERN)
#: What a reason may not contain: NUL, which PostgreSQL cannot store in text.
REASON_PATTERN = "[^\\x00]*"
_REASON = re.compile(REASON_PATTERN)
#: A payment reference: no C0/C1 control characters nor Unicode line separators.
PAYMENT_REF_PATTERN = "[^\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029]{1,128}"
_PAYMENT_REF = re.compile(PAYMENT_REF_PATTERN)
# ASCII digits only: Decimal() alone also reads full-width digits, "1_000", "1e3", " 12 "
# and "NaN".
_AMOUNT = re.compile(r"-?[0-9]+(\.[0-9]+)?")
# Longer than any amount that could pass (10 digits, 2 decimals): refused before parsing.
_AMOUNT_MAX_CHARS = 32
_QUANTUM = Decimal("0.01")


def brief(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error message quotes what it refused
    without echoing (and logging) a megabyte of it back."""
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def parse_amount(value: Any) -> Decimal:
    """A positive amount of money with at most 2 decimals and 10 digits, from a decimal
    string of ASCII digits, an int or (from Python callers) a Decimal."""
    is_text = isinstance(value, str) and len(value) <= _AMOUNT_MAX_CHARS
    is_number = isinstance(value, int | Decimal) and not isinstance(value, bool)
    if not (is_number or (is_text and _AMOUNT.fullmatch(value))):
        # Floats carry binary rounding errors into money; ask for a string.
        raise InvalidInput(f'amount must be a decimal string such as "12.50", got {brief(value)}.')
    amount = Decimal(value)
    if not amount.is_finite() or amount <= 0:
        raise InvalidInput(f"amount must be greater than zero, got {brief(value)}.")
    # The magnitude first: quantize() itself fails on numbers of more than 28 digits.
    if amount >= Decimal("1e10") or amount != amount.quantize(_QUANTUM):
        raise InvalidInput(
            f"amount must have at most 2 decimal places and 10 digits, got {brief(value)}."
        )
    return amount.quantize(_QUANTUM)


def parse_reason(value: Any, *, required: bool = False) -> str:
    """A transition's reason: text of at most ``REASON_MAX_LENGTH`` characters, without
    NUL (which PostgreSQL cannot store). Line breaks are fine: logs escape them."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InvalidInput(f"reason must be a string, got {brief(value)}.")
    if not _REASON.fullmatch(value):
        raise InvalidInput("reason must not contain NUL characters (\\u0000).")
    if len(value) > REASON_MAX_LENGTH:
        raise InvalidInput(
            f"reason must be at most {REASON_MAX_LENGTH} characters, got {len(value)}."
        )
    if required and not value.strip():
        raise InvalidInput("A reason is required.")
    return value


def parse_payment_ref(value: Any, *, name: str = "payment_ref") -> str:
    # A reference names a payment (or a payment attempt) at the gateway: no control
    # characters, so that it cannot carry a NUL to the database or a line break into a log.
    if not isinstance(value, str) or not _PAYMENT_REF.fullmatch(value):
        raise InvalidInput(f"{name} must be 1 to 128 characters, without control characters.")
    return value


_PAYMENT_METHOD = re.compile(PAYMENT_METHOD_PATTERN)


def parse_payment_method(value: Any) -> str:
    if not isinstance(value, str) or not _PAYMENT_METHOD.fullmatch(value):
        raise InvalidInput(
            "method must be 1 to 32 lowercase letters, digits, '_', '.' or '-' "
            '(a key of ORDERS["PAYMENT_HOLD"], e.g. "card").'
        )
    return value


#: A shop's reference for an order: as a payment reference, 1 to REFERENCE_MAX_LENGTH
#: characters without control characters.
REFERENCE_PATTERN = f"[^\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029]{{1,{REFERENCE_MAX_LENGTH}}}"
_REFERENCE = re.compile(REFERENCE_PATTERN)
TRACKING_NUMBER_MAX_LENGTH = 64
TRACKING_NUMBER_PATTERN = (
    f"[^\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029]{{1,{TRACKING_NUMBER_MAX_LENGTH}}}"
)
_TRACKING_NUMBER = re.compile(TRACKING_NUMBER_PATTERN)
#: The order's metadata is a flat JSON object, as Stripe's is: at most this many keys,
#: each key at most METADATA_KEY_MAX_LENGTH characters, each value a string of at most
#: METADATA_VALUE_MAX_LENGTH characters, a finite number, true, false or null. No NUL
#: anywhere (PostgreSQL cannot store it in JSON).
METADATA_MAX_KEYS = 50
METADATA_KEY_MAX_LENGTH = 40
METADATA_VALUE_MAX_LENGTH = 500
NO_NUL_PATTERN = "[^\\x00]*"


def parse_reference(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _REFERENCE.fullmatch(value):
        raise InvalidInput(
            f"reference must be 1 to {REFERENCE_MAX_LENGTH} characters, without control characters."
        )
    return value


def parse_metadata(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"metadata must be a JSON object, got {brief(value)}.")
    if len(value) > METADATA_MAX_KEYS:
        raise InvalidInput(f"metadata may have at most {METADATA_MAX_KEYS} keys, got {len(value)}.")
    for key, item in value.items():
        if not isinstance(key, str) or not 1 <= len(key) <= METADATA_KEY_MAX_LENGTH or "\0" in key:
            raise InvalidInput(
                f"metadata keys must be 1 to {METADATA_KEY_MAX_LENGTH} characters without NUL, "
                f"got {brief(key)}."
            )
        if isinstance(item, str):
            if len(item) > METADATA_VALUE_MAX_LENGTH or "\0" in item:
                raise InvalidInput(
                    f"metadata[{key!r}] must be at most {METADATA_VALUE_MAX_LENGTH} characters "
                    "without NUL."
                )
        elif isinstance(item, float) and not math.isfinite(item):
            raise InvalidInput(f"metadata[{key!r}] must be a finite number.")
        elif item is not None and not isinstance(item, bool | int | float):
            raise InvalidInput(
                f"metadata[{key!r}] must be a string, a number, true, false or null (metadata "
                f"is flat), got {brief(item)}."
            )
    return value


def parse_currency(value: Any) -> str:
    if value is None:
        return get_settings().CURRENCY
    if not isinstance(value, str) or not _CURRENCY.fullmatch(value):
        raise InvalidInput(
            f'currency must be a 3-letter ISO 4217 code such as "CNY", got {brief(value)}.'
        )
    return value.upper()


def parse_seconds(value: Any, *, name: str, minimum: float, maximum: float) -> timedelta:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{name} must be a number of seconds, got {brief(value)}.")
    # Compared as given: a 400-digit int overflows float(), so no isfinite() on it.
    if (isinstance(value, float) and not math.isfinite(value)) or not minimum <= value <= maximum:
        raise InvalidInput(
            f"{name} must be between {minimum:g} and {maximum:g} seconds, got {brief(value)}."
        )
    return timedelta(seconds=value)


# Placing and paying -------------------------------------------------------------------


def place_order(
    *,
    amount: Any,
    currency: str | None = None,
    timeout: timedelta | float | None = None,
    reference: str | None = None,
    metadata: dict[str, Any] | None = None,
    by: Actor = "shop",
    now: datetime | None = None,
    **fields: Any,
) -> AbstractOrder:
    """Create an unpaid order whose deadline is ``now + timeout`` (default:
    ``ORDERS["DEFAULT_TIMEOUT"]``, seconds or a function of the order), and arm its expiry
    timer once the order is committed. ``reference`` (the shop's own id, unique:
    ``DuplicateReference`` if another order has it) and ``metadata`` (a flat JSON object)
    link the order to the shop's. ``fields`` are the shop's own fields of its order model
    (``ORDERS_ORDER_MODEL``), e.g. ``customer=...``, checked by the fields' own
    validation; the lifecycle's fields are not among them."""
    now = now or timezone.now()
    order = get_order_model()(
        amount=parse_amount(amount),
        currency=parse_currency(currency),
        created_at=now,
        reference=parse_reference(reference),
        metadata=parse_metadata(metadata),
        **_shop_fields(fields),
    )
    _validate_shop_fields(order, fields)
    delta = _timeout_of(order, timeout)
    order.expires_at = now + delta
    _refuse_duplicate_reference(order.reference)
    try:
        with transaction.atomic():
            scheduling.arm_expiry_timer(order, now=now)
            order.save(force_insert=True)
            events.record(order, transition=PLACE, source="", target=order.status, by=by, at=now)
    except IntegrityError:
        # The same reference raced in: the unique index caught it, and nothing was kept.
        _refuse_duplicate_reference(order.reference)
        raise
    log_event(
        logger,
        "order.placed",
        "Order {order_id} placed: {amount} {currency}, payment due by {expires_at}.",
        order=order,
        amount=str(order.amount),
        currency=order.currency,
        expires_at=order.expires_at.isoformat(),
        timeout_s=delta.total_seconds(),
        reference=order.reference,
    )
    return order


def _timeout_of(order: AbstractOrder, timeout: Any) -> timedelta:
    """The order's time to pay: ``timeout`` if given, else ``ORDERS["DEFAULT_TIMEOUT"]``:
    seconds, or what the function it names returns for this (unsaved) order."""
    conf = get_settings()
    name = "timeout"
    if timeout is None:
        timeout = conf.DEFAULT_TIMEOUT
        if isinstance(timeout, str):
            name = f"the timeout {timeout}() returned"
            timeout = _timeout_function(timeout)(order)
    return parse_seconds(timeout, name=name, minimum=conf.MIN_TIMEOUT, maximum=conf.MAX_TIMEOUT)


@cache
def _timeout_function(path: str) -> Callable[[AbstractOrder], Any]:
    function: Callable[[AbstractOrder], Any] = import_string(path)
    return function


def _refuse_duplicate_reference(reference: str | None) -> None:
    if reference is None:
        return
    existing = get_order_model().objects.filter(reference=reference).first()
    if existing is not None:
        raise DuplicateReference(
            f"Order {existing.pk} already has the reference {brief(reference)}; a reference "
            "names one order."
        )


def _shop_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``place_order`` that name the shop's own fields."""
    lifecycle = {f.name for f in AbstractOrder._meta.local_fields}
    model = get_order_model()
    own = {name for f in model._meta.concrete_fields for name in (f.name, f.attname)}
    for name in fields:
        if name in lifecycle:
            raise InvalidInput(f"{name} is set by the order's lifecycle, not by place_order().")
        if name not in own:
            raise InvalidInput(f"{brief(name)} is not a field of {model._meta.label}.")
    return fields


def _validate_shop_fields(order: AbstractOrder, fields: dict[str, Any]) -> None:
    # The values given, by their fields' own rules (max_length, choices, blank,
    # validators), so that a bad one is an InvalidInput and not a database error. A field
    # left out gets its default, as with Model.objects.create(); the lifecycle's fields
    # were checked by the parse_* functions.
    given = {f.name for f in order._meta.concrete_fields if {f.name, f.attname} & set(fields)}
    try:
        order.clean_fields(exclude={f.name for f in order._meta.fields} - given)
    except ValidationError as exc:
        problems = "; ".join(f"{name}: {' '.join(errs)}" for name, errs in exc.message_dict.items())
        raise InvalidInput(problems) from None


def record_payment(
    *,
    order_id: Any,
    payment_ref: str,
    amount: Any,
    currency: str | None = None,
    attempt_ref: str | None = None,
    by: Actor = "payment gateway",
    now: datetime | None = None,
) -> Payment:
    """Record money received for an order. It pays the order only if the order is still
    unpaid, its deadline has not passed (or a payment attempt still holds it) and the
    amount matches; any other payment is kept and refunded. ``attempt_ref`` names the
    attempt it ends (``start_payment``), if the provider says. The same ``payment_ref``
    again changes nothing."""
    payment_ref = parse_payment_ref(payment_ref)
    paid_amount = parse_amount(amount)
    if attempt_ref is not None:
        attempt_ref = parse_payment_ref(attempt_ref, name="attempt_ref")
    try:
        with transaction.atomic():
            order = _locked(order_id)
            # Received now, once we hold the lock: an expiry that held it first came first.
            now = now or timezone.now()
            attempt = (
                PaymentAttempt.objects.filter(order_id=order.pk, reference=attempt_ref).first()
                if attempt_ref is not None
                else None
            )
            payment, fresh = _take_payment(
                order,
                payment_ref=payment_ref,
                amount=paid_amount,
                currency=parse_currency(currency) if currency is not None else order.currency,
                attempt=attempt,
                by=by,
                now=now,
            )
    except IntegrityError:
        # The same reference raced in for another order: the unique index caught it.
        return _existing_payment(_get(order_id), payment_ref) or _raise_reused(payment_ref)
    if fresh:
        _payment_recorded(order, payment, by=by)
    return payment


def _existing_payment(order: AbstractOrder, payment_ref: str) -> Payment | None:
    payment = Payment.objects.filter(reference=payment_ref).first()
    if payment is not None and payment.order_id != order.pk:
        _raise_reused(payment_ref)
    return payment


def _raise_reused(payment_ref: str) -> Payment:
    raise InvalidInput(f"payment_ref {payment_ref!r} was already used for another order.")


def _take_payment(
    order: AbstractOrder,
    *,
    payment_ref: str,
    amount: Decimal,
    currency: str,
    attempt: PaymentAttempt | None,
    by: Actor,
    now: datetime,
) -> tuple[Payment, bool]:
    """Under the order's row lock: record a payment, and pay the order with it if it
    may. Returns the payment and whether it is new (the same reference again is the same
    payment: a webhook bringing what the provider already told us when asked)."""
    duplicate = _existing_payment(order, payment_ref)
    if duplicate is not None:
        log_event(
            logger,
            "payment.duplicate",
            "Payment {payment_ref} for order {order_id} is a duplicate; nothing to do.",
            order=order,
            payment_ref=payment_ref,
        )
        return duplicate, False
    if can_proceed(order.expire) and now > order.expires_at and not order.is_held:
        # The timer has not fired yet, but the deadline is the deadline. (While an
        # attempt is open, a payment is what the order waits for, even past its hold.)
        _expire(order, now=now, by=by, reason=LATE_PAYMENT_REASON)

    if not can_proceed(order.pay):
        outcome = (
            Payment.Outcome.LATE if order.status == Status.CANCELLED else Payment.Outcome.SURPLUS
        )
    elif (amount, currency) != (order.amount, order.currency):
        outcome = Payment.Outcome.MISMATCH
    else:
        outcome = Payment.Outcome.ACCEPTED
        order.pay(by=by, payment_ref=payment_ref, at=now)
        order.save()
        _enqueue_shipping(order)

    payment = Payment.objects.create(
        order_id=order.pk,
        reference=payment_ref,
        amount=amount,
        currency=currency,
        outcome=outcome,
        received_at=now,
    )
    if payment.needs_refund:
        _enqueue_payment_refund(payment)
    if attempt is not None and attempt.is_open:
        if outcome == Payment.Outcome.ACCEPTED:
            _close_attempt(attempt, PaymentAttempt.Outcome.PAID, now=now, payment=payment)
        else:
            _close_attempt(
                attempt,
                PaymentAttempt.Outcome.FAILED,
                now=now,
                payment=payment,
                detail=f"its payment {payment_ref} was {outcome} and is refunded",
            )
            if order.status == Status.CREATED and not _open_attempts(order).exists():
                order.end_hold()  # back to the shop's deadline, passed or not
                scheduling.arm_expiry_timer(order, now=now)
                order.save(update_fields=[*HOLD_FIELDS, "updated_at"])
    if outcome == Payment.Outcome.ACCEPTED:
        _close_open_attempts(order, now=now, detail=f"the order was paid by {payment_ref}")
    return payment, True


def _payment_recorded(order: AbstractOrder, payment: Payment, *, by: Actor) -> None:
    accepted = payment.outcome == Payment.Outcome.ACCEPTED
    log_event(
        logger,
        "payment.recorded",
        "Payment {payment_ref} of {amount} {currency} for order {order_id}: {outcome_text}.",
        level=logging.INFO if accepted else logging.WARNING,
        order=order,
        payment_ref=payment.reference,
        outcome=str(payment.outcome),
        outcome_text=payment.get_outcome_display().lower()
        + ("" if accepted else "; it will be refunded"),
        amount=str(payment.amount),
        currency=payment.currency,
        by=by,
    )


# Payment attempts ---------------------------------------------------------------------
# A customer who pressed "Pay" is in the middle of paying: a 3-D Secure challenge, a bank
# redirect, a QR code on a phone, a bank transfer. The attempt holds the order: its
# deadline (expires_at) waits until the attempt's hold ends; past it, the provider is
# asked before the order expires (paid: the order is paid; failed: it expires; pending
# or no answer: asked again, until the attempt's cap). An attempt still open when its
# order ends otherwise is closed at the provider, so that a QR code stops being payable.


def start_payment(
    *,
    order_id: Any,
    attempt_ref: Any,
    method: Any,
    hold_for: Any = None,
    by: Actor = "customer",
    now: datetime | None = None,
) -> PaymentAttempt:
    """Record that the customer started paying the order (pressed "Pay"): the provider's
    ``attempt_ref`` for it, and its ``method``. The order is held for ``hold_for``
    seconds from now, at most (and by default) ``ORDERS["PAYMENT_HOLD"]`` of the method:
    its deadline becomes the later of its own and the hold's end. The same
    ``attempt_ref`` again returns the attempt as it is."""
    attempt_ref = parse_payment_ref(attempt_ref, name="attempt_ref")
    method = parse_payment_method(method)
    holds = get_settings().PAYMENT_HOLD
    cap = timedelta(seconds=holds.get(method, holds["default"]))
    hold = cap
    if hold_for is not None:  # a hold longer than the method's cap is cut to the cap
        maximum = max(get_settings().MAX_TIMEOUT, cap.total_seconds())
        hold = min(cap, parse_seconds(hold_for, name="hold_for", minimum=1, maximum=maximum))
    try:
        with transaction.atomic():
            order = _locked(order_id)
            now = now or timezone.now()
            existing = PaymentAttempt.objects.filter(reference=attempt_ref).first()
            if existing is not None:
                return _same_attempt(order, existing)
            if not can_proceed(order.pay):
                raise InvalidTransition(
                    f"Only an unpaid order can be paid; this one is {order.status}."
                )
            if order.expires_at <= now:
                raise InvalidTransition("The deadline has passed; the order is expiring.")
            attempt = PaymentAttempt.objects.create(
                order_id=order.pk,
                reference=attempt_ref,
                method=method,
                started_at=now,
                hold_until=now + hold,
                cap_at=now + cap,
            )
            # Marked held even if the deadline stays: a payment is on its way.
            order.hold_until(attempt.hold_until)
            scheduling.arm_expiry_timer(order, now=now)
            order.save(update_fields=[*HOLD_FIELDS, "updated_at"])
            events.record(
                order,
                transition=PAYMENT_PENDING,
                source=order.status,
                target=order.status,
                by=by,
                reason=f"{method} payment {attempt_ref} started: the order waits for it until "
                f"{order.expires_at.isoformat()}",
                at=now,
            )
    except IntegrityError:
        # The same attempt reference raced in (for this order or another).
        return _same_attempt(_get(order_id), PaymentAttempt.objects.get(reference=attempt_ref))
    log_event(
        logger,
        "payment.started",
        "Order {order_id}: {method} payment {attempt_ref} started by {actor}; the order "
        "waits for it until {expires_at}, asks no longer than {cap_at}.",
        order=order,
        by=by,
        method=method,
        attempt_ref=attempt_ref,
        expires_at=order.expires_at.isoformat(),
        cap_at=attempt.cap_at.isoformat(),
    )
    return attempt


def _same_attempt(order: AbstractOrder, attempt: PaymentAttempt) -> PaymentAttempt:
    if attempt.order_id != order.pk:
        raise InvalidInput(f"attempt_ref {attempt.reference!r} was already used for another order.")
    log_event(
        logger,
        "payment.start_duplicate",
        "Payment attempt {attempt_ref} for order {order_id} is a duplicate; nothing to do.",
        order=order,
        attempt_ref=attempt.reference,
    )
    return attempt


#: The order's fields a hold changes.
HOLD_FIELDS = ["expires_at", "original_expires_at", "timer_armed_for"]
#: Orders a payment attempt holds (marked on their own rows).
HELD = Q(original_expires_at__isnull=False)


def _open_attempts(order: AbstractOrder | Any) -> QuerySet[PaymentAttempt]:
    """The order's open attempts (an order, or its id)."""
    order_id = order.pk if isinstance(order, AbstractOrder) else order
    return PaymentAttempt.objects.filter(order_id=order_id, outcome=PaymentAttempt.Outcome.OPEN)


def _close_attempt(
    attempt: PaymentAttempt,
    outcome: PaymentAttempt.Outcome,
    *,
    now: datetime,
    detail: str = "",
    payment: Payment | None = None,
) -> None:
    attempt.outcome, attempt.closed_at, attempt.detail = outcome, now, detail
    attempt.payment = payment or attempt.payment
    attempt.save(update_fields=["outcome", "closed_at", "detail", "payment"])
    if outcome in PaymentAttempt.CLOSE_AT_PROVIDER and isinstance(
        payment_gateway(), ClosesPayments
    ):
        from orders.tasks import close_payment_task

        scheduling.enqueue_on_commit(close_payment_task, str(attempt.pk), what="closing a payment")


def _close_open_attempts(order: AbstractOrder, *, now: datetime, detail: str) -> None:
    """The order no longer waits for its open attempts (paid otherwise, cancelled): close
    each, here and at the provider."""
    for attempt in _open_attempts(order):
        _close_attempt(attempt, PaymentAttempt.Outcome.CLOSED, now=now, detail=detail)


def _ask(attempt: PaymentAttempt) -> AttemptStatus | None:
    """What the provider says of an open attempt; None if it cannot say (no
    ``payment_status``, an error, a time-out): "pending" until the attempt's cap."""
    gateway = payment_gateway()
    if not isinstance(gateway, AsksPaymentStatus):
        return None
    try:
        # In a thread, waited for a bounded time: a gateway that hangs (a socket with no
        # time-out) must not hold this worker, nor the order past its attempt's cap.
        pool = _asking_pool(os.getpid())
        asked = pool.submit(gateway.payment_status, attempt_ref=attempt.reference)
        return asked.result(timeout=get_settings().PAYMENT_STATUS_TIMEOUT)
    except Exception as exc:  # whatever it is, it must not keep the order past the cap
        log_event(
            logger,
            "payment.status_unknown",
            "The payment gateway did not say what became of attempt {attempt_ref} of order "
            "{order_id} ({error}); asked again until {cap_at}.",
            level=logging.WARNING,
            order_id=str(attempt.order_id),
            attempt_ref=attempt.reference,
            cap_at=attempt.cap_at.isoformat(),
            error=str(exc) or type(exc).__name__,
        )
        return None


@cache
def _asking_pool(pid: int) -> ThreadPoolExecutor:
    """The threads that ask the provider, per process (``pid``: a pool inherited through
    a fork has no threads). A few: a call that never returns keeps its thread, and the
    next ones wait, then time out."""
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="orders-payment-status")


def _settle_held(order_id: Any, *, by: Actor, now: datetime | None) -> tuple[ExpiryOutcome, str]:
    """A held order past its deadline: ask the provider about each open attempt (with no
    lock held: it may take seconds), then act on the answers under the row lock."""
    asked_at = now or timezone.now()
    answers = {attempt.pk: _ask(attempt) for attempt in _open_attempts(order_id)}
    with transaction.atomic():
        try:
            order = _locked(order_id)
        except OrderNotFound:
            return ExpiryOutcome.MISSING, "no such order"
        return _act_on_answers(order, answers, asked_at=asked_at, by=by, now=now or timezone.now())


def _act_on_answers(
    order: AbstractOrder,
    answers: dict[int, AttemptStatus | None],
    *,
    asked_at: datetime,
    by: Actor,
    now: datetime,
) -> tuple[ExpiryOutcome, str]:
    """Under the row lock, whatever happened since the provider was asked (at
    ``asked_at``): a paid attempt pays the order (even past its deadline: the customer
    paid while it waited). If the order is still due (no twin asked and re-armed it
    meanwhile), a failed attempt closes, and so does one still pending (or unanswered)
    when asked at or after its cap. The order then waits for the attempts left open, or
    expires."""
    if not can_proceed(order.expire):
        return ExpiryOutcome.NOT_UNPAID, f"it is {order.status}"
    for attempt in list(_open_attempts(order)):
        answer = answers.get(attempt.pk)
        if answer is not None and answer.status == "paid":
            payment = _paid_by_answer(order, attempt, answer, by=by, now=now)
            if payment is not None and order.status == Status.PAID:
                return (
                    ExpiryOutcome.PAID,
                    f"attempt {attempt.reference} paid by {payment.reference}",
                )
    if order.expires_at > now:
        return (
            ExpiryOutcome.WAITING,
            f"asked and re-armed meanwhile: {order.expires_at.isoformat()}",
        )
    for attempt in list(_open_attempts(order)):
        answer = answers.get(attempt.pk)
        if answer is not None and answer.status in ("failed", "expired"):
            _attempt_failed(
                order,
                attempt,
                PaymentAttempt.Outcome.FAILED,
                by=by,
                now=now,
                detail=answer.detail or f"{answer.status} at the provider",
            )
        elif asked_at >= attempt.cap_at:  # "pending" heard before the cap may be stale
            _attempt_failed(
                order,
                attempt,
                PaymentAttempt.Outcome.TIMED_OUT,
                by=by,
                now=now,
                detail="still pending at the provider when its hold ran out"
                if answer is not None
                else "the provider did not answer before its hold ran out",
            )
    recheck = timedelta(seconds=get_settings().PAYMENT_STATUS_RECHECK)
    # Each attempt left open holds the order to its hold's end, or, past that, until it
    # is asked again (never past its cap: at once, if the cap passed while it was asked).
    waits = [
        attempt.hold_until if attempt.hold_until > now else min(now + recheck, attempt.cap_at)
        for attempt in _open_attempts(order)
    ]
    if not waits:
        # Due (so past the shop's deadline too) and no attempt left to wait for. It
        # expired at the end of its hold: expires_at stays the (effective) deadline that
        # passed, original_expires_at the shop's own.
        _expire(order, now=now, by=by)
        return ExpiryOutcome.EXPIRED, ""
    order.end_hold(until=max(waits))
    scheduling.arm_expiry_timer(order, now=now)
    order.save(update_fields=[*HOLD_FIELDS, "updated_at"])
    return ExpiryOutcome.HELD, f"waiting for a payment until {order.expires_at.isoformat()}"


def _paid_by_answer(
    order: AbstractOrder,
    attempt: PaymentAttempt,
    answer: AttemptStatus,
    *,
    by: Actor,
    now: datetime,
) -> Payment | None:
    """The provider says the attempt was paid: record that payment, as its webhook would
    (whose later arrival is then a duplicate, not a surplus payment)."""
    try:
        payment_ref = parse_payment_ref(answer.payment_ref)
        amount = parse_amount(answer.amount)
        currency = parse_currency(answer.currency or order.currency)
    except InvalidInput as exc:
        log_event(
            logger,
            "payment.status_unreadable",
            "The payment gateway says attempt {attempt_ref} of order {order_id} was paid, "
            "but not with what: {error}; asked again.",
            level=logging.ERROR,
            order=order,
            attempt_ref=attempt.reference,
            error=str(exc),
        )
        return None
    payment, fresh = _take_payment(
        order,
        payment_ref=payment_ref,
        amount=amount,
        currency=currency,
        attempt=attempt,
        by=f"{by}, asking the payment gateway",
        now=now,
    )
    if fresh:
        transaction.on_commit(partial(_payment_recorded, order, payment, by=by))
    elif attempt.is_open and payment.outcome == Payment.Outcome.ACCEPTED:
        # Its webhook was quicker, but named no attempt.
        _close_attempt(attempt, PaymentAttempt.Outcome.PAID, now=now, payment=payment)
    return payment


def _attempt_failed(
    order: AbstractOrder,
    attempt: PaymentAttempt,
    outcome: PaymentAttempt.Outcome,
    *,
    by: Actor,
    now: datetime,
    detail: str,
) -> None:
    """An attempt ended without paying: closed, written in the history (its event,
    ``order.payment_failed``) and logged."""
    _close_attempt(attempt, outcome, now=now, detail=detail)
    events.record(
        order,
        transition=PAYMENT_FAILED,
        source=order.status,
        target=order.status,
        by=by,
        reason=f"{attempt.method} payment {attempt.reference}: {detail}",
        at=now,
    )
    log_event(
        logger,
        "payment.failed",
        "Order {order_id}: {method} payment {attempt_ref} ended unpaid ({detail}).",
        level=logging.INFO,
        order=order,
        by=by,
        method=attempt.method,
        attempt_ref=attempt.reference,
        detail=detail,
        outcome=str(outcome),
    )


def close_payment(*, attempt_id: Any, now: datetime | None = None) -> PaymentAttempt:
    """Tell the provider to stop taking money for an attempt its order no longer waits
    for (``ClosesPayments``), once: the row stays locked while it is asked, and says
    afterwards that it was. A ``GatewayError`` leaves it to be retried."""
    with transaction.atomic():
        attempt = PaymentAttempt.objects.select_for_update().get(pk=attempt_id)
        gateway = payment_gateway()
        if (
            attempt.closed_at_provider is not None
            or attempt.outcome not in PaymentAttempt.CLOSE_AT_PROVIDER
            or not isinstance(gateway, ClosesPayments)
        ):
            return attempt
        gateway.close_payment(attempt_ref=attempt.reference)
        attempt.closed_at_provider = now or timezone.now()
        attempt.save(update_fields=["closed_at_provider"])
    log_event(
        logger,
        "payment.closed_at_provider",
        "Payment attempt {attempt_ref} of order {order_id} closed at the provider.",
        order_id=str(attempt.order_id),
        attempt_ref=attempt.reference,
    )
    return attempt


# Expiring -----------------------------------------------------------------------------


class ExpiryOutcome(enum.StrEnum):
    EXPIRED = "expired"
    MISSING = "missing"
    NOT_UNPAID = "not unpaid"
    REARMED = "deadline moved, timer re-armed"
    WAITING = "deadline moved, timer already armed or beyond the horizon"
    ASK = "held by a payment attempt: the provider is asked"
    HELD = "held by a payment attempt the provider says is pending"
    PAID = "paid: the provider says so"


def expire_order(*, order_id: Any, by: Actor = TIMER, now: datetime | None = None) -> ExpiryOutcome:
    """Cancel the order if, under its row lock, it is still unpaid and past its deadline;
    if a payment attempt holds it, only after asking the provider (``_settle_held``).
    Anything else is a logged no-op, so the timer may fire any number of times."""
    with transaction.atomic():
        try:
            order = _locked(order_id)
        except OrderNotFound:
            outcome, detail = ExpiryOutcome.MISSING, "no such order"
        else:
            outcome, detail = _expire_if_due(order, by=by, now=now or timezone.now())
    if outcome is ExpiryOutcome.ASK:
        outcome, detail = _settle_held(order_id, by=by, now=now)
    if outcome not in (ExpiryOutcome.EXPIRED, ExpiryOutcome.PAID):
        log_event(
            logger,
            "timer.noop",
            "Expiry of order {order_id} by the {actor}: no-op, {reason} ({detail}).",
            order_id=str(order_id),
            by=by,
            reason=outcome.value,
            detail=detail,
        )
    return outcome


def _expire_if_due(order: AbstractOrder, *, by: Actor, now: datetime) -> tuple[ExpiryOutcome, str]:
    """Under the row lock: expire the order, or say why not."""
    if not can_proceed(order.expire):
        return ExpiryOutcome.NOT_UNPAID, f"it is {order.status}"
    if order.expires_at > now:
        if not scheduling.arm_expiry_timer(order, now=now):
            return ExpiryOutcome.WAITING, f"new deadline {order.expires_at.isoformat()}"
        order.save(update_fields=["timer_armed_for", "updated_at"])
        return ExpiryOutcome.REARMED, f"new deadline {order.expires_at.isoformat()}"
    if order.is_held:
        return ExpiryOutcome.ASK, "asked with the row unlocked"
    _expire(order, now=now, by=by)
    return ExpiryOutcome.EXPIRED, ""


def _expire(
    order: AbstractOrder, *, now: datetime, by: Actor, reason: str = EXPIRED_REASON
) -> None:
    order.expire(by=by, reason=reason, at=now)
    order.save()
    _expired(order, now=now, by=by, reason=reason)


def _expired(order: AbstractOrder, *, now: datetime, by: Actor, reason: str) -> None:
    """What follows an expiry, once saved: the log (the event is its history row)."""
    log_event(
        logger,
        "order.expired",
        "Order {order_id} expired by the {actor}, {lateness_s:.3f}s after its deadline.",
        order=order,
        by=by,
        reason=reason,
        expires_at=order.expires_at.isoformat(),
        lateness_s=(now - order.expires_at).total_seconds(),
    )


def expire_due_orders(
    *,
    due_by: datetime,
    by: Actor,
    now: datetime | None = None,
    due_after: datetime | None = None,
    ask_held: bool = True,
) -> tuple[int, float]:
    """Expire every unpaid order whose deadline is at or before ``due_by`` (and has passed),
    and after ``due_after`` if given (a timer bucket's own orders), in batches of
    ``EXPIRY_BATCH_SIZE``, each batch one transaction over rows locked with
    ``skip_locked`` (a row another process holds is being paid or expired by it).
    Returns how many expired and the greatest lateness in seconds.

    The state machine says which rows may expire and what expiring writes (the ``expire``
    transition's sources and target, ``AbstractOrder.expiry_fields``); the rows are
    written set-wise (``_expire_batch``), with their history rows (the events). An order
    a payment attempt holds is not among them: the provider is asked about it first,
    unless not ``ask_held`` (a bucket's helper task leaves that to the bucket's own)."""
    due = _due_orders(due_by=due_by, due_after=due_after, now=now)
    # An order a payment attempt holds is asked about, one by one, after the batches.
    # (Its mark is on its own row: a batch that locks a row marked meanwhile sees it.)
    expired, max_lateness = _expire_in_batches(due.exclude(HELD), by=by, now=now)
    if not ask_held:
        return expired, max_lateness
    for order_id in due.filter(HELD).values_list("pk", flat=True)[
        : get_settings().SWEEP_BATCH_SIZE
    ]:
        if expire_order(order_id=order_id, by=by, now=now) is ExpiryOutcome.EXPIRED:
            expired += 1
    return expired, max_lateness


def _due_orders(
    *, due_by: datetime, due_after: datetime | None, now: datetime | None
) -> QuerySet[AbstractOrder]:
    """Unpaid orders whose deadline is in (``due_after``, ``due_by``] and has passed."""
    due = _unpaid_due_in(after=due_after, by=min(due_by, now or timezone.now()))
    return due.order_by("expires_at")


def _unpaid_due_in(*, after: datetime | None, by: datetime) -> QuerySet[AbstractOrder]:
    """Unpaid orders whose deadline is in (``after``, ``by``]."""
    unpaid = get_order_model().objects.filter(status=Status.CREATED, expires_at__lte=by)
    return unpaid if after is None else unpaid.filter(expires_at__gt=after)


def _expire_in_batches(
    due: QuerySet[AbstractOrder], *, by: Actor, now: datetime | None
) -> tuple[int, float]:
    """Expire ``due`` orders in bulk, batch after batch, each in its own transaction
    (``_expire_batch``). No model instance, signal or log line per order: a burst of
    thousands of orders sharing a deadline is what this is for. One log line per batch;
    each order at DEBUG."""
    model = get_order_model()
    sources, target = _expiry_transition(model)
    due = due.filter(status__in=sources)
    expired, max_lateness = 0, 0.0
    while True:
        with transaction.atomic():
            stamp = now or timezone.now()  # each batch when it is written, not when we began
            batch = _expire_batch(due, target=target, by=str(by), at=stamp)
        if not batch:
            return expired, max_lateness
        expired += len(batch)
        lateness = [late for _, late in batch]
        max_lateness = max(max_lateness, *lateness)
        log_event(
            logger,
            "orders.expired",
            "{count} orders expired by the {actor}, {min_lateness_s:.3f}s to "
            "{max_lateness_s:.3f}s after their deadlines.",
            by=by,
            count=len(batch),
            order_ids=[str(order_id) for order_id, _ in batch],
            min_lateness_s=min(lateness),
            max_lateness_s=max(lateness),
        )
        if logger.isEnabledFor(logging.DEBUG):
            for order_id, late in batch:
                log_event(
                    logger,
                    "order.expired",
                    "Order {order_id} expired by the {actor}, {lateness_s:.3f}s after its "
                    "deadline.",
                    level=logging.DEBUG,
                    order_id=str(order_id),
                    by=by,
                    expires_at=(stamp - timedelta(seconds=late)).isoformat(),
                    lateness_s=late,
                )


@cache
def _expiry_transition(model: type[AbstractOrder]) -> tuple[tuple[str, ...], str]:
    """The statuses ``expire`` leads from and the one it leads to, as the state machine
    says (django-fsm's public ``get_all_<field>_transitions``): the bulk expiry moves
    exactly the rows the transition would."""
    transitions = [t for t in model().get_all_status_transitions() if t.name == "expire"]  # type: ignore[attr-defined]
    targets = {t.target for t in transitions}
    if len(targets) != 1 or any(t.conditions for t in transitions):
        raise ImproperlyConfigured(
            f"{model._meta.label}.expire must lead to one status and have no conditions: "
            "orders are expired in bulk."
        )
    return tuple(str(t.source) for t in transitions), str(targets.pop())


def _expire_batch(
    due: QuerySet[AbstractOrder], *, target: str, by: str, at: datetime
) -> list[tuple[Any, float]]:
    """One batch, in the caller's transaction: up to ``EXPIRY_BATCH_SIZE`` due rows locked
    (``skip_locked``: a row another process holds is being paid or expired by it), moved
    to ``target`` with what ``expire`` writes (``AbstractOrder.expiry_fields``), and their
    history rows (the events) written. Returns each order's id and lateness (seconds from
    its deadline to ``at``).

    On PostgreSQL that is one statement (the lock, the UPDATE and the history's INSERT);
    elsewhere three (SELECT, UPDATE, INSERT)."""
    model = get_order_model()
    locked = due.select_for_update(skip_locked=True).values_list("pk", "expires_at", "status")[
        : get_settings().EXPIRY_BATCH_SIZE
    ]
    changes = {"status": target, "updated_at": at, **model.expiry_fields(at)}
    if connection.vendor == "postgresql":
        return _expire_batch_in_one_statement(locked, changes, by=by, at=at)
    rows = list(locked)
    if not rows:
        return []
    model.objects.filter(pk__in=[order_id for order_id, *_ in rows]).update(**changes)
    events.record_in_bulk(
        [(order_id, source) for order_id, _, source in rows],
        transition="expire",
        target=target,
        by=by,
        reason=EXPIRED_REASON,
        at=at,
    )
    return [(order_id, (at - deadline).total_seconds()) for order_id, deadline, _ in rows]


def _expire_batch_in_one_statement(
    locked: QuerySet[Any, Any], changes: dict[str, Any], *, by: str, at: datetime
) -> list[tuple[Any, float]]:
    """PostgreSQL: lock, update and write the history of a batch in one statement (data-
    modifying CTEs), no row passing through Python but the ids and latenesses it returns
    (computed by the database: loading a timestamp per row costs Python more than the
    row's UPDATE)."""
    model = get_order_model()
    qn = connection.ops.quote_name
    fields = {name: concrete_field(model, name) for name in [*changes, "pk", "expires_at"]}
    select_sql, select_params = locked.query.sql_with_params()
    heard = events.audience(event_type_of("expire"), model)
    debt = events.owed(heard, at)
    pk, expires_at = qn(fields["pk"].column), qn(fields["expires_at"].column)
    sets = ", ".join(f"{qn(fields[name].column)} = %s" for name in changes)
    sql = f"""
        WITH due ({pk}, {expires_at}, source) AS ({select_sql}),
        expired AS (
            UPDATE {qn(model._meta.db_table)} AS o SET {sets}
            FROM due WHERE o.{pk} = due.{pk}
            RETURNING o.{pk}, due.{expires_at}, due.source
        ),
        written AS (
            INSERT INTO {events.bulk_history_table()}
            SELECT gen_random_uuid(), %s, {pk}, %s, source, %s, %s, %s, %s, %s::jsonb, %s
            FROM expired
        )
        SELECT {pk}, EXTRACT(EPOCH FROM %s::timestamptz - {expires_at})::float8 FROM expired
    """
    params = [
        *select_params,
        *(fields[name].get_db_prep_save(value, connection) for name, value in changes.items()),
        event_type_of("expire"),
        "expire",
        changes["status"],
        by,
        EXPIRED_REASON,
        at,
        json.dumps(debt["owed_to"]),
        debt["next_dispatch_at"],
        at,
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows: list[tuple[Any, float]] = cursor.fetchall()
    if heard and rows:
        events.announce([order_id for order_id, _ in rows])
    return rows


def expire_bucket(*, bucket: int, now: datetime | None = None, share: bool = True) -> int:
    """The batched timer of one bucket (its end, ms since the epoch): expire the unpaid
    orders whose deadlines fall in the bucket and have passed, under the same lock and
    re-check. Orders due earlier are their own buckets' or, if those were lost, the
    sweep's: a bucket's task is not a sweep. A bucket fires at its earliest deadline
    (``scheduling.publish_bucket_timer``); if it holds later ones, it is added again, due
    at its end.

    A bucket of more than one batch (a sale's orders sharing a deadline) is ``share``d
    first: up to ``EXPIRY_HELPERS`` more tasks of it, which do not share again, take its
    batches side by side with this one (and leave its held orders to it)."""
    start, end = _bucket_window(bucket)
    # What is due by now is this task's; what is due later, the bucket's next firing,
    # added first: neither a long run here (a sale's batches, a provider asked about a
    # held order) nor a crash delays the later deadlines.
    cutoff = min(end, now or timezone.now())
    if share and cutoff < end and _unpaid_due_in(after=max(start, cutoff), by=end).exists():
        scheduling.fire_bucket_again(bucket)
    if share:
        scheduling.share_bucket(
            bucket, _helpers_for(_due_orders(due_by=cutoff, due_after=start, now=now))
        )
    # The held orders are asked about by the bucket's own task alone, not by its helpers.
    expired, lateness = expire_due_orders(
        due_by=cutoff, due_after=start, by=TIMER, now=now, ask_held=share
    )
    log_event(
        logger,
        "timer.bucket_fired",
        "Timer bucket {bucket} expired {expired} orders, up to {lateness_s:.3f}s late.",
        bucket=bucket,
        expired=expired,
        lateness_s=lateness,
    )
    return expired


def _helpers_for(due: QuerySet[AbstractOrder]) -> int:
    """How many more tasks a bucket's orders keep busy: one per batch beyond the first,
    up to ``EXPIRY_HELPERS`` (held orders are not batched); none where the database
    cannot skip locked rows."""
    conf = get_settings()
    if not conf.EXPIRY_HELPERS or not connection.features.has_select_for_update_skip_locked:
        return 0
    batch = conf.EXPIRY_BATCH_SIZE
    rows = due.exclude(HELD)[: batch * (conf.EXPIRY_HELPERS + 1)].count()
    return min(conf.EXPIRY_HELPERS, max(0, rows - 1) // batch)


def _bucket_window(bucket: int) -> tuple[datetime, datetime]:
    """The deadlines a bucket covers: (start, end]. A bucket is given by its end in ms;
    one queued by version 0.3 by its end in whole seconds, a second wide."""
    if bucket > 10**11:
        end = datetime.fromtimestamp(bucket / 1000, tz=UTC)
        return end - timedelta(seconds=get_settings().TIMER_RESOLUTION), end
    end = datetime.fromtimestamp(bucket, tz=UTC)
    return end - timedelta(seconds=1), end


def extend_order(
    *, order_id: Any, seconds: Any, by: Actor, now: datetime | None = None
) -> AbstractOrder:
    """Move an unpaid order's deadline later by ``seconds``."""
    conf = get_settings()
    now = now or timezone.now()
    delta = parse_seconds(seconds, name="seconds", minimum=1, maximum=conf.MAX_TIMEOUT)
    with transaction.atomic():
        order = _locked(order_id)
        if order.status != Status.CREATED:
            raise InvalidTransition(
                f"Only an unpaid order can be extended; this one is {order.status}."
            )
        if order.expires_at <= now:
            raise InvalidTransition("The deadline has already passed; the order is expiring.")
        new_deadline = order.deadline + delta
        if new_deadline - now > timedelta(seconds=conf.MAX_TIMEOUT):
            # A conflict with the order's present deadline, not a malformed request: the
            # same extension of a younger deadline would be fine.
            raise InvalidTransition(
                f"The new deadline would be more than MAX_TIMEOUT ({conf.MAX_TIMEOUT}s) away."
            )
        # The shop's own deadline moves; a payment attempt's hold, if any, stays.
        held_until = order.expires_at if order.original_expires_at is not None else None
        order.expires_at, order.original_expires_at = new_deadline, None
        if held_until is not None:
            order.hold_until(held_until)
        # The old timer, when it fires, sees the later deadline and does nothing.
        scheduling.arm_expiry_timer(order, now=now)
        order.save(update_fields=[*HOLD_FIELDS, "updated_at"])
    log_event(
        logger,
        "order.extended",
        "Order {order_id} extended by {extended_by_s:g}s to {expires_at} by {actor}.",
        order=order,
        by=by,
        extended_by_s=delta.total_seconds(),
        expires_at=new_deadline.isoformat(),
    )
    return order


def cancel_order(
    *,
    order_id: Any,
    by: Actor,
    reason: str | None = "",
    cancel_reason: CancelReason = CancelReason.CUSTOMER,
    now: datetime | None = None,
) -> AbstractOrder:
    """Cancel an unpaid order at the customer's or staff's request."""
    reason = parse_reason(reason)
    with transaction.atomic():
        order = _locked(order_id)
        if not can_proceed(order.cancel):
            raise InvalidTransition(
                f"Only an unpaid order can be cancelled; this one is {order.status}."
            )
        now = now or timezone.now()
        order.cancel(by=by, reason=reason, cancel_reason=cancel_reason, at=now)
        order.save()
        _close_open_attempts(order, now=now, detail=f"the order was cancelled ({cancel_reason})")
    log_event(
        logger,
        "order.cancelled",
        "Order {order_id} cancelled by {actor} ({cancel_reason}).",
        order=order,
        by=by,
        cancel_reason=str(cancel_reason),
    )
    return order


# Reminders ----------------------------------------------------------------------------
# ``order.expiring_soon``, REMIND_BEFORE seconds before the deadline of an unpaid order:
# once per deadline (``reminded_for`` holds the deadline it was sent for, written under
# the row lock with the event), so timers fired twice, overlapping sweeps and a timer
# racing the sweep send one. An extension makes it owed again for the new deadline.


class ReminderOutcome(enum.StrEnum):
    SENT = "sent"
    OFF = "reminders are off"
    MISSING = "missing"
    NOT_UNPAID = "not unpaid"
    ALREADY_SENT = "already sent for this deadline"
    DEADLINE_MOVED = "deadline moved, its own reminder is armed"
    NOT_YET_DUE = "not yet due"
    DEADLINE_PASSED = "deadline passed"


def remind_order(
    *,
    order_id: Any,
    deadline: datetime | None = None,
    by: Actor = TIMER,
    now: datetime | None = None,
) -> ReminderOutcome:
    """Send ``order.expiring_soon`` if, under the row lock, the order is unpaid, its
    reminder time has come and its deadline has not, and no reminder was sent for this
    deadline. ``deadline``: the one the timer was armed for. Anything else is a logged
    no-op, so the timer may fire any number of times."""
    now = now or timezone.now()
    with transaction.atomic():
        try:
            order = _locked(order_id)
        except OrderNotFound:
            outcome, detail = ReminderOutcome.MISSING, "no such order"
        else:
            outcome, detail = _remind_if_due(order, deadline=deadline, by=by, now=now)
    if outcome is not ReminderOutcome.SENT:
        log_event(
            logger,
            "reminder.noop",
            "Reminder of order {order_id} by the {actor}: no-op, {reason} ({detail}).",
            order_id=str(order_id),
            by=by,
            reason=outcome.value,
            detail=detail,
        )
    return outcome


def _remind_if_due(
    order: AbstractOrder, *, deadline: datetime | None, by: Actor, now: datetime
) -> tuple[ReminderOutcome, str]:
    """Under the row lock: send the order's reminder, or say why not."""
    if not get_settings().REMIND_BEFORE:
        return ReminderOutcome.OFF, "ORDERS['REMIND_BEFORE'] is 0"
    remind_at = scheduling.reminder_time(order)
    if order.status != Status.CREATED:
        return ReminderOutcome.NOT_UNPAID, f"it is {order.status}"
    if deadline is not None and deadline != order.expires_at:
        return ReminderOutcome.DEADLINE_MOVED, f"new deadline {order.expires_at.isoformat()}"
    if remind_at is None:
        return ReminderOutcome.ALREADY_SENT, f"deadline {order.expires_at.isoformat()}"
    if now < remind_at:
        if deadline is not None:  # this deadline's own timer, a moment early: once more
            scheduling.arm_reminder_timer(str(order.pk), order.expires_at, remind_at)
        return ReminderOutcome.NOT_YET_DUE, f"due at {remind_at.isoformat()}"
    if now >= order.expires_at:
        return ReminderOutcome.DEADLINE_PASSED, "its expiry is what is owed"
    order.reminded_for = order.expires_at
    order.save(update_fields=["reminded_for", "updated_at"])
    events.record(order, at=now, **_reminder_row(order, by=by))
    _reminded(order, by=by)
    return ReminderOutcome.SENT, ""


def _reminder_row(order: AbstractOrder, *, by: Actor) -> dict[str, Any]:
    """The history row of a reminder (its event): the deadline it reminds of is in the
    reason, since an extension writes no row of its own."""
    return {
        "transition": REMIND,
        "source": order.status,
        "target": order.status,
        "by": by,
        "reason": f"{REMINDER_REASON}{order.expires_at.isoformat()}",
    }


#: A reminder's reason, followed by the deadline in ISO 8601.
REMINDER_REASON = "payment due by "


def _reminded(order: AbstractOrder, *, by: Actor) -> None:
    log_event(
        logger,
        "order.reminded",
        "Order {order_id} reminded by the {actor}: payment due by {expires_at}.",
        order=order,
        by=by,
        expires_at=order.expires_at.isoformat(),
    )


def remind_due_orders(*, due_by: datetime, by: Actor, now: datetime | None = None) -> int:
    """Send the reminder of every unpaid order whose reminder time is at or before
    ``due_by`` (and has come), whose deadline has not passed and that was not reminded
    for it, in batches of ``SWEEP_BATCH_SIZE`` as ``expire_due_orders`` does (locked with
    ``skip_locked``, re-checked by the query under the lock). Returns how many were sent.
    With ``REMIND_BEFORE`` 0 it asks the database nothing."""
    before = get_settings().REMIND_BEFORE
    if not before:
        return 0
    heard = events.audience(event_type_of(REMIND))  # asked once for all the batches
    sent = 0
    while True:
        with transaction.atomic():
            stamp = now or timezone.now()  # each batch when it is written
            due = (
                get_order_model()
                .objects.filter(
                    status=Status.CREATED,
                    expires_at__lte=min(due_by, stamp) + timedelta(seconds=before),
                    expires_at__gt=stamp,
                )
                .exclude(reminded_for=F("expires_at"))
                .exclude(HELD)  # not while a payment is on its way
                .order_by("expires_at")
            )
            batch = _lock_batch(due, get_settings().SWEEP_BATCH_SIZE)
            if not batch:
                return sent
            get_order_model().objects.filter(pk__in=[order.pk for order in batch]).update(
                reminded_for=F("expires_at"), updated_at=stamp
            )
            # One INSERT and one dispatch task for the batch.
            rows = [
                events.history_row(
                    order, at=stamp, listeners=lambda kind: heard, **_reminder_row(order, by=by)
                )
                for order in batch
            ]
            OrderTransition.objects.bulk_create(rows)
            if heard:
                events.announce([order.pk for order in batch])
            for order in batch:
                _reminded(order, by=by)
        sent += len(batch)


def remind_bucket(*, bucket: int, now: datetime | None = None) -> int:
    """The batched reminder timer of one bucket: remind every order whose reminder is due
    by the bucket's end (and any earlier straggler)."""
    reminded = remind_due_orders(due_by=_bucket_window(bucket)[1], by=TIMER, now=now)
    log_event(
        logger,
        "timer.reminder_bucket_fired",
        "Reminder bucket {bucket} reminded {reminded} orders.",
        bucket=bucket,
        reminded=reminded,
    )
    return reminded


# Shipping -----------------------------------------------------------------------------


def _enqueue_shipping(order: AbstractOrder) -> None:
    from orders.tasks import ship_order_task

    if logistics_provider() is None:
        return  # the shop ships it: ship_order(tracking_number=...)
    scheduling.enqueue_on_commit(ship_order_task, str(order.pk), what="shipping")


def parse_tracking_number(value: Any) -> str:
    # Like a payment reference: no control characters, at most the column's length.
    if not isinstance(value, str) or not _TRACKING_NUMBER.fullmatch(value):
        raise InvalidInput(
            f"tracking_number must be 1 to {TRACKING_NUMBER_MAX_LENGTH} characters, without "
            "control characters."
        )
    return value


def ship_order(
    *,
    order_id: Any,
    tracking_number: str | None = None,
    by: Actor = "shipping",
    now: datetime | None = None,
) -> AbstractOrder:
    """Move a paid order to ``delivered``: shipped under ``tracking_number`` when the shop
    booked the shipment itself (required without a logistics provider), else booked
    with the provider.

    The provider is called outside the lock, with the order as idempotency key, so a
    repeated call books nothing new. Shipping an order again under the tracking number
    it was shipped with changes nothing; under another one it is an InvalidTransition."""
    if tracking_number is not None:
        tracking_number = parse_tracking_number(tracking_number)
    order = _get(order_id)
    if not can_proceed(order.ship):
        return _not_shippable(order, tracking_number)
    booked_by_provider = tracking_number is None
    if tracking_number is None:
        tracking_number = _book_shipment(order)
    with transaction.atomic():
        order = _locked(order_id)
        if not can_proceed(order.ship):  # it moved on while the provider answered
            return _not_shippable(order, None if booked_by_provider else tracking_number)
        now = now or timezone.now()
        order.ship(by=by, tracking_number=tracking_number, at=now)
        if booked_by_provider:
            # The provider that booked the parcel is asked about it; a number the shop
            # brought is none of its business.
            check_in = timedelta(seconds=get_settings().PARCEL_CHECK_INTERVAL)
            order.parcel_next_check_at = now + check_in
        order.save()
    log_event(
        logger,
        "order.shipped",
        "Order {order_id} shipped, tracking number {tracking_number}.",
        order=order,
        tracking_number=tracking_number,
        by=by,
    )
    return order


def _book_shipment(order: AbstractOrder) -> str:
    provider = logistics_provider()
    if provider is None:
        raise InvalidInput(
            "Give the tracking_number of the shipment: no logistics provider books one "
            "(ORDERS['LOGISTICS_PROVIDER'] is None)."
        )
    return provider.create_shipment(order_id=str(order.pk), idempotency_key=f"ship:{order.pk}")


def _not_shippable(order: AbstractOrder, tracking_number: str | None) -> AbstractOrder:
    """A shipment of an order that cannot be shipped: a no-op for the provider's task and
    for the shop's repeated call, an error for the shop's call on any other order."""
    if tracking_number is not None and tracking_number != order.tracking_number:
        raise InvalidTransition(
            f"Only a paid order can be shipped; order {order.pk} is {order.status}"
            + (f", shipped as {order.tracking_number}." if order.tracking_number else ".")
        )
    _shipping_noop(order)
    return order


def _shipping_noop(order: AbstractOrder) -> None:
    log_event(
        logger,
        "shipping.noop",
        "Shipping of order {order_id}: no-op, it is {status}.",
        order=order,
        status=str(order.status),
    )


# Refunds ------------------------------------------------------------------------------


def _refund_at_gateway(payment: Payment) -> str:
    # The payment's reference is the idempotency key: however often this runs, for
    # whatever reason, the gateway refunds the payment once.
    return payment_gateway().refund(
        payment_ref=payment.reference,
        amount=payment.amount,
        currency=payment.currency,
        idempotency_key=f"refund:{payment.reference}",
    )


def refund_order(
    *, order_id: Any, by: Actor, reason: str, now: datetime | None = None
) -> AbstractOrder:
    """Refund a paid or delivered order, then close it. The state moves only after the
    gateway confirms; a ``GatewayError`` leaves the order as it was."""
    order = _get(order_id)
    if not can_proceed(order.refund):
        raise InvalidTransition(
            f"Only a paid or delivered order can be refunded; this one is {order.status}."
        )
    reason = parse_reason(reason, required=True)
    payment = order.payments.filter(outcome=Payment.Outcome.ACCEPTED).first()
    if payment is None:
        raise InvalidTransition(f"Order {order.pk} has no accepted payment to refund.")
    refund_ref = _refund_at_gateway(payment)
    now = now or timezone.now()
    with transaction.atomic():
        order = _locked(order_id)
        if not can_proceed(order.refund):  # a twin refund was quicker
            log_event(
                logger,
                "refund.noop",
                "Refund of order {order_id}: no-op, it is already {status}.",
                order=order,
                status=str(order.status),
            )
            return order
        order.refund(by=by, reason=reason, refund_ref=refund_ref, at=now)
        order.save()
        Payment.objects.filter(pk=payment.pk).update(refunded_at=now, refund_ref=refund_ref)
        # A refunded order closes by itself, in the same transaction.
        order.close(by=SYSTEM, reason="closed after refund", at=now)
        order.save()
    log_event(
        logger,
        "order.refunded",
        "Order {order_id} refunded ({refund_ref}) by {actor}: {reason}.",
        order=order,
        refund_ref=refund_ref,
        by=by,
        reason=reason,
    )
    return order


def _enqueue_payment_refund(payment: Payment) -> None:
    from orders.tasks import refund_payment_task

    scheduling.enqueue_on_commit(refund_payment_task, str(payment.pk), what="refund")


def refund_payment(*, payment_id: Any, now: datetime | None = None) -> Payment:
    """Refund a payment that did not pay its order (late, surplus or mismatched), once."""
    payment = Payment.objects.get(pk=payment_id)
    if not payment.needs_refund:
        log_event(
            logger,
            "payment.refund_noop",
            "Refund of payment {payment_ref}: no-op ({outcome}).",
            order_id=str(payment.order_id),
            payment_ref=payment.reference,
            outcome=payment.outcome,
        )
        return payment
    refund_ref = _refund_at_gateway(payment)
    with transaction.atomic():
        # The order first, as every other step locks it: its status in the history row
        # is the one it has when the refund is recorded.
        order = _locked(payment.order_id)
        payment = Payment.objects.select_for_update().get(pk=payment_id)
        if payment.refunded_at is not None:
            return payment
        payment.refunded_at, payment.refund_ref = now or timezone.now(), refund_ref
        payment.save(update_fields=["refunded_at", "refund_ref"])
        events.record(
            order,
            transition=REFUND_PAYMENT,
            source=order.status,
            target=order.status,
            by=SYSTEM,
            reason=f"payment {payment.reference} ({payment.outcome}) refunded",
            at=payment.refunded_at,
            payment=payment,
        )
    log_event(
        logger,
        "payment.refunded",
        "Payment {payment_ref} ({outcome}) of order {order_id} refunded: {refund_ref}.",
        order_id=str(payment.order_id),
        payment_ref=payment.reference,
        outcome=payment.outcome,
        refund_ref=refund_ref,
    )
    return payment


# Logistics ----------------------------------------------------------------------------


#: Once a parcel is delivered or back with the sender its journey is over: a late or
#: replayed report of an earlier status changes nothing.
TERMINAL_PARCEL_STATUSES = (ParcelStatus.DELIVERED, ParcelStatus.RETURNED)


def record_parcel_status(
    *,
    order_id: Any,
    tracking_number: str,
    status: str,
    by: Actor = "logistics",
    now: datetime | None = None,
) -> AbstractOrder:
    """Take a parcel status from the logistics provider (webhook or poll). Only an order
    shipped under ``tracking_number`` has a parcel; for any other the report is refused
    (``InvalidTransition``) and nothing is stored. A change is kept as a ``ParcelEvent``,
    none after a terminal status, and a returned parcel refunds the order, once."""
    if status not in ParcelStatus.values:
        raise InvalidInput(
            f"status must be one of {', '.join(ParcelStatus.values)}, got {brief(status)}."
        )
    now = now or timezone.now()
    with transaction.atomic():
        order = _locked(order_id)
        if not order.tracking_number:
            raise InvalidTransition(
                f"Order {order.pk} was never shipped (it is {order.status}), so it has no "
                "parcel to report on."
            )
        if tracking_number != order.tracking_number:
            raise InvalidTransition(
                f"Tracking number {brief(tracking_number)} is not the parcel of order {order.pk}."
            )
        if order.parcel_status in TERMINAL_PARCEL_STATUSES:
            if status != order.parcel_status:
                log_event(
                    logger,
                    "parcel.ignored",
                    "Parcel of order {order_id} reported {parcel_status} by {actor} after it "
                    "was {final_status}; ignored.",
                    order=order,
                    parcel_status=status,
                    final_status=order.parcel_status,
                    by=by,
                )
            if order.parcel_next_check_at is not None:  # left by a poll whose refund failed
                order.parcel_next_check_at = None
                order.save(update_fields=["parcel_next_check_at", "updated_at"])
        elif status != order.parcel_status:
            ParcelEvent.objects.create(order_id=order.pk, status=status, source=str(by), at=now)
            order.parcel_status = status
            if status != ParcelStatus.IN_TRANSIT:
                order.parcel_next_check_at = None  # the parcel's journey is over
            order.save(update_fields=["parcel_status", "parcel_next_check_at", "updated_at"])
            log_event(
                logger,
                "parcel.status",
                "Parcel of order {order_id} is now {parcel_status} (reported by {actor}).",
                order=order,
                parcel_status=status,
                by=by,
            )
    # Whatever this report says: a parcel that came back earlier and whose refund failed
    # then (gateway down) is still owed its refund.
    if order.parcel_status == ParcelStatus.RETURNED and can_proceed(order.refund):
        try:
            return refund_order(order_id=order.pk, by=by, reason="parcel returned to sender")
        except InvalidTransition:
            order = _get(order.pk)
            if order.cancel_reason != CancelReason.REFUND:
                raise
            # A twin report refunded it a moment ago: that refund was the one.
    return order


@dataclass
class ParcelPollReport:
    checked: int = 0
    changed: int = 0
    failed: int = 0
    given_up: int = 0


def poll_parcels(*, now: datetime | None = None) -> ParcelPollReport:
    """Ask the logistics provider about shipped parcels that are due for a check, at most
    ``PARCEL_POLL_BATCH`` per run. A provider error backs that order off exponentially;
    a parcel still travelling after ``PARCEL_GIVE_UP_AFTER`` is no longer booked_by_provider."""
    conf = get_settings()
    now = now or timezone.now()
    report = ParcelPollReport()
    provider = logistics_provider()
    if provider is None:
        return report  # the shop ships orders itself: no provider to ask
    due = get_order_model().objects.filter(status=Status.DELIVERED, parcel_next_check_at__lte=now)
    for order in due.order_by("parcel_next_check_at")[: conf.PARCEL_POLL_BATCH]:
        report.checked += 1
        next_check: datetime | None = now + timedelta(seconds=conf.PARCEL_CHECK_INTERVAL)
        failures = 0
        try:
            status = provider.parcel_status(tracking_number=order.tracking_number)
        except GatewayError as exc:
            report.failed += 1
            failures = order.parcel_check_failures + 1
            backoff = min(conf.PARCEL_CHECK_INTERVAL * 2**failures, conf.PARCEL_MAX_BACKOFF)
            next_check = now + timedelta(seconds=backoff)
            log_event(
                logger,
                "parcel.check_failed",
                "Parcel check of order {order_id} failed ({error}); next try in {backoff_s}s.",
                level=logging.WARNING,
                order=order,
                error=str(exc),
                backoff_s=backoff,
            )
        if order.delivered_at and now - order.delivered_at > timedelta(
            seconds=conf.PARCEL_GIVE_UP_AFTER
        ):
            report.given_up += 1
            next_check = None
            log_event(
                logger,
                "parcel.given_up",
                "Parcel of order {order_id} still not arrived; no longer booked_by_provider.",
                level=logging.WARNING,
                order=order,
            )
        get_order_model().objects.filter(pk=order.pk).update(
            parcel_next_check_at=next_check, parcel_check_failures=failures
        )
        if not failures:
            report.changed += status != order.parcel_status
            try:
                record_parcel_status(
                    order_id=order.pk,
                    tracking_number=order.tracking_number,
                    status=status,
                    by="logistics poll",
                    now=now,
                )
            except GatewayError as exc:
                # The parcel came back but the refund failed. The order is still shipped:
                # the next poll finds it returned again, and that retries the refund.
                report.failed += 1
                retry_at = now + timedelta(seconds=conf.PARCEL_CHECK_INTERVAL)
                get_order_model().objects.filter(pk=order.pk).update(parcel_next_check_at=retry_at)
                log_event(
                    logger,
                    "parcel.refund_failed",
                    "Refund of order {order_id}, whose parcel came back, failed ({error}); "
                    "retried at the next poll.",
                    level=logging.WARNING,
                    order=order,
                    error=str(exc),
                )
    if report.checked:
        log_event(
            logger,
            "parcel.poll",
            "Parcel poll: {checked} checked, {changed} changed, {failed} failed, "
            "{given_up} given up.",
            **vars(report),
        )
    return report


# The sweep: the backstop behind the timers ----------------------------------------------


@dataclass
class SweepReport:
    expired: int = 0
    max_lateness: float = 0.0
    timers_armed: int = 0
    shipments_retried: int = 0
    refunds_retried: int = 0
    payments_closed: int = 0
    events_requeued: int = 0
    reminders_sent: int = 0
    errors: list[str] = field(default_factory=list)


SWEEP_STEPS = (
    "expire overdue orders",
    "arm timers",
    "retry shipments",
    "retry refunds and payment closes",
    "re-queue late events",
    "send late reminders",
)


def sweep(
    *, now: datetime | None = None, on_step: Callable[[int, str], object] | None = None
) -> SweepReport:
    """Expire unpaid orders whose timer did not (deadline + grace passed), arm timers
    that came within the horizon, retry shipments and refunds that never ran, and forget
    webhook ids and idempotency keys kept long enough.
    Each transaction holds at most ``SWEEP_BATCH_SIZE`` orders; the expiry step goes on
    batch after batch until no overdue order is left. ``on_step(done, name)`` is called
    after each of the ``SWEEP_STEPS`` (for a progress bar)."""
    conf = get_settings()
    now = now or timezone.now()
    report = SweepReport()
    step = on_step or (lambda done, name: None)
    report.expired, report.max_lateness = expire_due_orders(
        due_by=now - timedelta(seconds=conf.SWEEP_GRACE), by=SWEEP, now=now
    )
    step(1, SWEEP_STEPS[0])

    unarmed = (
        get_order_model()
        .objects.filter(
            status=Status.CREATED,
            expires_at__lte=now + timedelta(seconds=conf.TIMER_HORIZON),
        )
        .exclude(timer_armed_for=F("expires_at"))
        .order_by("expires_at")
    )
    with transaction.atomic():
        for order in _lock_batch(unarmed, conf.SWEEP_BATCH_SIZE):
            if scheduling.arm_expiry_timer(order, now=now):
                order.save(update_fields=["timer_armed_for", "updated_at"])
                report.timers_armed += 1
    step(2, SWEEP_STEPS[1])

    # Follow-up work whose task was lost (broker down when it was queued, worker killed).
    stale = now - timedelta(seconds=conf.SHIPPING_RETRY_AFTER)
    unshipped = get_order_model().objects.filter(status=Status.PAID, paid_at__lt=stale)
    if logistics_provider() is None:
        unshipped = unshipped.none()  # paid orders wait for the shop to ship them
    for order_id in unshipped.values_list("pk", flat=True)[: conf.SWEEP_BATCH_SIZE]:
        report.shipments_retried += 1
        _retry(report, "shipment", partial(ship_order, order_id=order_id))
    step(3, SWEEP_STEPS[2])
    unrefunded = Payment.objects.exclude(outcome=Payment.Outcome.ACCEPTED).filter(
        refunded_at__isnull=True, received_at__lt=stale
    )
    for payment_id in unrefunded.values_list("pk", flat=True)[: conf.SWEEP_BATCH_SIZE]:
        report.refunds_retried += 1
        _retry(report, "refund", partial(refund_payment, payment_id=payment_id))
    unclosed = PaymentAttempt.objects.filter(
        outcome__in=PaymentAttempt.CLOSE_AT_PROVIDER,
        closed_at_provider__isnull=True,
        closed_at__lt=stale,
    )
    if not isinstance(payment_gateway(), ClosesPayments):
        unclosed = unclosed.none()
    for attempt_id in unclosed.values_list("pk", flat=True)[: conf.SWEEP_BATCH_SIZE]:
        report.payments_closed += 1
        _retry(report, "payment close", partial(close_payment, attempt_id=attempt_id))
    step(4, SWEEP_STEPS[3])
    # Events whose dispatch task was lost, or whose receiver's retry is due.
    report.events_requeued = events.redispatch_late(now=now)
    step(5, SWEEP_STEPS[4])
    # Reminders whose timer was lost, or that were due before their deadline came within
    # the horizon (REMIND_BEFORE >= TIMER_HORIZON). No column in SweepRun: logged below.
    report.reminders_sent = remind_due_orders(
        due_by=now - timedelta(seconds=conf.SWEEP_GRACE), by=SWEEP, now=now
    )
    step(6, SWEEP_STEPS[5])

    if report.expired:
        log_event(
            logger,
            "sweep.expired_overdue",
            "Sweep expired {expired} overdue orders, up to {max_lateness_s:.1f}s late: their "
            "timers were lost (worker crash, flushed or unreachable Redis). Check the broker "
            "and workers.",
            level=logging.WARNING,
            expired=report.expired,
            max_lateness_s=report.max_lateness,
        )
    SweepRun.objects.create(
        at=now,
        expired=report.expired,
        max_lateness=report.max_lateness,
        timers_armed=report.timers_armed,
        shipments_retried=report.shipments_retried,
        refunds_retried=report.refunds_retried,
        events_requeued=report.events_requeued,
        errors=len(report.errors),
    )
    SweepRun.objects.filter(at__lt=now - timedelta(days=7)).delete()
    # Webhook ids and idempotency keys whose time is up (orders.idempotency), and
    # delivery records past EVENT_RETENTION (the history stays).
    IdempotencyRecord.objects.filter(expires_at__lt=now).delete()
    events.prune(now=now)
    log_event(
        logger,
        "sweep.done",
        "Sweep done: {expired} expired (up to {max_lateness_s:.1f}s late), {timers_armed} "
        "timers armed, {shipments_retried} shipments and {refunds_retried} refunds retried, "
        "{payments_closed} payments closed at the provider, {events_requeued} orders' events "
        "re-queued, {reminders_sent} late reminders sent, "
        "{errors} errors.",
        expired=report.expired,
        max_lateness_s=report.max_lateness,
        timers_armed=report.timers_armed,
        shipments_retried=report.shipments_retried,
        refunds_retried=report.refunds_retried,
        payments_closed=report.payments_closed,
        events_requeued=report.events_requeued,
        reminders_sent=report.reminders_sent,
        errors=len(report.errors),
    )
    return report


def rearm_timers(*, now: datetime | None = None) -> Iterator[tuple[int, int]]:
    """Arm again the timer of every unpaid order within the horizon, for when the broker
    lost them (Redis flushed, failed over without persistence). Yields (done, total) after
    each batch. Safe to repeat and to run beside workers: a timer too many is a no-op."""
    conf = get_settings()
    now = now or timezone.now()
    unpaid = (
        get_order_model()
        .objects.filter(
            status=Status.CREATED, expires_at__lte=now + timedelta(seconds=conf.TIMER_HORIZON)
        )
        .order_by("expires_at", "pk")
    )
    if conf.TIMER_MODE == "batched":
        yield from _rearm_buckets(unpaid, now=now)
        return
    total, done = unpaid.count(), 0
    after: Q = Q()
    while True:
        with transaction.atomic():
            batch = list(unpaid.filter(after).select_for_update()[: conf.SWEEP_BATCH_SIZE])
            for order in batch:
                scheduling.arm_expiry_timer(order, now=now, rearm=True)
                order.save(update_fields=["timer_armed_for", "updated_at"])
        if not batch:
            return
        done += len(batch)
        last = batch[-1]
        after = Q(expires_at__gt=last.expires_at) | Q(expires_at=last.expires_at, pk__gt=last.pk)
        yield done, max(total, done)


def _rearm_buckets(unpaid: QuerySet[AbstractOrder], *, now: datetime) -> Iterator[tuple[int, int]]:
    """Batched mode: add each bucket of the orders' deadlines (and of their reminders) to
    the timers' sorted set, reading only the distinct deadlines, 10,000 buckets per ZADD;
    then mark the orders armed, one UPDATE per range of 10,000 distinct deadlines (an
    index range, never a row twice). A broker error stops the run before anything is
    marked (the sweep still expires every order, late)."""
    unpaid = unpaid.order_by()
    total = unpaid.count()
    deadlines = sorted(
        unpaid.values_list("expires_at", flat=True).distinct().iterator(chunk_size=10_000)
    )
    # Each bucket due at the earliest deadline in it, as arming one order at a time does.
    buckets: dict[int, int] = {}
    for deadline in deadlines:
        buckets.setdefault(scheduling.bucket_of(deadline), scheduling.ms_after(deadline))
    reminders: set[int] = set()
    before = get_settings().REMIND_BEFORE
    if before:  # as scheduling.reminder_time: not sent for this deadline, not held
        owed = unpaid.exclude(reminded_for=F("expires_at")).exclude(HELD)
        for deadline in owed.values_list("expires_at", flat=True).distinct().iterator(10_000):
            reminders.add(scheduling.bucket_of(max(deadline - timedelta(seconds=before), now)))
    scheduling.add_buckets(scheduling.EXPIRE, sorted(buckets), due=buckets)
    scheduling.add_buckets(scheduling.REMIND, sorted(reminders))
    # Marked in ranges, each its own short transaction: one UPDATE of a million rows
    # would hold all their locks (and a payment waiting on one) for seconds.
    marked = 0
    for start in range(0, len(deadlines), REARM_CHUNK):
        first, last = deadlines[start], deadlines[min(start + REARM_CHUNK, len(deadlines)) - 1]
        marked += (
            unpaid.filter(expires_at__gte=first, expires_at__lte=last)
            .exclude(timer_armed_for=F("expires_at"))
            .update(timer_armed_for=F("expires_at"))
        )
        yield marked, max(total, marked)
    log_event(
        logger,
        "timers.rearmed",
        "Re-armed {buckets} timer buckets ({reminders} of reminders) for {orders} unpaid orders.",
        buckets=len(buckets),
        reminders=len(reminders),
        orders=total,
    )
    yield total, total


#: Distinct deadlines whose orders are marked armed per UPDATE by a batched re-arm.
REARM_CHUNK = 10_000


def _lock_batch(queryset: QuerySet[AbstractOrder], size: int) -> list[AbstractOrder]:
    # skip_locked: a row another process holds is being handled by it; take the next.
    return list(queryset.select_for_update(skip_locked=True)[:size])


def _retry(report: SweepReport, what: str, action: Callable[[], object]) -> None:
    try:
        action()
    except Exception as exc:
        log_event(
            logger,
            "sweep.retry_failed",
            "Sweep could not retry a {what}.",
            level=logging.ERROR,
            exc_info=True,
            what=what,
        )
        report.errors.append(f"{what}: {exc}")
