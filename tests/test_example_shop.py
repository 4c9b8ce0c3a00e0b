"""The example shop (docs/examples/shop) on a real worker and Redis: stock reserved at
checkout, given back when an order expires or is cancelled, kept when it is paid.

Runs only with ``ORDERS_ORDER_MODEL=shop.Order`` (.ci/test). The shop's receiver keeps
no flag of its own: the app delivers each event to it once in effect (orders.events),
which the faults at the end prove on this shop (a worker killed inside the receiver, two
dispatchers at once).
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django import db
from django.core.management import call_command
from django.db.models import QuerySet
from django.utils import timezone
from pytest_django import Settings

from orders import events, get_order_model, services
from orders.models import EventDelivery, OrderTransition, Payment, Status
from orders.tasks import expire_order_task
from tests.chaos import expired_by, histories, key_prefix, kill, unsettled, violations, workers
from tests.conftest import WorkerProcess, worker_env
from tests.effects import receivers
from tests.redis_server import RedisServer, publishing_to, queued, unacked

if get_order_model()._meta.label != "shop.Order":
    pytest.skip("only with ORDERS_ORDER_MODEL=shop.Order", allow_module_level=True)

from docs.examples.shop.checkout import OutOfStock, checkout
from docs.examples.shop.models import Order, OrderLine, Product

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


def owed(orders: list[Order]) -> bool:
    """Does any of these orders' events still owe a delivery?"""
    return OrderTransition.objects.filter(
        order_id__in=[o.pk for o in orders], next_dispatch_at__isnull=False
    ).exists()


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
    wait_for(lambda: not owed([order]), 10, "the events to be delivered")
    assert stock() == {"tea": 10, "cup": 4}


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
    # Delivered here and by the worker's task, and once more as the sweep would.
    events.dispatch([order.pk])
    wait_for(lambda: not owed([order]), 10, "the events to be delivered")
    OrderTransition.objects.filter(order_id=order.pk).update(next_dispatch_at=timezone.now())
    events.dispatch([order.pk])

    assert stock() == {"tea": 10, "cup": 4}
    assert (
        EventDelivery.objects.filter(
            event__order_id=order.pk, receiver="shop.release_stock.cancelled"
        )
        .get()
        .attempts
        == 1
    )


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
    wait_for(lambda: not owed(burst), 15, "every expired order to give its stock back")

    held = Order.objects.exclude(status=Status.CANCELLED)
    units_held = sum(line.quantity for line in OrderLine.objects.filter(order__in=held))
    assert Product.objects.get(pk=tea.pk).stock == 60 - units_held
    assert units_held == len(later) + (40 - expired.count())
    # A racing payment that lost to the timer is refunded, never kept with the stock gone.
    for order in burst[:10]:
        outcome = Payment.objects.get(order_id=order.pk).outcome
        kept = status(order) != Status.CANCELLED
        assert outcome == (Payment.Outcome.ACCEPTED if kept else Payment.Outcome.LATE)


# Faults, on a private Redis (tests/redis_server.py) and workers of their own ---------

GRACE = 1  # SWEEP_GRACE for the sweeps these tests run


@pytest.fixture
def shop_broker(settings: Settings) -> Iterator[tuple[RedisServer, str]]:
    """A private Redis this process publishes to (so that a FLUSHALL never reaches the
    suite's), with a key prefix of its own."""
    settings.ORDERS = settings.ORDERS | {"SWEEP_GRACE": GRACE}
    prefix = key_prefix("shop")
    with RedisServer() as server, publishing_to(server.url, prefix):
        yield server, prefix


def shop_workers(broker: tuple[RedisServer, str], name: str, concurrency: int = 2) -> Any:
    server, prefix = broker
    env = worker_env(REDIS_URL=server.url, CELERY_KEY_PREFIX=prefix)
    return workers(name, 1, env, concurrency=concurrency)


def drained(broker: tuple[RedisServer, str]) -> bool:
    client, prefix = broker[0].client(), broker[1]
    return queued(client, prefix) == 0 and unacked(client, prefix) == 0


def of(orders: list[Order]) -> QuerySet[Order]:
    return Order.objects.filter(pk__in=[o.pk for o in orders])


