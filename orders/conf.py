"""The app's own settings: one ``ORDERS`` dict in the host project, merged over these defaults."""

from __future__ import annotations

import dataclasses
from functools import cache
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

#: A payment method's name, as ``PAYMENT_HOLD`` and ``start_payment`` take it.
PAYMENT_METHOD_PATTERN = "[a-z0-9_.-]{1,32}"


@dataclasses.dataclass(frozen=True)
class OrdersSettings:
    """Every setting the app reads, with its default: the one list of them."""

    # How long a customer has to pay, when the order does not say: seconds, or the dotted
    # path of a function (order) -> seconds, for a timeout per channel, store or customer.
    DEFAULT_TIMEOUT: int | str = 30 * 60
    # Per-order timeouts outside these bounds are refused as mistakes (seconds).
    MIN_TIMEOUT: int = 1
    MAX_TIMEOUT: int = 30 * 24 * 3600
    # Deadlines further away than this are not enqueued when the order is placed: the
    # sweep arms them once they come this close. Must stay below the broker's
    # visibility_timeout, or Redis redelivers the pending timer while a worker holds it.
    TIMER_HORIZON: int = 50 * 60
    # "batched": deadlines fall into buckets TIMER_RESOLUTION seconds wide, kept in one
    # Redis sorted set; a waker thread in each worker publishes a bucket's task when it
    # is due (orders.waker). Nothing pending sits in a worker. "per_order": one Celery
    # countdown task per order, ~9 KB of worker memory per pending order.
    TIMER_MODE: str = "batched"
    # The width of a timer bucket (seconds, whole milliseconds): a bucket fires at the
    # earliest deadline armed in it, and at its end for any later ones, so an order
    # expires up to this much after its deadline, plus the task's run.
    TIMER_RESOLUTION: float = 0.1
    # How often beat runs the sweep, and how long past its deadline an unpaid order must
    # be before the sweep (rather than its own timer) expires it (seconds).
    SWEEP_INTERVAL: int = 30
    SWEEP_GRACE: int = 5
    SWEEP_BATCH_SIZE: int = 500
    # Orders expired per transaction by the set-based expiry (a bucket's task, the sweep):
    # each batch holds its rows' locks for one statement (about 0.4 s for 5,000 on a
    # small machine); bigger batches are fewer commits and deferred checks.
    EXPIRY_BATCH_SIZE: int = 5000
    # A timer bucket holding more than one batch is shared: its task first publishes up
    # to this many more tasks of the same bucket, which take batches side by side with it
    # (rows locked with skip_locked keep them apart). 0: one task a bucket. Not on SQLite,
    # whose writers queue behind one another anyway.
    EXPIRY_HELPERS: int = 3
    # A paid order whose shipping task has not shipped it after this long is re-queued
    # by the sweep (seconds).
    SHIPPING_RETRY_AFTER: int = 60
    # The parcel poller (the task orders.poll_parcels, which beat runs every minute) asks
    # the logistics provider about each shipped parcel every PARCEL_CHECK_INTERVAL
    # seconds, at most PARCEL_POLL_BATCH per run, backing off up to PARCEL_MAX_BACKOFF
    # after errors, for at most PARCEL_GIVE_UP_AFTER.
    PARCEL_POLL_BATCH: int = 100
    PARCEL_CHECK_INTERVAL: int = 3600
    PARCEL_MAX_BACKOFF: int = 24 * 3600
    PARCEL_GIVE_UP_AFTER: int = 60 * 24 * 3600
    CURRENCY: str = "CNY"
    # The most orders one bulk refund in the admin may take: money leaves with each, so a
    # mistaken selection must stay small. "All N orders" of a list is never refunded.
    BULK_REFUND_LIMIT: int = 50
    # Pluggable backends, chosen by dotted path like SESSION_ENGINE. LOGISTICS_PROVIDER
    # None: the shop ships orders itself (services.ship_order with its tracking number),
    # and a paid order waits for it; nothing is booked, retried or polled.
    PAYMENT_GATEWAY: str = "orders.gateways.LocalPaymentGateway"
    LOGISTICS_PROVIDER: str | None = "orders.gateways.LocalLogisticsProvider"
    # Shared secrets for the JSON API (Bearer token) and the signed webhooks, one per
    # provider (Standard Webhooks secrets: "whsec_" + base64 of 24 to 64 random bytes).
    # Empty means "refuse everything", never "accept everything".
    API_TOKEN: str = ""
    PAYMENT_WEBHOOK_SECRET: str = ""
    LOGISTICS_WEBHOOK_SECRET: str = ""
    # How long the answer to an Idempotency-Key of POST /api/orders/ is kept (seconds):
    # a client retrying the same key within this gets the first order back.
    IDEMPOTENCY_KEY_TTL: int = 24 * 3600
    # The operators' read-only token: /metrics and the details of /health/. Empty means
    # "no Bearer access" (staff with the permission orders.view_order still get in). Keep
    # it apart from API_TOKEN, which places and cancels orders.
    METRICS_TOKEN: str = ""
    # Events (orders.events). An event whose delivery is this late (seconds) is queued
    # again by the sweep: its task was lost, or its worker died.
    EVENT_GRACE: int = 30
    # A receiver that raises is retried after EVENT_RETRY_BACKOFF seconds, doubling up to
    # EVENT_RETRY_MAX_BACKOFF; after EVENT_MAX_ATTEMPTS failures it is parked: retried
    # from the admin only, and shown there and in /metrics.
    EVENT_RETRY_BACKOFF: int = 10
    EVENT_RETRY_MAX_BACKOFF: int = 3600
    EVENT_MAX_ATTEMPTS: int = 10
    # Delivery records and webhook attempts older than this are deleted by the sweep
    # (seconds); the history itself stays.
    EVENT_RETENTION: int = 30 * 24 * 3600
    # Outbound webhooks: each request's time limit (seconds); retried with exponential
    # backoff for at most WEBHOOK_GIVE_UP_AFTER seconds. URLs that resolve to loopback,
    # private or link-local addresses are refused unless WEBHOOK_ALLOW_PRIVATE is True.
    WEBHOOK_TIMEOUT: int = 10
    WEBHOOK_RETRY_BACKOFF: int = 30
    WEBHOOK_RETRY_MAX_BACKOFF: int = 6 * 3600
    WEBHOOK_GIVE_UP_AFTER: int = 3 * 24 * 3600
    WEBHOOK_ALLOW_PRIVATE: bool = False
    # Seconds before the deadline at which order.expiring_soon is sent to an unpaid
    # order, once per deadline (again after an extension), never once it is paid,
    # cancelled or past its deadline; 0 sends none, and arms and queries nothing. An order
    # placed (or extended) with less than this left is reminded at once. The reminder's
    # timer is armed with the deadline's, within TIMER_HORIZON: a REMIND_BEFORE beyond
    # TIMER_HORIZON minus SWEEP_INTERVAL is sent by the sweep, up to SWEEP_INTERVAL late.
    REMIND_BEFORE: int = 0
    # Payment attempts (services.start_payment): the longest each payment method may hold
    # an unpaid order past its deadline, in seconds from the attempt's start, by method;
    # "default" for any other method. A caller may ask for a shorter hold (a QR code's own
    # expiry); past the hold the provider is asked, and asked again every
    # PAYMENT_STATUS_RECHECK seconds while it says "pending", until this cap.
    PAYMENT_HOLD: dict[str, int] = dataclasses.field(
        default_factory=lambda: {
            "card": 15 * 60,  # a 3-D Secure challenge, a bank redirect
            "qr_code": 2 * 3600,  # WeChat Pay / Alipay: the QR code's validity
            "bank_transfer": 3 * 24 * 3600,
            "default": 15 * 60,
        }
    )
    PAYMENT_STATUS_RECHECK: int = 60
    # How long the provider's answer is waited for (seconds); no answer counts as
    # "pending", so a provider that hangs cannot hold an order past an attempt's cap.
    PAYMENT_STATUS_TIMEOUT: int = 10


#: The defaults by name (the system checks and the README read them).
DEFAULTS: dict[str, Any] = {
    field.name: field.default
    if field.default_factory is dataclasses.MISSING
    else field.default_factory()
    for field in dataclasses.fields(OrdersSettings)
}
#: The settings that are whole numbers (seconds, or counts of orders).
INTEGER_SETTINGS = tuple(
    field.name for field in dataclasses.fields(OrdersSettings) if field.type == "int"
)


def user_settings() -> dict[str, Any]:
    return dict(getattr(settings, "ORDERS", {}) or {})


@cache
def get_settings() -> OrdersSettings:
    """The merged settings. Unknown keys are reported by the system check orders.E001."""
    merged = DEFAULTS | {k: v for k, v in user_settings().items() if k in DEFAULTS}
    return OrdersSettings(**merged)


@receiver(setting_changed)
def _reload(*, setting: str, **kwargs: Any) -> None:
    if setting == "ORDERS":
        get_settings.cache_clear()
