"""The shop's checkout: reserve the stock and place the order, in one transaction."""

from django.db import transaction

from docs.examples.shop.models import Order, OrderLine, Product
from orders.services import place_order


class OutOfStock(Exception):
    pass


def checkout(*, customer: str, items: dict[int, int], timeout: float | None = None) -> Order:
    """Order ``items`` ({product id: quantity}) for ``customer``: the stock is taken now,
    and comes back if the order is not paid in time (receivers.py)."""
    with transaction.atomic():
        # Locked in one order (by id) by every checkout: two checkouts of the same
        # products wait for each other instead of deadlocking.
        products = Product.objects.select_for_update().filter(pk__in=items).order_by("pk")
        for product in products:
            if product.stock < items[product.pk]:
                raise OutOfStock(f"Only {product.stock} of {product.name} left.")
            product.stock -= items[product.pk]
            product.save(update_fields=["stock"])
        order = place_order(
            amount=sum(p.price * items[p.pk] for p in products),
            timeout=timeout,
            customer=customer,
        )
        OrderLine.objects.bulk_create(
            OrderLine(order_id=order.pk, product=p, quantity=items[p.pk]) for p in products
        )
    return order  # type: ignore[return-value]  # get_order_model() is this Order
