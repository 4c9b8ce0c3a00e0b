"""Helpers of the fault and randomized tests (tests/test_reliability.py,
tests/test_concurrency.py): workers that are always stopped, waiting on the database,
and the invariants every order must satisfy at the end, whatever happened to it."""

from __future__ import annotations

import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta

from django.db.models import QuerySet

from orders.conf import get_settings
from orders.models import (
    PAYMENT_FAILED,
    PAYMENT_PENDING,
    PLACE,
    REFUND_PAYMENT,
    REMIND,
    AbstractOrder,
    CancelReason,
    EventDelivery,
    OrderTransition,
    Payment,
    PaymentAttempt,
    Status,
)
from orders.services import REMINDER_REASON
from tests.conftest import WorkerProcess

#: The lines of a history that are no transitions of the state machine: placing the
#: order, refunding a payment that did not pay it, the reminder before the deadline, a
#: payment attempt started or ended unpaid.
NOT_TRANSITIONS = frozenset({PLACE, REFUND_PAYMENT, REMIND, PAYMENT_PENDING, PAYMENT_FAILED})

#: The transitions an order may end with (its history without the lines above);
#: anything else is a violation.
EXPIRED = ("expire",)
KEPT = ("pay", "ship")
REFUNDED_AFTER_SHIPPING = ("pay", "ship", "refund", "close")
REFUNDED_BEFORE_SHIPPING = ("pay", "refund", "close")
FINAL_HISTORIES = {EXPIRED, KEPT, REFUNDED_AFTER_SHIPPING, REFUNDED_BEFORE_SHIPPING}


def key_prefix(what: str) -> str:
    """A Redis key prefix of its own for one test's queues."""
    return f"orders-{what}-{uuid.uuid4().hex[:8]}:"


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> float:
    """Poll ``predicate`` until it is true; return the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - started


@contextmanager
def workers(
    name: str, count: int, env: dict[str, str], concurrency: int = 2
) -> Iterator[list[WorkerProcess]]:
    """``count`` worker processes, stopped (SIGKILL if need be) when the block ends."""
    with ExitStack() as stack:
        started = []
        for i in range(count):
            worker = WorkerProcess(name=f"{name}{i + 1}", env=env, concurrency=concurrency)
            stack.callback(worker.stop)
            started.append(worker.start())
        yield started


def kill(worker: WorkerProcess) -> None:
    """SIGKILL the worker's whole process group: main process and pool children, no
    warm shutdown, nothing acknowledged or given back to the broker."""
    worker.stop(signal.SIGKILL)


def reconnected_or_died(worker: WorkerProcess) -> bool:
    """After a broker outage: has the worker connected again, or exited?"""
    assert worker.proc is not None
    return worker.proc.poll() is not None or worker.log().count("Connected to redis://") >= 2


def restart_if_dead(worker: WorkerProcess) -> str:
    """Start the worker again if it exited, as systemd or Kubernetes would; return the
    reason it died ("" if it did not)."""
    assert worker.proc is not None
    if worker.proc.poll() is None:
        return ""
    code, log = worker.proc.returncode, worker.log()
    crash = next((line for line in log.splitlines() if "Unrecoverable error" in line), "")
    worker.log_path.with_suffix(".crashed.log").write_text(log)  # start() truncates the log
    worker.stop()
    worker.start()
    return crash.split(" CRITICAL ")[-1] or f"exited with {code}"


def transitions(rows: Iterable[OrderTransition]) -> tuple[str, ...]:
    """The state machine's transitions among these history rows, in order."""
    return tuple(row.transition for row in rows if row.transition not in NOT_TRANSITIONS)


def histories(orders: QuerySet[AbstractOrder]) -> dict[str, tuple[str, ...]]:
    """Each order's transitions (see ``transitions``), by order id."""
    return {
        str(order.pk): transitions(order.history.all())
        for order in orders.prefetch_related("history")  # type: ignore[misc]  # reverse relation
    }


