"""The order, its lifecycle as a state machine, its payments and its transition log.

The diagram is the code: each ``@transition`` below is one arrow of

    created --pay--> paid --ship--> delivered
    created --expire / cancel--> cancelled
    paid | delivered --refund--> refunded --close--> cancelled

Transitions only change the instance in memory; ``orders.services`` wraps each one
with its row lock, ``save()`` and side effects.

A customer in the middle of paying (``PaymentAttempt``) holds an unpaid order: no new
state, only a later ``expires_at`` (the effective deadline), the shop's own deadline kept
beside it in ``original_expires_at`` until the hold ends.

The lifecycle lives in ``AbstractOrder``. ``Order`` is the default concrete model; a shop
may swap in its own subclass with the setting ``ORDERS_ORDER_MODEL``, as Django swaps its
user model. Everything else reaches the model through ``orders.get_order_model()``.
"""

from __future__ import annotations

import base64
import secrets
import uuid
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar, Self

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone
from django_fsm import FSMField, FSMModelMixin, transition

from orders import ORDER_MODEL_SETTING, get_order_model_string
from orders.conf import get_settings

if TYPE_CHECKING:
    from django.db.models.fields.related_descriptors import RelatedManager

#: Who made a transition: a staff user, or a short description of the system part
#: ("expiry timer", "sweep", "payment webhook", ...).
Actor = AbstractBaseUser | str
#: The system parts that make transitions, as the history records them.
TIMER: Actor = "expiry timer"
SWEEP: Actor = "sweep"
SYSTEM: Actor = "system"
#: Why an order that a payment found past its deadline was expired by that payment.
LATE_PAYMENT_REASON = "payment arrived after the deadline"
#: Why an order expired when its deadline passed.
EXPIRED_REASON = "not paid in time"


class Status(models.TextChoices):
    CREATED = "created", "Awaiting payment"
    PAID = "paid", "Paid, awaiting shipment"
    DELIVERED = "delivered", "Shipped"  # the value predates the label: a booked shipment
    REFUNDED = "refunded", "Refunded"
    CANCELLED = "cancelled", "Cancelled"


class CancelReason(models.TextChoices):
    TIMEOUT = "timeout", "Not paid in time"
    CUSTOMER = "customer", "Cancelled by the customer"
    STAFF = "staff", "Cancelled by staff"
    REFUND = "refund", "Closed after a refund"


class ParcelStatus(models.TextChoices):
    IN_TRANSIT = "in_transit", "In transit"
    DELIVERED = "delivered", "Delivered to the customer"
    RETURNED = "returned", "Returned to sender"


#: The longest ``reference`` a shop may give an order.
REFERENCE_MAX_LENGTH = 128


def _default_currency() -> str:
    return get_settings().CURRENCY


def concrete_field(model: type[models.Model], name: str) -> models.Field[Any, Any]:
    """A model's column-backed field by name (``"pk"``: its primary key), for SQL written
    by hand."""
    field = model._meta.pk if name == "pk" else model._meta.get_field(name)
    assert isinstance(field, models.Field)
    return field


def permission_name(model: type[models.Model] | models.Model, codename: str) -> str:
    """``"<app_label>.<codename>"`` for the order model, whichever app it lives in."""
    return f"{model._meta.app_label}.{codename}"


def _may(codename: str) -> Callable[[Any, Any], bool]:
    """A django-fsm ``permission=`` that asks for ``codename`` in the app of the order's
    own model (a string would name one app for all)."""

    def check(instance: models.Model, user: Any) -> bool:
        perm = permission_name(instance, codename)
        return bool(user.has_perm(perm, instance) or user.has_perm(perm))

    return check


