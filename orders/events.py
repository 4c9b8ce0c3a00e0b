"""Events: the order's history is the outbox, and the dispatcher delivers it.

Every line of an order's history (a transition, or placing the order, refunding a
payment, the reminder before the deadline) is written in the transaction of what it
records, and is the event the shop hears about. Nothing is sent from an ``on_commit``
hook alone: after the commit a dispatch task is queued, and if it is lost (broker down,
worker killed) the sweep queues it again, since the event still says it is owed
(``next_dispatch_at``).

The dispatcher calls each receiver of the event's signal (``orders.signals``) inside
its own ``transaction.atomic()``, together with an ``EventDelivery`` row under a unique
(event, receiver): the receiver's writes and the row commit together or not at all, so
its effect happens once, whether the dispatcher runs twice at once or dies midway.
Events of one order reach a receiver in the order they happened; a receiver that raises
holds back only the later events of the same order for itself, and is tried again after
a backoff (the event's ``next_dispatch_at``, which the sweep picks up), or parked after
``EVENT_MAX_ATTEMPTS`` until the admin retries it. Outbound webhooks
(``orders.outbound``) get one ``WebhookDelivery`` per event and endpoint, sent and
retried on their own.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import groupby
from typing import Any

from django.contrib.auth.base_user import AbstractBaseUser
from django.db import IntegrityError, connection, models, transaction
from django.db.models import Exists, OuterRef
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.utils import timezone
from django_fsm.signals import post_transition

from orders import get_order_model, scheduling
from orders.conf import get_settings
from orders.logging import log_event
from orders.models import (
    AbstractOrder,
    Actor,
    EventDelivery,
    OrderTransition,
    Payment,
    WebhookDelivery,
    WebhookEndpoint,
    concrete_field,
    event_type_of,
)
from orders.signals import SIGNALS

logger = logging.getLogger("orders.events")


# Recording ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Audience:
    """Who hears an event of one type, as the process that writes it sees it: the names
    of the receivers connected here (the event is owed to these, whichever worker
    delivers it), and whether some active endpoint wants it."""

    receivers: tuple[str, ...]
    endpoints: bool

    def __bool__(self) -> bool:
        return bool(self.receivers) or self.endpoints


def audience(event_type: str, model: type[models.Model] | None = None) -> Audience:
    signal = SIGNALS.get(event_type)
    names = tuple(signal.receivers_for(model or get_order_model())) if signal else ()
    return Audience(
        receivers=names,
        endpoints=any(endpoint.hears(event_type) for endpoint in _active_endpoints()),
    )


#: How long a process trusts its list of active endpoints (seconds): looking it up on
#: every transition would add a query to each. An endpoint saved or deleted in this
#: process is seen at once; one saved elsewhere (staff in the admin) within this time.
ENDPOINTS_TTL = 5.0
_endpoints: tuple[float, list[WebhookEndpoint]] = (0.0, [])


def _active_endpoints() -> list[WebhookEndpoint]:
    global _endpoints
    read_at, endpoints = _endpoints
    if time.monotonic() - read_at > ENDPOINTS_TTL:
        endpoints = list(WebhookEndpoint.objects.filter(active=True).only("event_types", "active"))
        _endpoints = (time.monotonic(), endpoints)
    return endpoints


@receiver([post_save, post_delete], sender=WebhookEndpoint, dispatch_uid="orders.events.endpoints")
def forget_endpoints(**kwargs: Any) -> None:
    """Read the active endpoints afresh next time (an endpoint changed; a test began)."""
    global _endpoints
    _endpoints = (0.0, [])


def history_row(
    order: AbstractOrder,
    *,
    transition: str,
    source: str,
    target: str,
    by: Actor,
    reason: str = "",
    at: datetime | None = None,
    payment: Payment | None = None,
    listeners: Callable[[str], Audience] | None = None,
) -> OrderTransition:
    """A history row (unsaved): the event ``transition`` of ``order``, owed
    (``next_dispatch_at``) to the receivers connected in this process and to the
    endpoints, if any hear its type. ``listeners`` looks the audience up (by default,
    now)."""
    user = by if isinstance(by, AbstractBaseUser) else None
    at = at or timezone.now()
    event_type = event_type_of(transition)
    heard = (listeners or (lambda kind: audience(kind, type(order))))(event_type)
    return OrderTransition(
        order_id=order.pk,
        event_type=event_type,
        transition=transition,
        source=source,
        target=target,
        user_id=user.pk if user is not None else None,
        actor=user.get_username() if user is not None else str(by),
        reason=reason,
        at=at,
        payment=payment,
        **owed(heard, at),
    )


def owed(heard: Audience, at: datetime) -> dict[str, Any]:
    """What an event written at ``at`` owes: its receivers, and a dispatch at once if
    anyone (receiver or endpoint) hears it. One rule for every way a row is written."""
    return {"owed_to": list(heard.receivers), "next_dispatch_at": at if heard else None}


#: A bulk write's rows, given as one JSON parameter ``[[event id, order id, source],
#: ...]``, read as a table ``j``. (On PostgreSQL the expiry writes its history in its own
#: statement, from the rows it updated.)
_JSON_ROWS = {
    "mysql": "JSON_TABLE(%s, '$[*]' COLUMNS (event_id VARCHAR(36) PATH '$[0]', "
    "order_id VARCHAR(255) PATH '$[1]', source VARCHAR(64) PATH '$[2]')) AS j",
    "sqlite": "(SELECT json_extract(value, '$[0]') AS event_id, json_extract(value, '$[1]') "
    "AS order_id, json_extract(value, '$[2]') AS source FROM json_each(%s)) AS j",
}


#: The history's columns a bulk write fills, in the order its ``SELECT`` gives them.
_BULK_FIELDS = (
    "event_id",
    "event_type",
    "order",
    "transition",
    "source",
    "target",
    "actor",
    "reason",
    "at",
    "owed_to",
    "next_dispatch_at",
)


def bulk_history_table() -> str:
    """``<history table> (<columns>)`` for an ``INSERT ... SELECT`` of bulk history rows,
    whose ``SELECT`` gives event id, event type, order id, transition, source, target,
    actor, reason, at, owed_to and next_dispatch_at, in that order."""
    qn = connection.ops.quote_name
    columns = ", ".join(qn(concrete_field(OrderTransition, name).column) for name in _BULK_FIELDS)
    return f"{qn(OrderTransition._meta.db_table)} ({columns})"


def record_in_bulk(
    rows: list[tuple[Any, str]], *, transition: str, target: str, by: str, reason: str, at: datetime
) -> None:
    """Write one event ``transition`` for each (order id, source status) of ``rows``, in
    the caller's transaction and with one ``INSERT ... SELECT`` from the rows passed as
    one JSON parameter (the bulk expiry's history, written with no order instance at
    hand), and queue their dispatch on commit. Not ``bulk_create``: compiling and
    escaping each value in Python was three quarters of a MariaDB batch's time."""
    heard = audience(event_type_of(transition), get_order_model())
    debt = owed(heard, at)

    def db(name: str, value: Any) -> Any:
        value = concrete_field(OrderTransition, name).get_db_prep_save(value, connection)
        return str(value) if isinstance(value, uuid.UUID) else value  # a native uuid column

    data = [[db("event_id", uuid.uuid4()), db("order", pk), source] for pk, source in rows]
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {bulk_history_table()} "
            "SELECT j.event_id, %s, j.order_id, %s, j.source, %s, %s, %s, %s, %s, %s "
            f"FROM {_JSON_ROWS[connection.vendor]}",
            [
                event_type_of(transition),
                transition,
                target,
                by,
                reason,
                db("at", at),
                db("owed_to", debt["owed_to"]),
                db("next_dispatch_at", debt["next_dispatch_at"]),
                json.dumps(data),
            ],
        )
    if heard:
        announce([order_id for order_id, _ in rows])


