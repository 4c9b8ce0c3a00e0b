"""Reads for the people who run the shop: what is about to expire, what went wrong lately,
and whether the timers and the sweep behind them are healthy. No writes here."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from django.db.models import (
    Case,
    Count,
    DurationField,
    Exists,
    ExpressionWrapper,
    F,
    Min,
    OuterRef,
    Q,
    QuerySet,
    Sum,
    Value,
    When,
)
from django.db.models.functions import TruncHour
from django.utils import timezone

from orders import get_order_model
from orders.conf import get_settings
from orders.gateways import ClosesPayments, payment_gateway
from orders.models import (
    LATE_PAYMENT_REASON,
    SWEEP,
    TIMER,
    AbstractOrder,
    CancelReason,
    EventDelivery,
    OrderTransition,
    Payment,
    PaymentAttempt,
    Status,
    SweepRun,
    WebhookDelivery,
)


def format_duration(seconds: float) -> str:
    """``"1d 3h"``, ``"2h 5m"``, ``"12m 30s"``, ``"45s"``: as precise as a glance needs
    (the admin's countdown, orders/static/orders/time_left.js, writes the same)."""
    minutes, secs = divmod(int(abs(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def status_counts() -> dict[str, int]:
    """How many orders are in each status, every status present (one query)."""
    counts = dict.fromkeys(Status.values, 0)
    # order_by(): the model's default ordering would otherwise join the GROUP BY.
    rows = get_order_model().objects.order_by().values_list("status").annotate(n=Count("pk"))
    counts.update({status: n for status, n in rows})
    return counts


def last_sweep() -> SweepRun | None:
    """The latest sweep's record: its time says whether beat is alive."""
    return SweepRun.objects.order_by("-at").first()


def expiring_orders(
    orders: QuerySet[AbstractOrder] | None = None,
    *,
    within: timedelta = timedelta(hours=1),
    now: datetime | None = None,
) -> QuerySet[AbstractOrder]:
    """The unpaid orders (among ``orders``, default all) whose deadline comes within
    ``within`` from now, soonest first.

    Those already past their deadline are included: they are still unpaid because their
    timer has not fired yet (or was lost), and the next sweep will expire them."""
    now = now or timezone.now()
    orders = get_order_model().objects.all() if orders is None else orders
    return orders.filter(status=Status.CREATED, expires_at__lte=now + within).order_by("expires_at")


def with_unaccepted_payments(
    orders: QuerySet[AbstractOrder] | None = None,
    *,
    refunded: bool | None = None,
    outcome: Payment.Outcome | None = None,
) -> QuerySet[AbstractOrder]:
    """The orders (among ``orders``, default all) that received a payment which did not
    pay them (late, surplus or mismatched; or only ``outcome``), optionally only those
    whose such payment was already refunded (``True``) or still awaits its refund
    (``False``). Each order once."""
    payments = Payment.objects.filter(order=OuterRef("pk")).exclude(
        outcome=Payment.Outcome.ACCEPTED
    )
    if outcome is not None:
        payments = payments.filter(outcome=outcome)
    if refunded is not None:
        payments = payments.filter(refunded_at__isnull=not refunded)
    orders = get_order_model().objects.all() if orders is None else orders
    return orders.filter(Exists(payments))


def held_orders(orders: QuerySet[AbstractOrder] | None = None) -> QuerySet[AbstractOrder]:
    """The unpaid orders (among ``orders``, default all) that a customer is paying right
    now: an open payment attempt holds them."""
    open_attempts = PaymentAttempt.objects.filter(
        order=OuterRef("pk"), outcome=PaymentAttempt.Outcome.OPEN
    )
    orders = get_order_model().objects.all() if orders is None else orders
    return orders.filter(Exists(open_attempts), status=Status.CREATED)


@dataclass(frozen=True)
class HourlyActivity:
    """One hour of the overview's chart."""

    hour: datetime
    expiries: int
    late_payments: int


def hourly_activity(*, hours: int = 24, now: datetime | None = None) -> list[HourlyActivity]:
    """Expiries (``expire`` transitions) and late payments (payments that arrived after
    their order was cancelled) per hour, for the last ``hours`` hours up to and including
    the current one, oldest first. Two grouped queries, whatever the volume."""
    now = now or timezone.now()
    # Hours counted in UTC, so that a daylight saving change neither skips nor repeats one.
    current = timezone.localtime(now).replace(minute=0, second=0, microsecond=0).astimezone(UTC)
    start = current - timedelta(hours=hours - 1)

    expiries = _per_hour(
        OrderTransition.objects.filter(transition="expire", at__gte=start, at__lte=now), "at"
    )
    late = _per_hour(
        Payment.objects.filter(
            outcome=Payment.Outcome.LATE, received_at__gte=start, received_at__lte=now
        ),
        "received_at",
    )
    buckets = (timezone.localtime(start + timedelta(hours=i)) for i in range(hours))
    return [
        HourlyActivity(hour=hour, expiries=expiries.get(hour, 0), late_payments=late.get(hour, 0))
        for hour in buckets
    ]


def _per_hour(rows: QuerySet[OrderTransition] | QuerySet[Payment], at: str) -> dict[datetime, int]:
    # Truncated in the current time zone, as the buckets above are.
    grouped = rows.order_by().annotate(hour=TruncHour(at)).values("hour").annotate(n=Count("pk"))
    return {row["hour"]: row["n"] for row in grouped}


@dataclass(frozen=True)
class SweepHealth:
    """The last sweep's findings, and what they mean for whoever is on call."""

    last: SweepRun | None
    age: timedelta | None
    warnings: list[str] = field(default_factory=list)


def sweep_is_overdue(age: timedelta) -> bool:
    """Beat runs the sweep every SWEEP_INTERVAL: a last sweep older than two intervals
    means beat (or the worker that runs its sweeps) is down."""
    return age > timedelta(seconds=2 * get_settings().SWEEP_INTERVAL)


def sweep_health(*, now: datetime | None = None) -> SweepHealth:
    """Read the latest ``SweepRun``: timers are being lost when it had to expire orders,
    and beat is probably down when it is older than two sweep intervals."""
    now = now or timezone.now()
    interval = get_settings().SWEEP_INTERVAL
    last = last_sweep()
    if last is None:
        return SweepHealth(
            last=None,
            age=None,
            warnings=["No sweep has run yet. Is Celery beat running?"],
        )
    age = now - last.at
    warnings = []
    if last.expired:
        warnings.append(
            f"The last sweep expired {last.expired} overdue "
            f"order{'s' if last.expired != 1 else ''}, up to {last.max_lateness:.1f} s late: "
            "their timers were lost (worker crash, flushed or unreachable Redis). "
            "Check the broker and the workers."
        )
    if sweep_is_overdue(age):
        warnings.append(
            f"The last sweep ran {format_duration(age.total_seconds())} ago, more than twice the "
            f"sweep interval "
            f"({interval} s). Is Celery beat running?"
        )
    if last.errors:
        warnings.append(
            f"{last.errors} of the last sweep's retries failed; the worker's log says why."
        )
    return SweepHealth(last=last, age=age, warnings=warnings)


# The numbers behind /metrics and orders_status ----------------------------------------


#: Upper bounds (seconds) of the expiry lateness histogram's buckets.
LATENESS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)

#: Who expires orders, as the ``actor`` label of ``orders_expiries_total``.
EXPIRY_ACTORS = ("timer", "sweep", "payment", "other")


@dataclass(frozen=True)
class LatenessHistogram:
    """Cumulative counts of expired orders per bucket (``le`` in seconds), and the sum."""

    buckets: dict[float, int]
    count: int
    sum_seconds: float


@dataclass(frozen=True)
class EventBacklog:
    """What the shop has not heard yet (orders.events)."""

    #: Events that still owe a delivery to some receiver.
    owed: int
    #: Of those, the ones owed for longer than EVENT_GRACE (their retry or their task).
    late: int
    #: Deliveries to a receiver that raised and will be tried again.
    retrying: int
    #: Deliveries that failed EVENT_MAX_ATTEMPTS times: they wait for the admin's retry.
    parked: int
    #: Webhook deliveries that failed and will be tried again, and those given up.
    webhooks_retrying: int
    webhooks_given_up: int


@dataclass(frozen=True)
class Snapshot:
    """What the shop looks like now, from the database: the numbers behind ``/metrics``
    and ``manage.py orders_status``."""

    at: datetime
    by_status: dict[str, int]
    expiries_by_actor: dict[str, int]
    lateness: LatenessHistogram
    timers_pending: int
    overdue: int
    oldest_overdue_deadline: datetime | None
    last_sweep: SweepRun | None
    refunds_pending: int
    refunds_failing: int
    shipments_pending: int
    shipments_stuck: int
    stale_after: timedelta
    events: EventBacklog
    #: Unpaid orders a customer is paying: an open payment attempt holds them.
    held: int
    #: Payment attempts that ended here (timed out, or closed when their order ended
    #: otherwise) and that the provider has not yet been told to close.
    payment_closes_pending: int


def event_backlog(now: datetime | None = None) -> EventBacklog:
    now = now or timezone.now()
    grace = timedelta(seconds=get_settings().EVENT_GRACE)
    owed = OrderTransition.objects.filter(next_dispatch_at__isnull=False).aggregate(
        owed=Count("pk"), late=Count("pk", filter=Q(next_dispatch_at__lt=now - grace))
    )
    deliveries = EventDelivery.objects.filter(delivered_at__isnull=True).aggregate(
        retrying=Count("pk", filter=Q(parked_at__isnull=True)),
        parked=Count("pk", filter=Q(parked_at__isnull=False)),
    )
    webhooks = WebhookDelivery.objects.filter(delivered_at__isnull=True).aggregate(
        retrying=Count("pk", filter=Q(next_attempt_at__isnull=False, attempts__gt=0)),
        given_up=Count("pk", filter=Q(gave_up_at__isnull=False)),
    )
    return EventBacklog(
        owed=owed["owed"],
        late=owed["late"],
        retrying=deliveries["retrying"],
        parked=deliveries["parked"],
        webhooks_retrying=webhooks["retrying"],
        webhooks_given_up=webhooks["given_up"],
    )


def expiries_by_actor() -> dict[str, int]:
    """How many orders each part expired: its own timer (per order or batched), the
    sweep (the timer was lost), or a payment that found the deadline passed."""
    kind = Case(
        When(actor=str(TIMER), then=Value("timer")),
        When(actor=str(SWEEP), then=Value("sweep")),
        When(reason=LATE_PAYMENT_REASON, then=Value("payment")),
        default=Value("other"),
    )
    rows = (
        OrderTransition.objects.filter(transition="expire")
        .order_by()
        .values_list(kind)
        .annotate(n=Count("pk"))
    )
    counts = dict.fromkeys(EXPIRY_ACTORS, 0)
    counts.update({actor: n for actor, n in rows})
    return counts


def expiry_lateness() -> LatenessHistogram:
    """How long after their deadline expired orders were cancelled, as cumulative bucket
    counts computed by the database in one aggregate query."""
    lateness = ExpressionWrapper(F("cancelled_at") - F("expires_at"), output_field=DurationField())
    aggregates: dict[str, Count | Sum] = {
        f"le_{i}": Count(
            "pk", filter=Q(cancelled_at__lte=F("expires_at") + timedelta(seconds=bound))
        )
        for i, bound in enumerate(LATENESS_BUCKETS)
    }
    aggregates["count"] = Count("pk")
    aggregates["total"] = Sum(lateness)
    row = (
        get_order_model()
        .objects.filter(cancel_reason=CancelReason.TIMEOUT, cancelled_at__isnull=False)
        .aggregate(**aggregates)
    )
    total: timedelta | None = row["total"]
    return LatenessHistogram(
        buckets={bound: row[f"le_{i}"] for i, bound in enumerate(LATENESS_BUCKETS)},
        count=row["count"],
        sum_seconds=total.total_seconds() if total is not None else 0.0,
    )


def payment_closes_pending() -> int:
    """Attempts still to be closed at the provider (``close_payment``): the task or the
    sweep will retry them. None with a gateway that cannot close payments: nothing is
    owed to it."""
    if not isinstance(payment_gateway(), ClosesPayments):
        return 0
    return PaymentAttempt.objects.filter(
        outcome__in=PaymentAttempt.CLOSE_AT_PROVIDER, closed_at_provider__isnull=True
    ).count()


def read_snapshot(now: datetime | None = None) -> Snapshot:
    now = now or timezone.now()
    stale_after = timedelta(seconds=get_settings().SHIPPING_RETRY_AFTER)
    stale = now - stale_after
    unpaid = get_order_model().objects.filter(status=Status.CREATED)
    overdue = unpaid.filter(expires_at__lt=now).aggregate(n=Count("pk"), oldest=Min("expires_at"))
    refunds = (
        Payment.objects.exclude(outcome=Payment.Outcome.ACCEPTED)
        .filter(refunded_at__isnull=True)
        .aggregate(pending=Count("pk"), failing=Count("pk", filter=Q(received_at__lt=stale)))
    )
    shipments = (
        get_order_model()
        .objects.filter(status=Status.PAID)
        .aggregate(pending=Count("pk"), stuck=Count("pk", filter=Q(paid_at__lt=stale)))
    )
    return Snapshot(
        at=now,
        by_status=status_counts(),
        expiries_by_actor=expiries_by_actor(),
        lateness=expiry_lateness(),
        timers_pending=unpaid.filter(timer_armed_for=F("expires_at")).count(),
        overdue=overdue["n"],
        oldest_overdue_deadline=overdue["oldest"],
        last_sweep=last_sweep(),
        refunds_pending=refunds["pending"],
        refunds_failing=refunds["failing"],
        shipments_pending=shipments["pending"],
        shipments_stuck=shipments["stuck"],
        stale_after=stale_after,
        events=event_backlog(now),
        held=held_orders().count(),
        payment_closes_pending=payment_closes_pending(),
    )