def assert_stock_exact(tea: Product, orders: list[Order], initial: int) -> None:
    """Each order that was not cancelled holds its unit, each cancelled one gave it back,
    exactly once, once every event is delivered."""
    wait_for(lambda: not owed(orders), 15, "every event to be delivered")
    held = of(orders).exclude(status=Status.CANCELLED).count()
    assert Product.objects.get(pk=tea.pk).stock == initial - held


def sleep_past(order: Order, seconds: float) -> None:
    time.sleep(max(0.0, (order.expires_at - timezone.now()).total_seconds() + seconds))


def test_timers_flushed_from_redis_the_sweep_then_orders_rearm_give_the_stock_back_once(
    shop_broker: tuple[RedisServer, str],
) -> None:
    """FLUSHALL deletes every timer. First round: nobody re-arms, the sweep expires the
    unpaid orders once their deadline and the grace have passed. Second round:
    ``orders_rearm`` arms the timers again and the worker fires them. Unpaid orders give
    their stock back once; paid orders keep theirs; a sweep after all changes nothing."""
    server = shop_broker[0]
    tea = Product.objects.create(name="tea", price=Decimal("1.00"), stock=20)
    # Placed and flushed before any worker runs: no worker holds a timer in memory.
    swept = [checkout(customer=f"s{i}", items={tea.pk: 1}, timeout=1.5) for i in range(4)]
    server.flushall()
    # Paid before the worker starts (a slow start must not make the payment late).
    services.record_payment(order_id=swept[0].pk, payment_ref="flush-s0", amount="1.00")
    with shop_workers(shop_broker, "shop-flush-sweep"):
        sleep_past(swept[-1], GRACE + 0.2)
        assert of(swept).filter(status=Status.CREATED).count() == 3, "no timer left to fire"
        assert services.sweep().expired == 3
        wait_for(lambda: not unsettled(of(swept)), 15, "the paid order to ship")
        wait_for(lambda: not owed(swept), 15, "the expiries' events to be delivered")

    rearmed = [checkout(customer=f"r{i}", items={tea.pk: 1}, timeout=3) for i in range(4)]
    server.flushall()
    services.record_payment(order_id=rearmed[0].pk, payment_ref="flush-r0", amount="1.00")
    call_command("orders_rearm", stdout=io.StringIO(), stderr=io.StringIO())
    with shop_workers(shop_broker, "shop-flush-rearm"):
        wait_for(lambda: not unsettled(of(rearmed)), 15, "the re-armed timers to fire")
        wait_for(lambda: not owed(rearmed), 15, "the expiries' events to be delivered")
        wait_for(lambda: drained(shop_broker), 15, "every task to run")
        assert services.sweep().expired == 0

    assert expired_by(of(swept)) == {"sweep": 3}
    assert expired_by(of(rearmed)) == {"expiry timer": 3}
    orders = swept + rearmed
    assert of(orders).filter(status=Status.CANCELLED).count() == 6
    assert_stock_exact(tea, orders, initial=20)
    assert Product.objects.get(pk=tea.pk).stock == 18


def test_duplicate_timers_give_the_stock_back_once(
    shop_broker: tuple[RedisServer, str],
) -> None:
    """The expiry task sent many times for the same orders, by many worker processes at
    once, before and after the deadline: each unpaid order expires and gives its stock
    back once; the paid one keeps it."""
    tea = Product.objects.create(name="tea", price=Decimal("1.00"), stock=10)
    with shop_workers(shop_broker, "shop-dup", concurrency=4):
        orders = [checkout(customer=f"d{i}", items={tea.pk: 1}, timeout=1.5) for i in range(4)]
        services.record_payment(order_id=orders[0].pk, payment_ref="dup-0", amount="1.00")
        for order in orders:
            for countdown in (0, 0, 1.6, 1.6, 1.6, 1.6, 1.7, 1.7, 2, 2):
                expire_order_task.apply_async((str(order.pk),), countdown=countdown)
        wait_for(lambda: drained(shop_broker), 20, "every duplicate timer to run")
        wait_for(lambda: not owed(orders), 15, "every event to be delivered")

    assert of(orders).filter(status=Status.CANCELLED).count() == 3
    assert all(h.count("expire") == 1 for h in histories(of(orders[1:])).values())
    assert_stock_exact(tea, orders, initial=10)
    assert Product.objects.get(pk=tea.pk).stock == 9


