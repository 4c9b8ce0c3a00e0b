"""The shop's side of the lifecycle: an order that expired or was cancelled gives its
reserved stock back, once. (A refunded order is closed too: its goods left, no stock.)"""

from typing import Any

from django.db.models import F
from django.dispatch import receiver

from docs.examples.shop.models import Order, OrderLine, Product
from orders.models import CancelReason
from orders.signals import order_cancelled, order_expired


@receiver(order_expired, sender=Order, dispatch_uid="shop.release_stock.expired")
@receiver(order_cancelled, sender=Order, dispatch_uid="shop.release_stock.cancelled")
def release_stock(sender: Any, order: Order, **kwargs: Any) -> None:
    # Called once per event in effect: inside a transaction with its delivery record,
    # which commits with these updates or not at all (orders.events).
    if order.cancel_reason == CancelReason.REFUND:
        return
    # By product id, as checkout locks them: no deadlock between the two.
    for line in OrderLine.objects.filter(order_id=order.pk).order_by("product_id"):
        Product.objects.filter(pk=line.product_id).update(stock=F("stock") + line.quantity)
