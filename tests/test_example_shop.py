"""The example shop (docs/examples/shop) on a real worker and Redis: stock reserved at
checkout, given back when an order expires or is cancelled, kept when it is paid.

Runs only with ``ORDERS_ORDER_MODEL=shop.Order`` (.ci/test). What at-most-once signals
cannot survive (a worker killed after the commit, a receiver that raises) is for the
outbox to prove, on this same shop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import Decimal

import pytest
from django.utils import timezone

from orders import get_order_model, services
from orders.models import Payment, Status
from tests.conftest import WorkerProcess

if get_order_model()._meta.label != "shop.Order":
    pytest.skip("only with ORDERS_ORDER_MODEL=shop.Order", allow_module_level=True)

from docs.examples.shop.checkout import OutOfStock, checkout
from docs.examples.shop.models import Order, OrderLine, Product
from docs.examples.shop.receivers import release_stock

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


def stock() -> dict[str, int]:
    return dict(Product.objects.values_list("name", "stock"))


@pytest.fixture
def catalogue() -> dict[str, Product]:
    return {
        name: Product.objects.create(name=name, price=Decimal(price), stock=units)
        for name, price, units in (("tea", "4.50", 10), ("cup", "12.00", 4))
    }


def status(order: Order) -> str:
    return str(Order.objects.get(pk=order.pk).status)


def test_an_order_not_paid_in_time_gives_its_stock_back(
    celery_worker_process: WorkerProcess, catalogue: dict[str, Product]
) -> None:
    tea, cup = catalogue["tea"], catalogue["cup"]

    order = checkout(customer="ann", items={tea.pk: 3, cup.pk: 1}, timeout=1.5)

    assert (order.customer, order.amount) == ("ann", Decimal("25.50"))
    assert stock() == {"tea": 7, "cup": 3}
    wait_for(lambda: stock() == {"tea": 10, "cup": 4}, 10, "the expiry to release the stock")
    assert status(order) == Status.CANCELLED
    assert Order.objects.get(pk=order.pk).stock_released


def test_a_paid_order_keeps_its_stock(
    celery_worker_process: WorkerProcess, catalogue: dict[str, Product]
) -> None:
    order = checkout(customer="bo", items={catalogue["tea"].pk: 2}, timeout=1.5)
    services.record_payment(order_id=order.pk, payment_ref="pay-bo", amount="9.00")

    wait_for(lambda: status(order) == Status.DELIVERED, 10, "the paid order to ship")
    time.sleep(2)  # past the deadline: the timer fires and finds it paid

    assert stock() == {"tea": 8, "cup": 4}
    assert status(order) == Status.DELIVERED


def test_a_cancelled_order_gives_its_stock_back_once(catalogue: dict[str, Product]) -> None:
    order = checkout(customer="cy", items={catalogue["cup"].pk: 4}, timeout=600)
    assert stock()["cup"] == 0

    services.cancel_order(order_id=order.pk, by="cy")
    # The signal delivered a second time.
    release_stock(sender=Order, order=Order.objects.get(pk=order.pk))

    assert stock() == {"tea": 10, "cup": 4}


def test_checkout_beyond_the_stock_stores_nothing(catalogue: dict[str, Product]) -> None:
    with pytest.raises(OutOfStock, match="Only 4 of cup left"):
        checkout(customer="di", items={catalogue["tea"].pk: 1, catalogue["cup"].pk: 5})

    assert stock() == {"tea": 10, "cup": 4}
    assert not Order.objects.exists()
    assert not OrderLine.objects.exists()


def test_checkouts_while_a_burst_of_expiries_releases_the_same_products(
    celery_worker_process: WorkerProcess,
) -> None:
    tea = Product.objects.create(name="tea", price=Decimal("1.00"), stock=60)
    # 40 orders that expire together; 10 of them paid right at their deadline, so that
    # payment and timer race for the row lock (either wins, never both).
    burst = [checkout(customer=f"b{i}", items={tea.pk: 1}, timeout=2) for i in range(40)]
    time.sleep(max(0.0, (burst[0].expires_at - timezone.now()).total_seconds() - 0.05))
    for i, order in enumerate(burst[:10]):
        services.record_payment(order_id=order.pk, payment_ref=f"race-{i}", amount="1.00")
    # Checkouts of the same product while the worker releases what the burst held.
    unpaid_burst = Order.objects.filter(pk__in=[o.pk for o in burst], status=Status.CREATED)
    later: list[Order] = []
    while unpaid_burst.exists() and len(later) < 15:
        later.append(checkout(customer="late", items={tea.pk: 1}, timeout=600))
        time.sleep(0.05)
    wait_for(lambda: not unpaid_burst.exists(), 15, "the burst to expire")
    expired = Order.objects.filter(pk__in=[o.pk for o in burst], status=Status.CANCELLED)
    wait_for(
        lambda: not expired.filter(stock_released=False).exists(),
        15,
        "every expired order to give its stock back",
    )

    held = Order.objects.exclude(status=Status.CANCELLED)
    units_held = sum(line.quantity for line in OrderLine.objects.filter(order__in=held))
    assert Product.objects.get(pk=tea.pk).stock == 60 - units_held
    assert units_held == len(later) + (40 - expired.count())
    # A racing payment that lost to the timer is refunded, never kept with the stock gone.
    for order in burst[:10]:
        outcome = Payment.objects.get(order_id=order.pk).outcome
        kept = status(order) != Status.CANCELLED
        assert outcome == (Payment.Outcome.ACCEPTED if kept else Payment.Outcome.LATE)
