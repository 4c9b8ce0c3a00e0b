"""The management commands for the people who run the shop: status, sweep, rearm, demo."""

from __future__ import annotations

import io
import re
import time
import uuid
from datetime import timedelta

import pytest
from celery import current_app
from django.core.management import call_command, load_command_class
from django.core.management.base import CommandError
from django.utils import timezone
from pytest_django import Settings

from orders import broker, get_order_model, heartbeat, services
from orders.models import Status, SweepRun
from tests.conftest import WorkerProcess

Order = get_order_model()


def run(name: str, *args: str) -> str:
    out = io.StringIO()
    call_command(name, *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


@pytest.mark.parametrize(
    ("name", "explains"),
    [
        ("orders_status", ["each status", "next payment deadlines", "Changes nothing"]),
        ("orders_sweep", ["expire unpaid orders", "SWEEP_INTERVAL"]),
        ("orders_rearm", ["after Redis lost its data", "Idempotent"]),
        ("orders_demo", ["real orders", "running Celery worker", ".ci/up", "local payment"]),
    ],
)
def test_help_of_each_command_explains_what_it_does(name: str, explains: list[str]) -> None:
    app = "config" if name == "orders_demo" else "orders"  # the demo is the host project's
    text = " ".join(
        load_command_class(app, name).create_parser("manage.py", name).format_help().split()
    )

    for phrase in explains:
        assert phrase in text, f"{name} --help should mention {phrase!r}:\n{text}"


@pytest.mark.django_db
def test_orders_status_counts_statuses_and_points_at_the_oldest_overdue_order() -> None:
    now = timezone.now()
    overdue = services.place_order(amount="10.00", timeout=10, now=now - timedelta(minutes=3))
    services.place_order(amount="10.00", timeout=10, now=now - timedelta(minutes=1))
    soon = services.place_order(amount="12.50", timeout=90)
    later = services.place_order(amount="10.00", timeout=120)
    Order.objects.filter(pk=later.pk).update(timer_armed_for=None)  # its publish failed
    far = services.place_order(amount="10.00", timeout=86400)  # beyond the horizon
    paid = services.place_order(amount="10.00", timeout=600)
    services.record_payment(order_id=paid.pk, payment_ref="p-1", amount="10.00")

    output = run("orders_status")

    assert "Awaiting payment" in output
    assert _count_line(output, "created") == 5
    assert _count_line(output, "paid") == 1
    assert _count_line(output, "cancelled") == 0
    assert "total" in output
    assert "Timers: 3 of 5 unpaid orders have one armed." in output
    deadlines = output.split("Next deadlines:")[1]
    assert deadlines.index(str(soon.pk)) < deadlines.index(str(later.pk))
    assert "12.50 CNY  timer armed" in deadlines
    assert f"{later.pk}  10.00 CNY  NO TIMER" in deadlines
    assert f"{far.pk}  10.00 CNY  timer armed by the sweep later" in deadlines
    assert f"Overdue: 2 unpaid orders past their deadline; the oldest, {overdue.pk}, by 2m" in (
        output
    )
    assert "Neither its timer nor the sweep has expired it" in output
    assert "Last sweep: never. Is celery beat running" in output
    assert "Shipments: 1 waiting, 0 of them for more than 60s." in output


@pytest.mark.django_db
def test_orders_status_counts_the_orders_a_customer_is_paying() -> None:
    run_id = uuid.uuid4().hex[:8]  # attempt references of this test's own (kept in Redis)
    for name in ("a", "b"):
        order = services.place_order(amount="10.00", timeout=600)
        services.start_payment(order_id=order.pk, attempt_ref=f"{name}-{run_id}", method="card")
    services.cancel_order(order_id=order.pk, by="customer")  # its attempt is closed

    output = run("orders_status")

    assert (
        "Payments in progress: 1 unpaid orders held by an open payment attempt; 1 ended "
        "attempts still to be closed at the provider."
    ) in output


@pytest.mark.django_db
def test_orders_status_shows_what_the_last_sweep_found() -> None:
    SweepRun.objects.create(at=timezone.now() - timedelta(seconds=3), expired=2, max_lateness=7.5)

    output = run("orders_status")

    assert "Overdue: none; every unpaid order is within its deadline." in output
    assert "Last sweep: 3" in output
    assert "expired 2 overdue orders (up to 7.5s late)" in output
    assert "their timers were lost" in output
    assert "Next deadlines: none." in output


@pytest.mark.django_db
def test_orders_status_names_the_workers_whose_heartbeat_is_fresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Keys of a deployment of this test's own: only the worker it makes up beats there.
    options = current_app.conf.broker_transport_options | {"global_keyprefix": "orders-st-1:"}
    monkeypatch.setitem(current_app.conf, "broker_transport_options", options)
    client = broker.redis_client()
    client.delete(heartbeat.heartbeat_key())

    assert "Workers: none has written a heartbeat within 30s" in run("orders_status")

    heartbeat.beat(client, "w1@shop")
    try:
        line = re.search(r"Workers: .*", run("orders_status"))
        assert line, "no Workers line"
        assert re.fullmatch(r"Workers: 1 alive, last heartbeat: w1@shop \(\ds ago\)\.", line[0])
    finally:
        client.delete(heartbeat.heartbeat_key())


@pytest.mark.django_db
def test_orders_sweep_expires_overdue_orders_and_says_how_many() -> None:
    now = timezone.now()
    overdue = services.place_order(amount="10.00", timeout=10, now=now - timedelta(minutes=1))
    waiting = services.place_order(amount="10.00", timeout=600)

    output = run("orders_sweep")

    assert re.match(r"Expired 1 overdue orders \(up to 50\.\ds late\)", output), output
    assert (
        "armed 0 timers, retried 0 shipments and 0 refunds, sent 0 late reminders, "
        "re-queued the events of 0 orders; 0 errors." in output
    )
    statuses = dict(Order.objects.values_list("pk", "status"))
    assert statuses == {overdue.pk: Status.CANCELLED, waiting.pk: Status.CREATED}
    assert SweepRun.objects.get().expired == 1


@pytest.mark.django_db
def test_orders_rearm_arms_every_unpaid_timer_within_the_horizon_again() -> None:
    unpaid = [services.place_order(amount="10.00", timeout=60 + i) for i in range(3)]
    far = services.place_order(amount="10.00", timeout=86400)
    Order.objects.update(timer_armed_for=None)  # Redis lost them

    output = run("orders_rearm")

    assert output == "Re-armed 3 expiry timers.\n"
    armed = dict(Order.objects.values_list("pk", "timer_armed_for"))
    assert all(armed[order.pk] == order.expires_at for order in unpaid)
    assert armed[far.pk] is None, "beyond the horizon the sweep arms it later"


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_orders_demo_shows_the_lifecycle_land_live_against_a_real_worker(
    celery_worker_process: WorkerProcess,
) -> None:
    started = time.monotonic()

    output = run("orders_demo")

    assert time.monotonic() - started < 30
    assert output.rstrip().endswith("Demo complete."), output
    assert output.count("expire  created -> cancelled, by expiry timer") == 3, output
    assert output.count("s after its deadline") == 3
    assert output.count("ship    paid -> delivered, by shipping, tracking number") == 2
    assert "refund  delivered -> refunded, by demo staff: the customer changed their mind" in (
        output
    )
    assert "close   refunded -> cancelled, by system" in output
    assert "received: arrived after the order was cancelled, to be refunded" in output
    refunds = [line.split()[1] for line in output.splitlines() if " refunded (" in line]
    assert refunds == ["B", "E"], "B's payment when staff refunded it, E's late one"
    summary = output.split("Where each order ended:")[1]
    assert [line.split()[:2] for line in summary.strip().splitlines()[:5]] == [
        ["A", "cancelled"],
        ["B", "cancelled"],
        ["C", "cancelled"],
        ["D", "delivered"],
        ["E", "cancelled"],
    ]
    assert Order.objects.count() == 5


@pytest.mark.django_db
def test_orders_demo_without_a_worker_explains_how_to_start_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Keys of a deployment that no worker serves: no heartbeat there.
    options = current_app.conf.broker_transport_options | {"global_keyprefix": "orders-nobody:"}
    monkeypatch.setitem(current_app.conf, "broker_transport_options", options)

    with pytest.raises(CommandError, match=r"No Celery worker has written a heartbeat.*`\.ci/up`"):
        run("orders_demo")
    assert not Order.objects.exists()


@pytest.mark.django_db
def test_orders_demo_refuses_to_run_against_a_real_payment_gateway(settings: Settings) -> None:
    settings.ORDERS = settings.ORDERS | {"PAYMENT_GATEWAY": "shop.payments.RealGateway"}

    with pytest.raises(CommandError, match="never a real gateway"):
        run("orders_demo")
    assert not Order.objects.exists()


def _count_line(output: str, status: str) -> int:
    for line in output.splitlines():
        words = line.split()
        if len(words) >= 2 and words[-2] == status:
            return int(words[-1])
    raise AssertionError(f"no line for {status} in:\n{output}")
