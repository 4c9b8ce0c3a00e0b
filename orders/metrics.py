"""Prometheus metrics at ``/metrics``, read from the database at scrape time (and the
timers' sorted set in Redis, for the wakers' lag).

The workers are prefork processes that come and go, so counters kept in a process's
memory would be partial and reset on every restart; the database is the truth. Each
scrape runs a handful of aggregate queries (no rows are loaded), so scraping every
15-60 s costs the database next to nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime

from django.http import HttpRequest, HttpResponse
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from orders import scheduling
from orders.http import json_endpoint, require_operator
from orders.selectors import read_snapshot

# The Prometheus collector --------------------------------------------------------------


#: What the last sweep found, each as a gauge: (metric, SweepRun field, help).
SWEEP_GAUGES = (
    (
        "orders_sweep_last_expired",
        "expired",
        "Orders the last sweep had to expire because their timer was lost.",
    ),
    (
        "orders_sweep_last_max_lateness_seconds",
        "max_lateness",
        "How late past its deadline the latest order the last sweep expired was.",
    ),
    (
        "orders_sweep_last_timers_armed",
        "timers_armed",
        "Timers the last sweep armed (deadlines that came within the horizon).",
    ),
    ("orders_sweep_last_errors", "errors", "Shipments or refunds the last sweep failed to retry."),
)


def _epoch(moment: datetime | None) -> float:
    return moment.timestamp() if moment is not None else 0.0


def _waker_lag() -> float:
    try:
        return scheduling.waker_lag()
    except scheduling.BROKER_ERRORS:
        return float("nan")


class OrdersCollector(Collector):
    """Turns a fresh ``Snapshot`` into metric families on every scrape."""

    def collect(self) -> Iterable[Metric]:
        snap = read_snapshot()

        by_status = GaugeMetricFamily(
            "orders_by_status", "Orders in each status of the lifecycle.", labels=["status"]
        )
        for status, n in snap.by_status.items():
            by_status.add_metric([status], n)
        yield by_status

        expiries = CounterMetricFamily(
            "orders_expiries",
            "Orders expired, by who expired them: timer (on time), sweep (the timer was "
            "lost), payment (a payment found the deadline passed before the timer fired).",
            labels=["actor"],
        )
        for actor, n in snap.expiries_by_actor.items():
            expiries.add_metric([actor], n)
        yield expiries

        lateness = snap.lateness
        yield HistogramMetricFamily(
            "orders_expiry_lateness_seconds",
            "How long after its deadline each expired order was cancelled.",
            buckets=[(repr(bound), n) for bound, n in lateness.buckets.items()]
            + [("+Inf", lateness.count)],
            sum_value=lateness.sum_seconds,
        )

        yield GaugeMetricFamily(
            "orders_timers_pending",
            "Unpaid orders whose expiry timer is armed for their current deadline.",
            value=snap.timers_pending,
        )
        yield GaugeMetricFamily(
            "orders_unpaid_overdue",
            "Unpaid orders past their deadline and not yet expired. Above zero for more "
            "than SWEEP_INTERVAL + SWEEP_GRACE seconds: timers and sweep are both failing.",
            value=snap.overdue,
        )
        oldest = snap.oldest_overdue_deadline
        yield GaugeMetricFamily(
            "orders_unpaid_overdue_max_seconds",
            "How far past its deadline the oldest overdue unpaid order is (0 if none).",
            value=(snap.at - oldest).total_seconds() if oldest is not None else 0.0,
        )

        yield GaugeMetricFamily(
            "orders_timer_waker_lag_seconds",
            "How long the oldest due timer bucket (batched timers) has waited for a worker's "
            "waker: 0 if none is due, NaN if Redis did not answer. Above a few tenths of a "
            "second for long: no worker runs, or their wakers cannot reach Redis.",
            value=_waker_lag(),
        )

        sweep = snap.last_sweep
        yield GaugeMetricFamily(
            "orders_sweep_last_run_timestamp_seconds",
            "When the last sweep ran, in Unix time (0 if never): beat is alive.",
            value=_epoch(sweep.at if sweep else None),
        )
        for name, field, help_text in SWEEP_GAUGES:
            yield GaugeMetricFamily(name, help_text, value=getattr(sweep, field) if sweep else 0)

        yield GaugeMetricFamily(
            "orders_held",
            "Unpaid orders a customer is paying: an open payment attempt holds them (their "
            "deadline waits for it, then the provider is asked before they expire).",
            value=snap.held,
        )
        yield GaugeMetricFamily(
            "orders_payment_closes_pending",
            "Payment attempts that timed out or were closed here and that the provider "
            "has not yet been told to close (close_payment). Growing: the gateway keeps "
            "failing, and a late payment stays possible. 0 with a gateway that cannot "
            "close payments.",
            value=snap.payment_closes_pending,
        )
        yield GaugeMetricFamily(
            "orders_refunds_pending",
            "Payments that did not pay their order (late, surplus, mismatched) and are "
            "not refunded yet.",
            value=snap.refunds_pending,
        )
        yield GaugeMetricFamily(
            "orders_refunds_failing",
            "Of those, the ones received more than SHIPPING_RETRY_AFTER seconds ago: the "
            "gateway keeps refusing or the refund task was lost.",
            value=snap.refunds_failing,
        )
        yield GaugeMetricFamily(
            "orders_shipments_pending", "Paid orders not shipped yet.", value=snap.shipments_pending
        )
        yield GaugeMetricFamily(
            "orders_shipments_stuck",
            "Paid orders still not shipped SHIPPING_RETRY_AFTER seconds after payment.",
            value=snap.shipments_stuck,
        )
        yield GaugeMetricFamily(
            "orders_events_owed",
            "Events (history rows) that still owe a delivery to some receiver.",
            value=snap.events.owed,
        )
        yield GaugeMetricFamily(
            "orders_events_late",
            "Of those, the ones owed for more than EVENT_GRACE seconds. Growing: the "
            "workers do not keep up, or dispatch tasks are lost and the sweep is not running.",
            value=snap.events.late,
        )
        yield GaugeMetricFamily(
            "orders_event_deliveries_retrying",
            "Deliveries to a receiver that raised, waiting for their next try.",
            value=snap.events.retrying,
        )
        yield GaugeMetricFamily(
            "orders_event_deliveries_parked",
            "Deliveries that failed EVENT_MAX_ATTEMPTS times and wait for a retry from the "
            "admin (Event deliveries, action Retry). Above zero: a receiver is broken.",
            value=snap.events.parked,
        )
        yield GaugeMetricFamily(
            "orders_webhook_deliveries_retrying",
            "Webhook deliveries whose endpoint failed, waiting for their next try.",
            value=snap.events.webhooks_retrying,
        )
        yield GaugeMetricFamily(
            "orders_webhook_deliveries_given_up",
            "Webhook deliveries given up after WEBHOOK_GIVE_UP_AFTER (send them again "
            "from the admin once the endpoint is back).",
            value=snap.events.webhooks_given_up,
        )


# The view -------------------------------------------------------------------------------


@json_endpoint("GET", authenticate=require_operator)
def metrics_view(request: HttpRequest) -> HttpResponse:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(OrdersCollector())
    encoder, content_type = exposition_format(request.headers.get("Accept", ""))
    return HttpResponse(encoder(registry), content_type=content_type)


def exposition_format(accept: str) -> tuple[Callable[[CollectorRegistry], bytes], str]:
    """The format the scraper asks for, or Prometheus's text format when its ``Accept``
    header cannot be read (``version=abc`` makes ``choose_encoder`` raise): content
    negotiation falls back to what the server has rather than failing the scrape."""
    try:
        return choose_encoder(accept)
    except (TypeError, ValueError):
        return choose_encoder("")
