"""What the shop hears: one signal per event type, delivered from the outbox.

Receivers are connected as with any Django signal (``@receiver(order_expired,
sender=Order)``), but they are not called when the transition happens: the dispatcher
(``orders.events``) calls each one later, in a Celery worker, inside its own
``transaction.atomic()`` together with a delivery record, so that its database work
happens once however often the event is delivered. Each is called with ``sender=`` the
order model, ``order=`` the order as it is now, ``event_id=`` the event's UUID (stable:
the same on every delivery) and ``event=`` the history row; ``payment_refunded`` also
with ``payment=``.

A receiver is known by its ``dispatch_uid`` if it has one, else by its dotted path
(``module.function``): that name keys its delivery records, so keep it stable across
deploys. Django's signals keep no public list of their receivers, hence ``connected``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from django.dispatch import Signal


def receiver_name(receiver: Callable[..., Any], dispatch_uid: Hashable | None = None) -> str:
    if dispatch_uid is not None:
        return str(dispatch_uid)
    # A function or method by its qualified name; any other callable by its class's.
    qualname = getattr(receiver, "__qualname__", None) or type(receiver).__qualname__
    return f"{receiver.__module__}.{qualname}"


class OrderSignal(Signal):
    """A signal for one event type that knows its receivers by name."""

    def __init__(self, event_type: str) -> None:
        super().__init__()
        self.event_type = event_type
        #: name -> (receiver, sender or None for any)
        self.connected: dict[str, tuple[Callable[..., Any], Any]] = {}

    def connect(
        self,
        receiver: Callable[..., Any],
        sender: Any = None,
        weak: bool = True,
        dispatch_uid: Hashable | None = None,
    ) -> None:
        super().connect(receiver, sender, weak, dispatch_uid)
        # As Django: connecting a name again keeps the receiver connected first.
        self.connected.setdefault(receiver_name(receiver, dispatch_uid), (receiver, sender))

    def disconnect(
        self,
        receiver: Callable[..., Any] | None = None,
        sender: Any = None,
        dispatch_uid: Hashable | None = None,
    ) -> bool:
        if receiver is not None or dispatch_uid is not None:
            name = (
                str(dispatch_uid) if dispatch_uid is not None else receiver_name(receiver)  # type: ignore[arg-type]
            )
            self.connected.pop(name, None)
        return super().disconnect(receiver, sender, dispatch_uid)

    def receivers_for(self, sender: Any) -> dict[str, Callable[..., Any]]:
        return {
            name: receiver
            for name, (receiver, wanted) in self.connected.items()
            if wanted is None or wanted is sender
        }


order_placed = OrderSignal("order.placed")
order_paid = OrderSignal("order.paid")
#: The order was shipped (its status is ``delivered``): event type ``order.shipped``.
order_delivered = OrderSignal("order.shipped")
order_expired = OrderSignal("order.expired")
#: Cancelled by the customer or staff, or closed after a refund (``cancel_reason``).
order_cancelled = OrderSignal("order.cancelled")
order_refunded = OrderSignal("order.refunded")
#: A payment that did not pay its order (late, surplus, mismatched) was refunded.
payment_refunded = OrderSignal("payment.refunded")
#: ``ORDERS["REMIND_BEFORE"]`` seconds before the deadline of an unpaid order, once per
#: deadline.
order_expiring_soon = OrderSignal("order.expiring_soon")
#: The customer started paying (``services.start_payment``): the order waits for it.
order_payment_pending = OrderSignal("order.payment_pending")
#: A payment attempt ended without paying: failed or expired at the provider, or still
#: pending when its hold ran out (the reason says which).
order_payment_failed = OrderSignal("order.payment_failed")

#: The signal of each event type.
SIGNALS: dict[str, OrderSignal] = {
    signal.event_type: signal
    for signal in (
        order_placed,
        order_paid,
        order_delivered,
        order_expired,
        order_cancelled,
        order_refunded,
        payment_refunded,
        order_expiring_soon,
        order_payment_pending,
        order_payment_failed,
    )
}