def record(order: AbstractOrder, **row: Any) -> OrderTransition:
    """Write an event that is not a transition of the state machine (placing the order,
    a payment refunded, a reminder), in the caller's transaction; queue its dispatch on
    commit."""
    event = history_row(order, **row)
    event.save(force_insert=True)
    if event.next_dispatch_at is not None:
        announce([event.order_id])
    return event


@dataclass
class _Batch:
    """The history rows of a batch of transitions, and who listens to which event type
    (looked up once per batch)."""

    rows: list[OrderTransition] = field(default_factory=list)
    heard: dict[str, Audience] = field(default_factory=dict)

    def audience(self, event_type: str) -> Audience:
        if event_type not in self.heard:
            self.heard[event_type] = audience(event_type)
        return self.heard[event_type]


#: While set, transitions append their history rows here instead of inserting them.
_history_batch: ContextVar[_Batch | None] = ContextVar("orders_history_batch", default=None)


@contextmanager
def history_in_bulk() -> Iterator[None]:
    """Record the transitions made inside with one INSERT at the end, for batches; one
    dispatch task is queued for all of them."""
    batch = _Batch()
    token = _history_batch.set(batch)
    try:
        yield
    finally:
        _history_batch.reset(token)
    OrderTransition.objects.bulk_create(batch.rows)
    announce(sorted({row.order_id for row in batch.rows if row.next_dispatch_at is not None}))


