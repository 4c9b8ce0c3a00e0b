"""A shop's own order model swapped in with ``ORDERS_ORDER_MODEL``: tests/swapshop (the
least a shop adds: a customer) or the example shop (docs/examples/shop), both with a
required ``customer`` of at most 64 characters.

These run only in a swapped pass (.ci/test runs one with ``shop.Order``); the rest of
the suite runs there too and must not notice the swap.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib import admin
from django.contrib.auth.models import Permission
from django_fsm import has_transition_perm

from orders import get_order_model, services
from orders.models import Order as DefaultOrder
from orders.models import OrderTransition, ParcelEvent, Payment, Status
from orders.services import InvalidInput
from tests.dbstate import snapshot

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(
        get_order_model() is DefaultOrder,
        reason="only with ORDERS_ORDER_MODEL=swapshop.Order or shop.Order",
    ),
]

Order = get_order_model()


def test_the_shop_model_is_the_order_model_everywhere() -> None:
    assert Order._meta.label in ("swapshop.Order", "shop.Order")
    for model in (Payment, OrderTransition, ParcelEvent):
        assert model._meta.get_field("order").related_model is Order
    assert admin.site.is_registered(Order)
    assert not admin.site.is_registered(DefaultOrder)
    with pytest.raises(AttributeError, match="swapped"):
        DefaultOrder.objects.count()


def test_place_order_passes_the_shops_own_fields_and_the_lifecycle_runs_on_them() -> None:
    order = services.place_order(amount="12.50", customer="alice")
    services.record_payment(order_id=order.pk, payment_ref="pay-1", amount="12.50")
    services.ship_order(order_id=order.pk)

    stored = Order.objects.get(pk=order.pk)
    assert (stored.customer, stored.status) == ("alice", Status.DELIVERED)  # type: ignore[attr-defined]
    assert list(stored.history.values_list("transition", flat=True)) == ["place", "pay", "ship"]
    assert Payment.objects.get().order_id == order.pk


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"customer": "x" * 65}, "customer: Ensure this value has at most 64 characters"),
        ({"colour": "red"}, f"'colour' is not a field of {Order._meta.label}"),
        ({"status": "paid"}, "status is set by the order's lifecycle"),
    ],
)
def test_bad_shop_fields_are_refused_and_nothing_is_stored(
    fields: dict[str, Any], says: str
) -> None:
    before = snapshot()

    with pytest.raises(InvalidInput, match=says):
        services.place_order(amount="12.50", **fields)

    assert snapshot() == before


def test_refund_needs_the_permission_of_the_shops_app(django_user_model: Any) -> None:
    order = services.place_order(amount="12.50", customer="bob")
    services.record_payment(order_id=order.pk, payment_ref="pay-1", amount="12.50")
    stored = Order.objects.get(pk=order.pk)
    staff = django_user_model.objects.create_user(username="carol", is_staff=True)
    assert not has_transition_perm(stored.refund, staff)

    staff.user_permissions.set(Permission.objects.filter(codename="refund_order"))
    staff = django_user_model.objects.get(pk=staff.pk)  # a fresh permission cache

    assert staff.has_perm(f"{Order._meta.app_label}.refund_order")
    assert has_transition_perm(stored.refund, staff)
