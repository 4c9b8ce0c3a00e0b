"""Shipping without a logistics provider (``ORDERS["LOGISTICS_PROVIDER"] = None``): a paid
order waits for the shop, which ships it with its own tracking number."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.test import Client
from pytest_django import Settings

from orders import get_order_model, services
from orders.checks import check_orders_settings
from orders.models import AbstractOrder, Status
from orders.services import InvalidInput, InvalidTransition
from tests.conftest import WorkerProcess
from tests.dbstate import snapshot

Order = get_order_model()

T0 = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)
AUTH = {"Authorization": "Bearer test-api-token"}


@pytest.fixture(autouse=True)
def no_provider(settings: Settings) -> None:
    settings.ORDERS = settings.ORDERS | {"LOGISTICS_PROVIDER": None}


def paid_order(now: datetime = T0) -> AbstractOrder:
    order = services.place_order(amount="10.00", timeout=600, now=now)
    services.record_payment(
        order_id=order.pk, payment_ref=f"pay-{order.pk}", amount="10.00", now=now
    )
    return Order.objects.get(pk=order.pk)


def ship_url(order: AbstractOrder) -> str:
    return f"/api/orders/{order.pk}/ship/"


def post(client: Client, url: str, body: Any) -> Any:
    return client.post(url, json.dumps(body), content_type="application/json", headers=AUTH)


def test_no_provider_passes_the_checks() -> None:
    assert check_orders_settings() == []


@pytest.mark.django_db
def test_the_shop_ships_a_paid_order_with_its_own_tracking_number() -> None:
    order = paid_order()

    shipped = services.ship_order(order_id=order.pk, tracking_number="SF123", by="warehouse")

    assert (shipped.status, shipped.tracking_number) == (Status.DELIVERED, "SF123")
    assert shipped.parcel_next_check_at is None, "no provider to poll"
    assert list(shipped.history.values_list("transition", "actor")) == [
        ("place", "shop"),
        ("pay", "payment gateway"),
        ("ship", "warehouse"),
    ]
    assert services.poll_parcels().checked == 0


@pytest.mark.django_db
def test_shipping_twice_under_the_same_number_changes_nothing_and_another_is_refused() -> None:
    order = paid_order()
    services.ship_order(order_id=order.pk, tracking_number="SF123")
    before = snapshot()

    again = services.ship_order(order_id=order.pk, tracking_number="SF123")
    with pytest.raises(InvalidTransition, match="shipped as SF123"):
        services.ship_order(order_id=order.pk, tracking_number="SF999")

    assert again.tracking_number == "SF123"
    assert snapshot() == before


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("tracking_number", "error"),
    [
        (None, "Give the tracking_number"),
        ("", "tracking_number must be 1 to 64 characters"),
        ("x" * 65, "tracking_number must be 1 to 64 characters"),
        ("SF\n123", "without control characters"),
    ],
)
def test_a_missing_or_bad_tracking_number_is_refused(tracking_number: Any, error: str) -> None:
    order = paid_order()
    before = snapshot()

    with pytest.raises(InvalidInput, match=error):
        services.ship_order(order_id=order.pk, tracking_number=tracking_number)

    assert snapshot() == before


@pytest.mark.django_db
def test_the_sweep_retries_no_shipment_without_a_provider() -> None:
    order = paid_order()

    report = services.sweep(now=T0 + timedelta(hours=1))

    assert report.shipments_retried == 0
    assert report.errors == []
    assert Order.objects.get(pk=order.pk).status == Status.PAID


@pytest.mark.django_db
def test_post_ship_ships_the_order(client: Client) -> None:
    order = paid_order()

    response = post(client, ship_url(order), {"tracking_number": "SF123"})

    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["tracking_number"]) == ("delivered", "SF123")
    assert body["history"][-1]["by"] == "shop (api)"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({}, 400),
        ({"tracking_number": 123}, 400),
        ({"tracking_number": "SF\u0000"}, 400),
        ({"tracking_number": "SF123", "carrier": "x"}, 400),
    ],
)
def test_post_ship_with_a_bad_body_is_a_400_and_changes_nothing(
    client: Client, body: dict[str, Any], status: int
) -> None:
    order = paid_order()
    before = snapshot()

    response = post(client, ship_url(order), body)

    assert response.status_code == status
    assert response.json()["error"]
    assert snapshot() == before


@pytest.mark.django_db
def test_post_ship_of_an_unpaid_order_is_a_409_and_changes_nothing(client: Client) -> None:
    order = services.place_order(amount="10.00", timeout=600)
    before = snapshot()

    response = post(client, ship_url(order), {"tracking_number": "SF123"})

    assert response.status_code == 409
    assert "Only a paid order can be shipped" in response.json()["error"]
    assert snapshot() == before


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_paid_order_stays_paid_on_a_real_worker_until_the_shop_ships_it(
    celery_worker_process: WorkerProcess,
) -> None:
    # The worker has the built-in provider: a shipping task, had paying sent one, would
    # ship the order within a second.
    order = services.place_order(amount="10.00", timeout=600)
    services.record_payment(order_id=order.pk, payment_ref="pay-1", amount="10.00")
    time.sleep(3)
    assert Order.objects.get(pk=order.pk).status == Status.PAID

    services.ship_order(order_id=order.pk, tracking_number="SF123")

    assert Order.objects.get(pk=order.pk).status == Status.DELIVERED