@receiver(post_transition, dispatch_uid="orders.events.record_transition")
def _record_transition(
    sender: type[models.Model],
    instance: models.Model,
    name: str,
    source: str,
    target: str,
    method_kwargs: dict[str, Any],
    **kwargs: Any,
) -> None:
    # Runs inside the service's transaction, before save(): the row and its history
    # commit together or not at all. Any model of the project may have transitions:
    # only the order's are ours (whichever model the shop swapped in).
    if not isinstance(instance, AbstractOrder):
        return
    fields = {
        "transition": name,
        "source": source,
        "target": target,
        "by": method_kwargs.get("by", "system"),
        "reason": method_kwargs.get("reason", ""),
        "at": method_kwargs.get("at"),
    }
    batch = _history_batch.get()
    if batch is None:
        record(instance, **fields)
    else:
        batch.rows.append(history_row(instance, listeners=batch.audience, **fields))


#: Orders per dispatch task: a batch of expiries is spread over the worker's processes.
DISPATCH_CHUNK = 50


def announce(order_ids: Iterable[Any]) -> None:
    """Queue the dispatch of these orders' events once the caller's transaction
    commits. If the task is lost, the sweep queues it again (``redispatch_late``)."""
    from orders.tasks import dispatch_events_task  # tasks import services, which import us

    ids = [str(order_id) for order_id in order_ids]
    for chunk in range(0, len(ids), DISPATCH_CHUNK):
        scheduling.enqueue_on_commit(
            dispatch_events_task, ids[chunk : chunk + DISPATCH_CHUNK], what="event dispatch"
        )


# Dispatching ----------------------------------------------------------------------------


@dataclass
class DispatchReport:
    delivered: int = 0
    failed: int = 0
    parked: int = 0
    held: int = 0
    missing: int = 0
    webhooks: int = 0


#: ``_deliver``'s answer for "done" (else: when to try again, or None when parked).
_DELIVERED = timezone.make_aware(datetime(1970, 1, 1))


def dispatch(order_ids: Iterable[Any], *, now: datetime | None = None) -> DispatchReport:
    """Deliver every event these orders still owe to their receivers and endpoints:
    per order, in the order the events happened. What is owed, what was already taken
    and the endpoints are read once for all the orders; each delivery is then one
    transaction, the receiver's writes and its delivery record."""
    report = DispatchReport()
    owed = list(
        OrderTransition.objects.filter(order_id__in=list(order_ids), next_dispatch_at__isnull=False)
        .select_related("payment")
        .order_by("order_id", "id")
    )
    if not owed:
        return report
    model = get_order_model()
    orders = model.objects.in_bulk({event.order_id for event in owed})
    taken = {
        (record.event_id, record.receiver): record
        for record in EventDelivery.objects.filter(event__in=owed)
    }
    endpoints = list(WebhookEndpoint.objects.filter(active=True))
    done: list[int] = []
    webhooks: list[WebhookDelivery] = []
    for order_id, events in groupby(owed, key=lambda event: event.order_id):
        order = orders.get(order_id)
        if order is None:
            continue  # deleted meanwhile, with its history
        # A receiver that has not taken an event of this order holds back its later ones:
        # name -> when it may be tried again (None: parked, only the admin retries it).
        held: dict[str, datetime | None] = {}
        for event in events:
            signal = SIGNALS.get(event.event_type)
            receivers = signal.receivers_for(model) if signal is not None else {}
            waiting: list[datetime | None] = []
            # In the order they are connected here; then any this process lacks.
            owed_to = set(event.owed_to)
            names = [name for name in receivers if name in owed_to]
            names += [name for name in event.owed_to if name not in receivers]
            for name in names:
                if name in held:
                    report.held += 1
                    waiting.append(held[name])
                    continue
                function = receivers.get(name)
                if function is None:
                    held[name] = _missing(event, name, now=now or timezone.now())
                    waiting.append(held[name])
                    report.missing += 1
                    continue
                record = taken.get((event.pk, name))
                outcome = _deliver(event, name, function, order, record, now=now or timezone.now())
                if outcome is _DELIVERED:
                    report.delivered += 1
                    continue
                held[name] = outcome
                waiting.append(outcome)
                if outcome is None:
                    report.parked += 1
                else:
                    report.failed += 1
            webhooks += _webhook_deliveries(event, endpoints, now=now or timezone.now())
            if not waiting:
                done.append(event.pk)
            else:
                # Owed again when the first held receiver may be tried; not at all
                # (until the admin retries it) if only parked ones hold it.
                times = [at for at in waiting if at is not None]
                OrderTransition.objects.filter(pk=event.pk).update(
                    next_dispatch_at=min(times) if times else None
                )
    OrderTransition.objects.filter(pk__in=done).update(next_dispatch_at=None)
    report.webhooks += len(webhooks)
    if webhooks:
        from orders.outbound import send_soon  # outbound imports the API's serializer

        send_soon(webhooks)
    return report


