"""Reads for the people who run the shop: what is about to expire, what went wrong lately,
and whether the timers and the sweep behind them are healthy. No writes here."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from django.db.models import Count, Exists, OuterRef, QuerySet
from django.db.models.functions import TruncHour
from django.utils import timezone

from orders.conf import get_settings
from orders.models import Order, OrderTransition, Payment, Status, SweepRun


def status_counts() -> dict[str, int]:
    """How many orders are in each status, every status present (one query)."""
    counts = dict.fromkeys(Status.values, 0)
    rows = Order.objects.order_by().values_list("status").annotate(n=Count("pk"))
    counts.update({status: n for status, n in rows})
    return counts


def expiring_orders(
    orders: QuerySet[Order] | None = None,
    *,
    within: timedelta = timedelta(hours=1),
    now: datetime | None = None,
) -> QuerySet[Order]:
    """The unpaid orders (among ``orders``, default all) whose deadline comes within
    ``within`` from now, soonest first.

    Those already past their deadline are included: they are still unpaid because their
    timer has not fired yet (or was lost), and the next sweep will expire them."""
    now = now or timezone.now()
    orders = Order.objects.all() if orders is None else orders
    return orders.filter(status=Status.CREATED, expires_at__lte=now + within).order_by("expires_at")


def with_unaccepted_payments(
    orders: QuerySet[Order] | None = None, *, refunded: bool | None = None
) -> QuerySet[Order]:
    """The orders (among ``orders``, default all) that received a payment which did not
    pay them (late, surplus or mismatched), optionally only those whose such payment was
    already refunded (``True``) or still awaits its refund (``False``). Each order once."""
    payments = Payment.objects.filter(order=OuterRef("pk")).exclude(
        outcome=Payment.Outcome.ACCEPTED
    )
    if refunded is not None:
        payments = payments.filter(refunded_at__isnull=not refunded)
    orders = Order.objects.all() if orders is None else orders
    return orders.filter(Exists(payments))


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
    last = SweepRun.objects.order_by("-at").first()
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
            f"The last sweep ran {_ago(age)} ago, more than twice the sweep interval "
            f"({interval} s). Is Celery beat running?"
        )
    if last.errors:
        warnings.append(
            f"{last.errors} of the last sweep's retries failed; the worker's log says why."
        )
    return SweepHealth(last=last, age=age, warnings=warnings)


def _ago(age: timedelta) -> str:
    seconds = int(age.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"
