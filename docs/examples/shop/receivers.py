"""The shop's side of the lifecycle: an order that expired or was cancelled gives its
reserved stock back, once. (A refunded order is closed too: its goods left, no stock.)"""

from typing import Any

from django.db import transaction
from django.db.models import F
from django.dispatch import receiver

from docs.examples.shop.models import Order, OrderLine, Product
from orders.models import CancelReason
from orders.signals import order_cancelled, order_expired


@receiver(order_expired, sender=Order, dispatch_uid="shop.release_stock.expired")
@receiver(order_cancelled, sender=Order, dispatch_uid="shop.release_stock.cancelled")
def release_stock(sender: Any, order: Order, **kwargs: Any) -> None:
    if order.cancel_reason == CancelReason.REFUND:
        return
    with transaction.atomic():
        # The flag makes a second delivery of the signal a no-op.
        if not Order.objects.filter(pk=order.pk, stock_released=False).update(stock_released=True):
            return
        # By product id, as checkout locks them: no deadlock between the two.
        for line in OrderLine.objects.filter(order_id=order.pk).order_by("product_id"):
            Product.objects.filter(pk=line.product_id).update(stock=F("stock") + line.quantity)
