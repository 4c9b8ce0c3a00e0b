"""The receiver: one INSERT per event, inside the dispatcher's transaction."""

from typing import Any
from uuid import UUID

from django.dispatch import receiver

from bench.receiver import RECEIVER
from bench.receiver.models import StockReleased
from orders import get_order_model
from orders.models import AbstractOrder
from orders.signals import order_expired


@receiver(order_expired, sender=get_order_model(), dispatch_uid=RECEIVER)
def release_stock(sender: Any, order: AbstractOrder, event_id: UUID, **kwargs: Any) -> None:
    StockReleased.objects.create(event_id=event_id, order_id=order.pk)