def violations(orders: QuerySet[AbstractOrder], *, late_ok: float | None) -> list[str]:
    """Every way an order (or its payments) can be wrong once all has settled.

    - its history starts with its one "place" line;
    - it ends delivered or cancelled, with one of the FINAL_HISTORIES: one entry per
      transition, never both a payment that kept the order and an expiry;
    - an expired order was cancelled after its deadline (and at most ``late_ok``
      seconds after, unless None);
    - a kept order has exactly one accepted payment, received by the deadline, or while
      a payment attempt held the order (which may be past it: the provider, asked, said
      paid, or the webhook came while the order waited for it);
    - every payment that did not pay its order (late, surplus, mismatched) and the
      accepted payment of a refunded order is refunded, and no other;
    - each payment refunded that did not pay its order has one "refund_payment" line in
      the history, naming it, and no other payment has one.
    """
    found: list[str] = []
    for order in orders.prefetch_related("history", "payments", "payment_attempts"):  # type: ignore[misc]  # reverse relation
        rows = list(order.history.all())
        history = transitions(rows)
        attempts = list(order.payment_attempts.all())
        payments = list(order.payments.all())
        accepted = [p for p in payments if p.outcome == Payment.Outcome.ACCEPTED]
        others = [p for p in payments if p.outcome != Payment.Outcome.ACCEPTED]
        where = f"order {order.pk} ({order.status}, history {[r.transition for r in rows]})"
        placed = [row for row in rows if row.transition == PLACE]
        if len(placed) != 1 or rows[0] is not placed[0]:
            found.append(f"{where}: not one 'place' line, first")
        refund_lines = Counter(row.payment_id for row in rows if row.transition == REFUND_PAYMENT)
        refunded_others = Counter(p.pk for p in others if p.refunded_at is not None)
        if refund_lines != refunded_others:
            found.append(
                f"{where}: 'refund_payment' lines name payments {dict(refund_lines)}, "
                f"refunded non-accepted payments are {sorted(refunded_others)}"
            )
        if history not in FINAL_HISTORIES:
            found.append(f"{where}: not a final history")
            continue
        if "pay" in history and "expire" in history:
            found.append(f"{where}: both paid and expired")
        if history == EXPIRED:
            if order.status != Status.CANCELLED or order.cancel_reason != CancelReason.TIMEOUT:
                found.append(f"{where}: expired but not cancelled for timeout")
            assert order.cancelled_at is not None
            lateness = (order.cancelled_at - order.expires_at).total_seconds()
            if lateness < 0 or (late_ok is not None and lateness > late_ok):
                found.append(f"{where}: expired {lateness:.3f}s after its deadline")
            if accepted:
                found.append(f"{where}: expired, yet a payment was accepted")
        else:
            refunded = "refund" in history
            expected = Status.CANCELLED if refunded else Status.DELIVERED
            if order.status != expected:
                found.append(f"{where}: status should be {expected}")
            if len(accepted) != 1:
                found.append(f"{where}: {len(accepted)} accepted payments")
            for payment in accepted:
                if payment.received_at > order.expires_at and not _held_at(
                    attempts, payment.received_at
                ):
                    found.append(f"{where}: payment {payment.reference} accepted after deadline")
                if payment.reference != order.payment_ref:
                    found.append(f"{where}: accepted payment is not the order's payment_ref")
                if refunded != (payment.refunded_at is not None):
                    found.append(f"{where}: accepted payment refunded={not refunded}")
            if "ship" in history and not order.tracking_number:
                found.append(f"{where}: shipped without a tracking number")
        for payment in others:
            if payment.refunded_at is None or not payment.refund_ref:
                found.append(f"{where}: {payment.outcome} payment {payment.reference} not refunded")
            if payment.outcome == Payment.Outcome.LATE and order.status != Status.CANCELLED:
                found.append(f"{where}: payment {payment.reference} late, order not cancelled")
            if payment.outcome == Payment.Outcome.SURPLUS and "pay" not in history:
                found.append(f"{where}: payment {payment.reference} surplus, order never paid")
    return found


def _held_at(attempts: list[PaymentAttempt], moment: datetime) -> bool:
    """Did one of these attempts hold its order at ``moment``? (An attempt that a payment
    ends is closed at that payment's time.)"""
    return any(
        attempt.started_at <= moment and (attempt.closed_at is None or moment <= attempt.closed_at)
        for attempt in attempts
    )