def test_payments_racing_the_deadline_keep_the_stock_or_give_it_back_never_both(
    shop_broker: tuple[RedisServer, str],
) -> None:
    """A payment per order, each from its own thread, landing right around the
    deadline while the worker's timers fire: every order is either paid (its stock kept)
    or expired (its stock back, the losing payment refunded), never both."""
    tea = Product.objects.create(name="tea", price=Decimal("1.00"), stock=10)
    with shop_workers(shop_broker, "shop-race", concurrency=4):
        orders = [checkout(customer=f"p{i}", items={tea.pk: 1}, timeout=2) for i in range(8)]

        def pay(i: int, order: Order) -> None:
            try:
                sleep_past(order, (i - 4) * 0.02)  # from 80 ms before to 60 ms after
                services.record_payment(order_id=order.pk, payment_ref=f"race-{i}", amount="1.00")
            finally:
                db.connection.close()

        threads = [threading.Thread(target=pay, args=(i, o)) for i, o in enumerate(orders)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert Payment.objects.filter(order__in=of(orders)).count() == 8
        wait_for(lambda: not unsettled(of(orders)), 20, "payments refunded, paid orders shipped")
        wait_for(lambda: not owed(orders), 15, "every event to be delivered")
        wait_for(lambda: drained(shop_broker), 15, "every task to run")

    assert violations(of(orders), late_ok=None) == []
    # The payments sent after the deadline cannot have won: the race was run.
    assert of(orders).filter(status=Status.CANCELLED).exists()
    for order in of(orders):
        payment = Payment.objects.get(order_id=order.pk)
        kept = order.status != Status.CANCELLED
        assert payment.outcome == (Payment.Outcome.ACCEPTED if kept else Payment.Outcome.LATE)
        assert (payment.refunded_at is None) == kept, "the losing payment, and only it, refunded"
    assert_stock_exact(tea, orders, initial=10)


def test_a_worker_killed_inside_the_receivers_the_stock_comes_back_once(
    shop_broker: tuple[RedisServer, str], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The worker is killed after the cancellation committed, while delivering its event
    (inside the test receiver that runs before the shop's): the stock is given back
    once, later, by another worker."""
    server, prefix = shop_broker
    gate = tmp_path / "gate"
    gate.touch()
    env = worker_env(
        REDIS_URL=server.url,
        CELERY_KEY_PREFIX=prefix,
        ORDERS_TEST_RECEIVERS="1",
        ORDERS_TEST_GATE=str(gate),
    )
    cup = Product.objects.create(name="cup", price=Decimal("12.00"), stock=4)
    # Here too, so that the events are owed to them (to those connected where written).
    receivers.connect()
    request.addfinalizer(receivers.disconnect)
    with workers("shop-kill-a", 1, env) as [worker]:
        order = checkout(customer="kim", items={cup.pk: 3}, timeout=600)
        services.cancel_order(order_id=order.pk, by="kim")
        wait_for(Path(f"{gate}.entered").exists, 30, "the worker to enter the receivers")
        kill(worker)
    assert stock()["cup"] == 1, "given back by a receiver that never ran"
    assert owed([order])

    gate.unlink()
    with workers("shop-kill-b", 1, env):
        events.redispatch_late(now=timezone.now() + timedelta(hours=1))
        wait_for(lambda: not owed([order]), 30, "the event to be delivered")
    assert stock()["cup"] == 4


def test_two_dispatchers_at_once_give_the_stock_back_once() -> None:
    tea = Product.objects.create(name="tea", price=Decimal("1.00"), stock=10)
    orders = [checkout(customer=f"t{i}", items={tea.pk: 2}, timeout=600) for i in range(5)]
    assert stock()["tea"] == 0
    for order in orders:
        services.cancel_order(order_id=order.pk, by="shop")
    start = threading.Barrier(3)

    def dispatcher() -> None:
        start.wait()
        try:
            events.dispatch([o.pk for o in orders])
        finally:
            db.connection.close()

    threads = [threading.Thread(target=dispatcher) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    wait_for(lambda: not owed(orders), 15, "every event to be delivered")
    assert stock()["tea"] == 10