def _missing(event: OrderTransition, name: str, *, now: datetime) -> datetime:
    """The event is owed to a receiver this process does not have (a worker of an older
    deploy, or one that does not load the shop's app): leave it to a worker that has it,
    and look again after EVENT_GRACE."""
    log_event(
        logger,
        "event.receiver_missing",
        "Event {event_type} {event_id} of order {order_id} is owed to {receiver}, which is "
        "not connected in this process; left for a worker that has it.",
        level=logging.WARNING,
        order_id=str(event.order_id),
        event_type=event.event_type,
        event_id=str(event.event_id),
        receiver=name,
    )
    return now + timedelta(seconds=get_settings().EVENT_GRACE)


class _Twin(Exception):
    """Another dispatcher recorded this delivery first: undo ours."""


def _deliver(
    event: OrderTransition,
    name: str,
    function: Callable[..., Any],
    order: AbstractOrder,
    record: EventDelivery | None,
    *,
    now: datetime,
) -> datetime | None:
    """Call one receiver for one event, once in effect: its writes and its delivery
    record commit together. Returns _DELIVERED, the time of the next try, or None
    (parked). ``record`` is what the dispatcher read of this delivery before."""
    if record is not None:
        if record.delivered_at is not None:
            return _DELIVERED
        if record.parked_at is not None:
            return None
        if record.next_attempt_at is not None and record.next_attempt_at > now:
            return record.next_attempt_at
    try:
        with transaction.atomic():
            if record is None:
                _call(function, event, order)
                try:
                    with transaction.atomic():
                        EventDelivery.objects.create(
                            event=event,
                            receiver=name,
                            attempts=1,
                            delivered_at=timezone.now(),
                            created_at=now,
                        )
                except IntegrityError:
                    # A twin dispatcher ran it too and committed first (on PostgreSQL
                    # the INSERT waited for it): this run's writes are rolled back.
                    raise _Twin from None
            else:
                # A retry: lock the record, so that a twin waits here and then finds
                # it delivered.
                locked = EventDelivery.objects.select_for_update().get(pk=record.pk)
                if locked.delivered_at is not None:
                    return _DELIVERED
                if locked.parked_at is not None:
                    return None
                _call(function, event, order)
                locked.attempts += 1
                locked.delivered_at, locked.next_attempt_at = timezone.now(), None
                locked.save(update_fields=["attempts", "delivered_at", "next_attempt_at"])
    except _Twin:
        return _state_of(event, name)
    except Exception as exc:
        return _failed(event, name, exc, now=now)
    log_event(
        logger,
        "event.delivered",
        "Event {event_type} {event_id} of order {order_id} delivered to {receiver}.",
        level=logging.DEBUG,
        order_id=str(event.order_id),
        event_type=event.event_type,
        event_id=str(event.event_id),
        receiver=name,
    )
    return _DELIVERED


def _call(function: Callable[..., Any], event: OrderTransition, order: AbstractOrder) -> None:
    extra = {"payment": event.payment} if event.payment_id is not None else {}
    function(
        signal=SIGNALS[event.event_type],
        sender=type(order),
        order=order,
        event_id=event.event_id,
        event=event,
        **extra,
    )


def _state_of(event: OrderTransition, name: str) -> datetime | None:
    """What the record a twin dispatcher wrote says: delivered, or when to try again."""
    record = EventDelivery.objects.get(event=event, receiver=name)
    if record.delivered_at is not None:
        return _DELIVERED
    return record.next_attempt_at