def attempt_violations(
    orders: QuerySet[AbstractOrder],
    *,
    close_calls: dict[str, int],
    paid_answers: dict[str, datetime] | None = None,
) -> list[str]:
    """The promises of payment attempts (``services.start_payment``), once all settled:

    - an order that is no longer unpaid has no attempt left open;
    - an attempt that paid its order is the order's payment (its reference, accepted,
      not refunded, the order never expired);
    - an attempt the provider said was paid (``paid_answers``: attempt reference -> when
      it first said so) before the attempt's cap, while it was still open, paid its
      order with that payment, unless the order was paid otherwise;
    - an attempt closed here while the provider could still take money for it (timed
      out, or closed because the order ended otherwise) was closed at the provider
      exactly once (``close_calls``: attempt reference -> calls), and no other was.
    """
    found: list[str] = []
    for order in orders.prefetch_related("payment_attempts", "payments"):  # type: ignore[misc]  # reverse relation
        attempts = list(order.payment_attempts.all())
        payments = {payment.pk: payment for payment in order.payments.all()}
        where = f"order {order.pk} ({order.status})"
        for attempt in attempts:
            what = f"{where}, attempt {attempt.reference} ({attempt.outcome})"
            if attempt.is_open and order.status != Status.CREATED:
                found.append(f"{what}: left open")
            if attempt.outcome == PaymentAttempt.Outcome.PAID:
                payment = payments.get(attempt.payment_id)  # type: ignore[arg-type]
                if payment is None or payment.outcome != Payment.Outcome.ACCEPTED:
                    found.append(f"{what}: paid, but not by an accepted payment")
                elif payment.reference != order.payment_ref or order.paid_at is None:
                    found.append(
                        f"{what}: paid by {payment.reference}, order's is {order.payment_ref!r}"
                    )
                elif payment.refunded_at is not None and order.refund_ref == "":
                    found.append(f"{what}: its payment {payment.reference} was refunded")
                if order.cancel_reason == CancelReason.TIMEOUT:
                    found.append(f"{what}: paid, yet the order expired")
            said_paid = (paid_answers or {}).get(attempt.reference)
            if (
                said_paid is not None
                and said_paid < attempt.cap_at
                and (attempt.closed_at is None or said_paid <= attempt.closed_at)
                and attempt.outcome != PaymentAttempt.Outcome.PAID
                and not (attempt.outcome == PaymentAttempt.Outcome.CLOSED and order.paid_at)
            ):
                found.append(
                    f"{what}: the provider said paid at {said_paid.isoformat()} (cap "
                    f"{attempt.cap_at.isoformat()}), the attempt ended {attempt.outcome} at "
                    f"{attempt.closed_at.isoformat() if attempt.closed_at else None}"
                )
            owed = attempt.outcome in PaymentAttempt.CLOSE_AT_PROVIDER
            calls = close_calls.get(attempt.reference, 0)
            if calls != (1 if owed else 0):
                found.append(f"{what}: closed at the provider {calls} times")
            if owed and attempt.closed_at_provider is None:
                found.append(f"{what}: not marked closed at the provider")
    return found


def passed_over_by_sweeps(
    orders: QuerySet[AbstractOrder], sweeps: list[tuple[datetime, datetime, int]]
) -> list[str]:
    """The sweep's promise: a sweep that starts when an unpaid order is past its
    deadline plus the grace expires it, unless that sweep hit its batch limit, or the
    order's row was locked by another transaction (``skip_locked``) that expired it or
    took its payment before the sweep was over. ``sweeps`` holds each sweep's ``now``,
    the time it returned, and how many orders it expired."""
    conf = get_settings()
    grace = timedelta(seconds=conf.SWEEP_GRACE)
    found = []
    complete = [(s, e) for s, e, expired in sweeps if expired < conf.EXPIRY_BATCH_SIZE]
    for order in orders.filter(cancel_reason=CancelReason.TIMEOUT):
        assert order.cancelled_at is not None
        overdue = order.expires_at + grace
        missed = [s for s, e in complete if overdue < s and e < order.cancelled_at]
        if missed:
            found.append(
                f"order {order.pk}: overdue from {overdue.isoformat()}, passed over by the "
                f"sweep at {missed[0].isoformat()}, expired at {order.cancelled_at.isoformat()}"
            )
    return found


def outcome_counts(orders: QuerySet[AbstractOrder]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for history in histories(orders).values():
        counts[
            {
                EXPIRED: "expired",
                KEPT: "paid and kept",
                REFUNDED_AFTER_SHIPPING: "refunded after shipping",
                REFUNDED_BEFORE_SHIPPING: "refunded before shipping",
            }.get(history, "other")
        ] += 1
    return counts


def expired_by(orders: QuerySet[AbstractOrder]) -> Counter[str]:
    """Who expired the orders: the expiry timer, the sweep, or a late payment."""
    counts: Counter[str] = Counter()
    for order in orders.prefetch_related("history"):  # type: ignore[misc]  # reverse relation
        for entry in order.history.all():
            if entry.transition == "expire":
                counts[entry.actor] += 1
    return counts


def lateness(orders: QuerySet[AbstractOrder]) -> str:
    """How long after their deadlines the expired orders were cancelled, as text."""
    values = sorted(
        (o.cancelled_at - o.expires_at).total_seconds()
        for o in orders.filter(cancel_reason=CancelReason.TIMEOUT)
        if o.cancelled_at is not None
    )
    if not values:
        return "no expiries"

    def pct(q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))]

    return f"median {pct(0.5):.3f}s, p99 {pct(0.99):.3f}s, max {values[-1]:.3f}s"