class AbstractOrder(FSMModelMixin, models.Model):
    """Everything the lifecycle needs. A shop subclasses it to add its own fields (a
    customer, lines, a channel) and names the subclass in ``ORDERS_ORDER_MODEL``."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    amount = models.DecimalField(
        max_digits=12, decimal_places=2, validators=[MinValueValidator(Decimal("0.01"))]
    )
    currency = models.CharField(max_length=3, default=_default_currency)
    status = FSMField(max_length=16, choices=Status.choices, default=Status.CREATED, protected=True)

    created_at = models.DateTimeField(default=timezone.now, editable=False)
    expires_at = models.DateTimeField(help_text="Deadline for payment.")
    paid_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    refunded_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    cancel_reason = models.CharField(max_length=16, choices=CancelReason.choices, blank=True)
    payment_ref = models.CharField("payment reference", max_length=128, blank=True)
    tracking_number = models.CharField(max_length=64, blank=True)
    refund_ref = models.CharField("refund reference", max_length=128, blank=True)
    # What the logistics provider last said of the parcel, and when to ask it again.
    parcel_status = models.CharField(max_length=16, choices=ParcelStatus.choices, blank=True)
    parcel_next_check_at = models.DateTimeField(null=True, blank=True, editable=False)
    parcel_check_failures = models.PositiveIntegerField(default=0, editable=False)
    # A shop that keeps its own order table links it here: its own id for the order
    # (unique when set, and any number of orders may have none), and a few facts of its
    # own (a flat JSON object: see orders.services.parse_metadata).
    reference = models.CharField(
        max_length=REFERENCE_MAX_LENGTH,
        null=True,
        blank=True,
        unique=True,
        help_text="The shop's own id for this order.",
    )
    metadata = models.JSONField(default=dict, blank=True)
    # The deadline a timer was last enqueued for. Lets the sweep arm, exactly once,
    # deadlines that were beyond the horizon or whose timer could not be published.
    timer_armed_for = models.DateTimeField(null=True, blank=True, editable=False)
    # The deadline the order.expiring_soon reminder was last sent for (REMIND_BEFORE):
    # one reminder per deadline, and again after an extension.
    reminded_for = models.DateTimeField(null=True, blank=True, editable=False)
    # While a payment attempt is open (it holds the order): the deadline the shop gave;
    # expires_at is the later of it and the attempts' holds. Null when none is open.
    original_expires_at = models.DateTimeField(null=True, blank=True, editable=False)

    # Declared here so that every subclass has it and type checkers see it; a swapped-out
    # model's manager still refuses to be used, as Django's own do.
    objects: ClassVar[models.Manager[Self]] = models.Manager()
    if TYPE_CHECKING:
        # The reverse sides of the foreign keys to ORDERS_ORDER_MODEL below.
        history: RelatedManager[OrderTransition]
        payments: RelatedManager[Payment]
        payment_attempts: RelatedManager[PaymentAttempt]
        parcel_events: RelatedManager[ParcelEvent]

    class Meta:
        abstract = True
        ordering = ["-created_at"]
        # Named after the concrete model, so that a shop's own order gets its own names.
        # Index names are kept short: Django allows 30 characters (models.E034).
        indexes = [
            # The sweep's query: unpaid orders by deadline.
            models.Index(
                fields=["status", "expires_at"], name="%(app_label)s_%(class)s_expiry_idx"
            ),
            # The parcel poller's query: shipped orders due for a check.
            models.Index(
                fields=["status", "parcel_next_check_at"],
                name="%(app_label)s_%(class)s_parcel_idx",
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(amount__gt=0), name="%(app_label)s_%(class)s_amount_positive"
            ),
        ]
        permissions = [
            ("refund_order", "Can refund a paid or delivered order"),
            ("cancel_order", "Can cancel an unpaid order"),
        ]

    def __str__(self) -> str:
        return f"Order {self.id} ({self.status})"

    def time_left(self, now: datetime | None = None) -> float | None:
        """Seconds until the payment deadline, for unpaid orders only."""
        if self.status != Status.CREATED:
            return None
        return (self.expires_at - (now or timezone.now())).total_seconds()

    @property
    def deadline(self) -> datetime:
        """The deadline the shop gave (placed or extended), whether or not a payment
        attempt holds the order past it."""
        return self.original_expires_at or self.expires_at

    @property
    def is_held(self) -> bool:
        """Whether a payment attempt is open: the order waits for it, and is expired only
        after asking the provider. A mark on the row itself, so that a statement that
        expires orders in bulk sees it under the row lock."""
        return self.original_expires_at is not None

    def hold_until(self, until: datetime) -> bool:
        """A payment attempt holds the order until ``until``: it is marked held (the
        shop's deadline kept in ``original_expires_at``) and its effective deadline
        becomes the later of the two. Returns whether ``expires_at`` moved. The caller
        saves."""
        self.original_expires_at = self.deadline
        if until <= self.expires_at:
            return False
        self.expires_at = until
        return True

    def end_hold(self, until: datetime | None = None) -> None:
        """No attempt holds the order any more (``until`` None): its deadline is the
        shop's again. Else the attempts left open hold it until ``until`` (never earlier
        than the shop's deadline). The caller saves."""
        deadline = self.deadline
        if until is None:
            self.expires_at, self.original_expires_at = deadline, None
        else:
            self.expires_at, self.original_expires_at = max(deadline, until), deadline

    # The lifecycle. Keyword arguments are recorded by the transition log below.

    @transition(field=status, source=Status.CREATED, target=Status.PAID)
    def pay(self, *, by: Actor, reason: str = "", payment_ref: str, at: datetime) -> None:
        self.payment_ref = payment_ref
        self.paid_at = at

    @transition(field=status, source=Status.PAID, target=Status.DELIVERED)
    def ship(self, *, by: Actor, reason: str = "", tracking_number: str, at: datetime) -> None:
        self.tracking_number = tracking_number
        self.delivered_at = at

    @transition(field=status, source=Status.CREATED, target=Status.CANCELLED)
    def expire(self, *, by: Actor, reason: str = "", at: datetime) -> None:
        for name, value in self.expiry_fields(at).items():
            setattr(self, name, value)

    @staticmethod
    def expiry_fields(at: datetime) -> dict[str, Any]:
        """What expiring writes besides the status: here once, for the transition above
        and for the bulk expiry (``services.expire_due_orders``), which writes it to a
        batch of rows in one statement."""
        return {"cancel_reason": CancelReason.TIMEOUT, "cancelled_at": at}

    @transition(
        field=status,
        source=Status.CREATED,
        target=Status.CANCELLED,
        permission=_may("cancel_order"),
        custom={
            "label": "Cancel",
            "help_text": "Cancel this unpaid order.",
            "form": "orders.forms.ReasonForm",
        },
    )
    def cancel(
        self,
        *,
        by: Actor,
        reason: str = "",
        cancel_reason: str = CancelReason.STAFF,
        at: datetime,
    ) -> None:
        self.cancel_reason = cancel_reason
        self.cancelled_at = at

    @transition(
        field=status,
        source=[Status.PAID, Status.DELIVERED],
        target=Status.REFUNDED,
        permission=_may("refund_order"),
        custom={
            "label": "Refund",
            "help_text": "Refund the payment through the gateway, then close the order.",
            "form": "orders.forms.ReasonForm",
        },
    )
    def refund(self, *, by: Actor, reason: str = "", refund_ref: str = "", at: datetime) -> None:
        self.refund_ref = refund_ref
        self.refunded_at = at

    @transition(field=status, source=Status.REFUNDED, target=Status.CANCELLED)
    def close(self, *, by: Actor, reason: str = "", at: datetime) -> None:
        self.cancel_reason = CancelReason.REFUND
        self.cancelled_at = at


class Order(AbstractOrder):
    """The default order model, used unless ``ORDERS_ORDER_MODEL`` names another."""

    class Meta(AbstractOrder.Meta):
        swappable = ORDER_MODEL_SETTING


class Payment(models.Model):
    """Money received for an order. Every notification is kept, even one that arrives
    too late or twice: a payment that does not pay its order is refunded."""

    class Outcome(models.TextChoices):
        ACCEPTED = "accepted", "Paid the order"
        LATE = "late", "Arrived after the order was cancelled"
        SURPLUS = "surplus", "Order was already paid"
        MISMATCH = "mismatch", "Amount or currency does not match the order"

    id = models.BigAutoField(primary_key=True)
    order = models.ForeignKey(
        get_order_model_string(), on_delete=models.PROTECT, related_name="payments"
    )
    reference = models.CharField(max_length=128, unique=True)
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    currency = models.CharField(max_length=3)
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    received_at = models.DateTimeField(default=timezone.now)
    refunded_at = models.DateTimeField(null=True, blank=True)
    refund_ref = models.CharField("refund reference", max_length=128, blank=True)

    class Meta:
        ordering = ["received_at"]
        indexes = [
            models.Index(fields=["outcome", "refunded_at"], name="orders_payment_refund_idx")
        ]

    def __str__(self) -> str:
        return f"Payment {self.reference} ({self.get_outcome_display()})"

    @property
    def needs_refund(self) -> bool:
        return self.outcome != self.Outcome.ACCEPTED and self.refunded_at is None


class PaymentAttempt(models.Model):
    """A customer in the middle of paying: a 3-D Secure challenge, a bank redirect, a QR
    code on a phone, a bank transfer on its way. While it is open it holds the order:
    its deadline waits until ``hold_until``; past that, the provider is asked
    (``payment_status``) before the order expires, and asked again while it says
    "pending", until ``cap_at`` (``ORDERS["PAYMENT_HOLD"]`` of the method)."""

    class Outcome(models.TextChoices):
        OPEN = "open", "Open: the customer is paying"
        PAID = "paid", "Paid the order"
        FAILED = "failed", "Failed or expired at the provider"
        TIMED_OUT = "timed_out", "Still pending when its hold ran out"
        CLOSED = "closed", "Closed: the order was paid otherwise, expired or cancelled"

    #: The outcomes of an attempt that the provider may still take money for: it is closed
    #: there too (the gateway's ``close_payment``), once.
    CLOSE_AT_PROVIDER = (Outcome.TIMED_OUT, Outcome.CLOSED)

    id = models.BigAutoField(primary_key=True)
    order = models.ForeignKey(
        get_order_model_string(), on_delete=models.PROTECT, related_name="payment_attempts"
    )
    reference = models.CharField(
        "attempt reference", max_length=128, unique=True, help_text="The provider's id for it."
    )
    method = models.CharField(max_length=32, help_text="A key of ORDERS['PAYMENT_HOLD'].")
    started_at = models.DateTimeField(default=timezone.now)
    hold_until = models.DateTimeField(help_text="The order's deadline waits at least until then.")
    cap_at = models.DateTimeField(help_text="Asked no longer than this; then the order expires.")
    outcome = models.CharField(max_length=16, choices=Outcome.choices, default=Outcome.OPEN)
    closed_at = models.DateTimeField(null=True, blank=True)
    detail = models.TextField(blank=True, help_text="Why it closed, as the provider said.")
    # When the provider was told to stop taking money for it (close_payment).
    closed_at_provider = models.DateTimeField(null=True, blank=True)
    payment = models.ForeignKey(
        Payment, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )

    class Meta:
        ordering = ["started_at", "id"]
        indexes = [
            # An order's open attempts (asking the provider, the admin's filter, /metrics).
            models.Index(
                fields=["order"],
                name="orders_attempt_open_idx",
                condition=models.Q(outcome="open"),
            ),
            # Attempts still to be closed at the provider (the sweep retries them).
            models.Index(
                fields=["closed_at"],
                name="orders_attempt_unclosed_idx",
                condition=models.Q(outcome__in=["timed_out", "closed"])
                & models.Q(closed_at_provider__isnull=True),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.method} attempt {self.reference} ({self.outcome})"

    @property
    def is_open(self) -> bool:
        return self.outcome == self.Outcome.OPEN


#: The longest reason a staff member or a customer may give for a transition. The column
#: is a TEXT, but a history is read by people: 2 MB of reason is an attack, not a reason.
REASON_MAX_LENGTH = 1000

#: What the shop hears, by the history row's ``transition``. Placing an order, refunding a
#: payment that did not pay it and the reminder before the deadline are no transitions of
#: the state machine, but are lines of the order's history (and events) all the same.
PLACE, REFUND_PAYMENT, REMIND = "place", "refund_payment", "remind"
#: A payment attempt started (it holds the order), or ended without paying it.
PAYMENT_PENDING, PAYMENT_FAILED = "payment_pending", "payment_failed"
EVENT_TYPES: dict[str, str] = {
    PLACE: "order.placed",
    "pay": "order.paid",
    "ship": "order.shipped",
    "expire": "order.expired",
    "cancel": "order.cancelled",
    "refund": "order.refunded",
    "close": "order.cancelled",
    REFUND_PAYMENT: "payment.refunded",
    REMIND: "order.expiring_soon",
    PAYMENT_PENDING: "order.payment_pending",
    PAYMENT_FAILED: "order.payment_failed",
}


def event_type_of(transition: str) -> str:
    """The event a history row stands for; a shop's own transition ``x`` is ``order.x``."""
    return EVENT_TYPES.get(transition, f"order.{transition}")


class OrderTransition(models.Model):
    """One line of an order's history, and the event the shop hears about it: the outbox.

    Written in the transaction of the transition itself, so an event exists if and only
    if its transition committed. ``next_dispatch_at`` is set while the event still owes
    a delivery to some receiver (``orders.events``); the sweep re-queues those that are
    late. Our own small model rather than django-fsm-log, whose ``object_id`` is a
    positive integer (our orders have UUID keys)."""

    id = models.BigAutoField(primary_key=True)
    event_id = models.UUIDField(unique=True, default=uuid.uuid4, editable=False)
    event_type = models.CharField(max_length=64)
    order = models.ForeignKey(
        get_order_model_string(), on_delete=models.CASCADE, related_name="history"
    )
    transition = models.CharField(max_length=32)
    source = models.CharField(max_length=16)
    target = models.CharField(max_length=16)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    actor = models.CharField(max_length=150, help_text="The user's name, or the system part.")
    reason = models.TextField(blank=True)
    at = models.DateTimeField(default=timezone.now)
    # The payment a payment.refunded event is about.
    payment = models.ForeignKey(
        "Payment", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    # The receivers (by name) the event is owed to: those connected in the process that
    # wrote it. When the dispatcher should (next) deliver it; null once nothing is owed
    # automatically (delivered everywhere, or held by a parked receiver).
    owed_to = models.JSONField(default=list, blank=True, editable=False)
    next_dispatch_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["at", "id"]
        verbose_name = "history entry"
        verbose_name_plural = "history"
        indexes = [
            # The sweep's query for events owed a delivery; delivered ones are not in it.
            models.Index(
                fields=["next_dispatch_at"],
                name="orders_event_due_idx",
                condition=models.Q(next_dispatch_at__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.transition}: {self.source} -> {self.target} by {self.actor}"


class EventDelivery(models.Model):
    """An event delivered to (or owed to) one receiver in the shop's code, known by its
    dotted path. Written in the receiver's own transaction, so that its work and this row
    commit together: the unique (event, receiver) makes the work happen once."""

    id = models.BigAutoField(primary_key=True)
    event = models.ForeignKey(OrderTransition, on_delete=models.CASCADE, related_name="deliveries")
    receiver = models.CharField(max_length=255)
    attempts = models.PositiveIntegerField(default=0)
    delivered_at = models.DateTimeField(null=True, blank=True)
    # After a failure: when to try again, or, after EVENT_MAX_ATTEMPTS, since when it is
    # parked (retried only from the admin).
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    parked_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "event deliveries"
        constraints = [
            models.UniqueConstraint(fields=["event", "receiver"], name="orders_eventdelivery_once")
        ]
        indexes = [
            models.Index(
                fields=["parked_at"],
                name="orders_delivery_parked_idx",
                condition=models.Q(parked_at__isnull=False),
            ),
            models.Index(fields=["delivered_at"], name="orders_delivery_done_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.event_id} -> {self.receiver}"


class ParcelEvent(models.Model):
    """A change in the parcel's status as the logistics provider reported it (by webhook
    or when polled). Not a transition of the order; a returned parcel leads to one."""

    id = models.BigAutoField(primary_key=True)
    order = models.ForeignKey(
        get_order_model_string(), on_delete=models.CASCADE, related_name="parcel_events"
    )
    status = models.CharField(max_length=16, choices=ParcelStatus.choices)
    source = models.CharField(max_length=32, help_text="webhook or poll")
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["at", "id"]

    def __str__(self) -> str:
        return f"parcel {self.status} ({self.source})"


class SweepRun(models.Model):
    """What one sweep found: the evidence that timers work (expired == 0) or are lost,
    and, by its time, that beat is alive."""

    id = models.BigAutoField(primary_key=True)
    at = models.DateTimeField(default=timezone.now, db_index=True)
    expired = models.PositiveIntegerField(default=0)
    max_lateness = models.FloatField(default=0.0, help_text="seconds")
    timers_armed = models.PositiveIntegerField(default=0)
    shipments_retried = models.PositiveIntegerField(default=0)
    refunds_retried = models.PositiveIntegerField(default=0)
    events_requeued = models.PositiveIntegerField(
        default=0, help_text="orders whose late events were queued again"
    )
    errors = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-at"]
        get_latest_by = "at"

    def __str__(self) -> str:
        return f"sweep at {self.at:%Y-%m-%d %H:%M:%S}: {self.expired} expired"


class IdempotencyRecord(models.Model):
    """The first answer to a request that may be repeated: a webhook's ``webhook-id``, or
    the ``Idempotency-Key`` of a new order. Written in the transaction of the effect it
    describes, so that a repeat either waits for it or finds it (``orders.idempotency``)."""

    id = models.BigAutoField(primary_key=True)
    scope = models.CharField(max_length=32, help_text="The endpoint (and credential) of the key.")
    key = models.CharField(max_length=255)
    request_hash = models.CharField(max_length=64, help_text="SHA-256 of the request body.")
    status = models.PositiveSmallIntegerField(help_text="The HTTP status of the first answer.")
    body = models.JSONField(help_text="The JSON body of the first answer.")
    created_at = models.DateTimeField(default=timezone.now)
    # Kept at least this long; the sweep deletes it afterwards.
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["scope", "key"], name="orders_idempotency_key_unique")
        ]

    def __str__(self) -> str:
        return f"{self.scope} {self.key} -> {self.status}"


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class WebhookEndpoint(models.Model):
    """A URL outside that hears the order's events, signed per Standard Webhooks: how a
    shop that is not written in Python (or not deployed with us) subscribes."""

    id = models.BigAutoField(primary_key=True)
    url = models.URLField("URL", max_length=2000)
    description = models.CharField(max_length=200, blank=True)
    secret = models.CharField(
        max_length=120,
        default=new_webhook_secret,
        help_text="The endpoint verifies each delivery's signature with it.",
    )
    event_types = models.JSONField(
        default=list, blank=True, help_text="The event types it hears; none means all."
    )
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        verbose_name = "webhook endpoint"

    def __str__(self) -> str:
        return self.description or self.url

    def hears(self, event_type: str) -> bool:
        return self.active and (not self.event_types or event_type in self.event_types)


class WebhookDelivery(models.Model):
    """One event owed to one endpoint, tried until it answers 2xx or gives up (after
    WEBHOOK_GIVE_UP_AFTER). The next try's time is kept here, picked up by a periodic
    task: no countdown lives that long in the broker."""

    id = models.BigAutoField(primary_key=True)
    event = models.ForeignKey(
        OrderTransition, on_delete=models.CASCADE, related_name="webhook_deliveries"
    )
    endpoint = models.ForeignKey(
        WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries"
    )
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    gave_up_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "webhook deliveries"
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["event", "endpoint"], name="orders_webhookdelivery_once"
            )
        ]
        indexes = [
            models.Index(
                fields=["next_attempt_at"],
                name="orders_webhook_due_idx",
                condition=models.Q(next_attempt_at__isnull=False),
            ),
            models.Index(fields=["created_at"], name="orders_webhook_created_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.event_id} -> {self.endpoint_id}"


class WebhookAttempt(models.Model):
    """One HTTP request of a delivery: what came back, how long it took."""

    id = models.BigAutoField(primary_key=True)
    delivery = models.ForeignKey(
        WebhookDelivery, on_delete=models.CASCADE, related_name="attempts_made"
    )
    at = models.DateTimeField(default=timezone.now)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    latency_ms = models.FloatField(default=0.0)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [models.Index(fields=["at"], name="orders_webhook_attempt_at_idx")]

    def __str__(self) -> str:
        return f"{self.status_code or self.error[:40]} in {self.latency_ms:.0f} ms"