def _failed(event: OrderTransition, name: str, exc: Exception, *, now: datetime) -> datetime | None:
    """Count a receiver's failure: try again after a backoff, or park it."""
    conf = get_settings()
    with transaction.atomic():
        EventDelivery.objects.bulk_create(
            [EventDelivery(event=event, receiver=name, created_at=now)], ignore_conflicts=True
        )
        delivery = EventDelivery.objects.select_for_update().get(event=event, receiver=name)
        if delivery.delivered_at is not None:  # a twin delivered it meanwhile
            return _DELIVERED
        delivery.attempts += 1
        delivery.last_error = f"{type(exc).__name__}: {exc}"[:2000]
        if delivery.attempts >= conf.EVENT_MAX_ATTEMPTS:
            delivery.next_attempt_at, delivery.parked_at = None, now
        else:
            backoff = conf.EVENT_RETRY_BACKOFF * 2 ** (delivery.attempts - 1)
            delivery.next_attempt_at = now + timedelta(
                seconds=min(backoff, conf.EVENT_RETRY_MAX_BACKOFF)
            )
        delivery.save()
    parked = delivery.parked_at is not None
    log_event(
        logger,
        "event.parked" if parked else "event.failed",
        "Receiver {receiver} raised on event {event_type} {event_id} of order {order_id} "
        "(attempt {attempts}): {error}. "
        + (
            "Parked: retry it from the admin once fixed."
            if parked
            else "Next try at {next_attempt_at}."
        ),
        level=logging.ERROR if parked else logging.WARNING,
        exc_info=True,
        order_id=str(event.order_id),
        event_type=event.event_type,
        event_id=str(event.event_id),
        receiver=name,
        attempts=delivery.attempts,
        error=delivery.last_error,
        next_attempt_at=delivery.next_attempt_at.isoformat() if delivery.next_attempt_at else None,
    )
    return delivery.next_attempt_at


def _webhook_deliveries(
    event: OrderTransition, endpoints: list[WebhookEndpoint], *, now: datetime
) -> list[WebhookDelivery]:
    """One delivery per active endpoint that hears the event (once: a second dispatch
    creates none)."""
    hearing = [endpoint for endpoint in endpoints if endpoint.hears(event.event_type)]
    if not hearing:
        return []
    WebhookDelivery.objects.bulk_create(
        [
            WebhookDelivery(event=event, endpoint=endpoint, next_attempt_at=now, created_at=now)
            for endpoint in hearing
        ],
        ignore_conflicts=True,
    )
    return list(
        WebhookDelivery.objects.filter(
            event=event, endpoint__in=hearing, delivered_at__isnull=True, attempts=0
        )
    )


# The sweep's part, and the admin's ----------------------------------------------------------


def redispatch_late(*, now: datetime | None = None) -> int:
    """Queue again the dispatch of events owed longer than EVENT_GRACE (their task was
    lost, or a receiver's retry is due). Returns how many orders were queued."""
    conf = get_settings()
    now = now or timezone.now()
    late = (
        OrderTransition.objects.filter(
            next_dispatch_at__lte=now - timedelta(seconds=conf.EVENT_GRACE)
        )
        .order_by()  # not the history's own ordering, which DISTINCT would include
        .values_list("order_id", flat=True)
        .distinct()
    )
    order_ids = list(late[: conf.SWEEP_BATCH_SIZE])
    announce(order_ids)
    return len(order_ids)


def retry_parked(deliveries: Iterable[EventDelivery], *, now: datetime | None = None) -> int:
    """Un-park deliveries (the receiver was fixed) and queue their orders' events again,
    from the parked event on. Returns how many were un-parked."""
    now = now or timezone.now()
    count = 0
    with transaction.atomic():
        for delivery in deliveries:
            if delivery.parked_at is None:
                continue
            EventDelivery.objects.filter(pk=delivery.pk).update(
                parked_at=None, next_attempt_at=None, attempts=0
            )
            event = delivery.event
            # The parked event and those it held back: the ones this receiver has not taken.
            taken = EventDelivery.objects.filter(
                event=OuterRef("pk"), receiver=delivery.receiver, delivered_at__isnull=False
            )
            OrderTransition.objects.filter(order_id=event.order_id, id__gte=event.pk).exclude(
                Exists(taken)
            ).update(next_dispatch_at=now)
            announce([event.order_id])
            count += 1
    return count


def prune(*, now: datetime | None = None) -> tuple[int, int]:
    """Delete delivery records and webhook attempts older than EVENT_RETENTION. Records
    of an order with a parked delivery stay: its later events may still be owed to that
    receiver, and their other records say who already took them."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=get_settings().EVENT_RETENTION)
    # Read first: MySQL and MariaDB refuse a DELETE whose subquery reads its own table.
    parked_orders = set(
        EventDelivery.objects.filter(parked_at__isnull=False).values_list(
            "event__order_id", flat=True
        )
    )
    records, _ = (
        EventDelivery.objects.filter(delivered_at__lt=cutoff)
        .exclude(event__order_id__in=parked_orders)
        .delete()
    )
    webhooks, _ = WebhookDelivery.objects.filter(
        created_at__lt=cutoff, next_attempt_at=None
    ).delete()
    return records, webhooks