def payments_to_refund(orders: Iterable[str] | QuerySet[AbstractOrder]) -> QuerySet[Payment]:
    return Payment.objects.filter(order__in=orders, refunded_at__isnull=True).exclude(
        outcome=Payment.Outcome.ACCEPTED
    )


def unsettled(orders: QuerySet[AbstractOrder]) -> dict[str, int]:
    """What still has to happen: unpaid orders (all deadlines are past by now), paid
    orders not shipped, refunded orders not closed, payments not refunded."""
    counts = {
        "created": orders.filter(status=Status.CREATED).count(),
        "paid": orders.filter(status=Status.PAID).count(),
        "refunded": orders.filter(status=Status.REFUNDED).count(),
        "payments to refund": payments_to_refund(orders).count(),
    }
    return {k: v for k, v in counts.items() if v}


def reminder_violations(orders: QuerySet[AbstractOrder], *, remind_before: float) -> list[str]:
    """The promises of the reminder before the deadline (``ORDERS["REMIND_BEFORE"]``),
    whatever raced (timers fired twice, sweeps, payments, cancellations, extensions):

    - at most one reminder per deadline (the deadline is named in its reason, since an
      extension writes no history row);
    - none earlier than REMIND_BEFORE ahead of its deadline, none at or after it;
    - none once the order was paid, cancelled or expired;
    - an order that expired unpaid was reminded of its last deadline.
    """
    found: list[str] = []
    before = timedelta(seconds=remind_before)
    for order in orders.prefetch_related("history"):  # type: ignore[misc]  # reverse relation
        rows = sorted(order.history.all(), key=lambda row: row.id)
        where = f"order {order.pk} ({order.status}, history {[r.transition for r in rows]})"
        settled = next((r for r in rows if r.transition not in ("place", REMIND)), None)
        reminded: Counter[datetime] = Counter()
        for row in rows:
            if row.transition != REMIND:
                continue
            deadline = datetime.fromisoformat(row.reason.removeprefix(REMINDER_REASON))
            reminded[deadline] += 1
            if not deadline - before <= row.at < deadline:
                found.append(f"{where}: reminded at {row.at.isoformat()} of {deadline.isoformat()}")
            if settled is not None and row.id > settled.id:
                found.append(f"{where}: reminded after its {settled.transition}")
        for deadline, count in reminded.items():
            if count > 1:
                found.append(f"{where}: {count} reminders of {deadline.isoformat()}")
        expired = settled is not None and settled.transition == "expire"
        if expired and not reminded[order.expires_at]:
            found.append(f"{where}: expired without a reminder of {order.expires_at.isoformat()}")
    return found


def event_violations(
    orders: QuerySet[AbstractOrder], *, receivers: tuple[str, ...] = ("gate", "tally")
) -> list[str]:
    """Every event of these orders reached each of the test ``receivers`` (tests/effects,
    connected in every process of the run) exactly once in effect: one committed
    ``Effect`` row per (event, receiver), none owed, none parked. Effects have no unique
    constraint: a receiver's work committed twice, or kept from a failed try, would show
    here."""
    from tests.effects.models import Effect

    found = []
    order_ids = list(orders.values_list("pk", flat=True))
    events = OrderTransition.objects.filter(order_id__in=order_ids)
    for event in events.filter(next_dispatch_at__isnull=False):
        found.append(f"event {event.event_type} {event.event_id}: still owed")
    for delivery in EventDelivery.objects.filter(
        event__order_id__in=order_ids, parked_at__isnull=False
    ):
        found.append(f"{delivery}: parked ({delivery.last_error})")
    effects = Counter(
        Effect.objects.filter(order_id__in=order_ids).values_list("event_id", "receiver")
    )
    expected = {
        (event_id, receiver)
        for event_id in events.values_list("event_id", flat=True)
        for receiver in receivers
    }
    for key in expected:
        if effects[key] != 1:
            found.append(f"event {key[0]}: {effects[key]} effects of {key[1]}")
    for key in set(effects) - expected:
        found.append(f"event {key[0]}: an effect of {key[1]}, but no such event")
    return found
