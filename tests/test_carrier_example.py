"""The documented carrier example (docs/examples/http_carrier.py) against a stub carrier
on localhost: booking is idempotent, statuses map to ours, failures are GatewayErrors."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from pytest_django import Settings

from docs.examples.http_carrier import HttpCarrier
from orders import services
from orders.gateways import GatewayError
from orders.models import ParcelEvent, Status


class StubCarrier(BaseHTTPRequestHandler):
    bookings: ClassVar[dict[str, str]] = {}
    parcels: ClassVar[dict[str, str]] = {}

    def do_POST(self) -> None:
        if self.headers["Authorization"] != "Bearer k3y":
            return self.answer(401, {"error": "bad key"})
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        key = self.headers["Idempotency-Key"]
        tracking = self.bookings.setdefault(key, f"SF{len(self.bookings) + 1:06d}")
        self.parcels.setdefault(tracking, "IN_TRANSIT")
        self.answer(201, {"tracking_number": tracking, "reference": body["reference"]})

    def do_GET(self) -> None:
        tracking = self.path.rsplit("/", 1)[-1]
        if tracking not in self.parcels:
            return self.answer(404, {"error": "unknown parcel"})
        self.answer(200, {"status": self.parcels[tracking]})

    def answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # keep the test output quiet
        pass


@pytest.fixture
def carrier(settings: Settings) -> Iterator[type[StubCarrier]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubCarrier)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    StubCarrier.bookings, StubCarrier.parcels = {}, {}
    settings.CARRIER = {"BASE_URL": f"http://127.0.0.1:{server.server_port}/", "API_KEY": "k3y"}
    settings.ORDERS = settings.ORDERS | {
        "LOGISTICS_PROVIDER": "docs.examples.http_carrier.HttpCarrier"
    }
    yield StubCarrier
    server.shutdown()
    server.server_close()


def test_booking_the_same_shipment_twice_gives_one_tracking_number(
    carrier: type[StubCarrier],
) -> None:
    provider = HttpCarrier()
    first = provider.create_shipment(order_id="o-1", idempotency_key="ship:o-1")
    again = provider.create_shipment(order_id="o-1", idempotency_key="ship:o-1")

    assert first == again == "SF000001"
    assert len(carrier.bookings) == 1


@pytest.mark.parametrize(
    ("theirs", "ours"),
    [
        ("IN_TRANSIT", "in_transit"),
        ("OUT_FOR_DELIVERY", "in_transit"),
        ("DELIVERED", "delivered"),
        ("RETURNED_TO_SENDER", "returned"),
    ],
)
def test_carrier_statuses_map_to_ours(carrier: type[StubCarrier], theirs: str, ours: str) -> None:
    provider = HttpCarrier()
    tracking = provider.create_shipment(order_id="o-1", idempotency_key="ship:o-1")
    carrier.parcels[tracking] = theirs

    assert provider.parcel_status(tracking_number=tracking) == ours


def test_carrier_errors_become_gateway_errors(
    carrier: type[StubCarrier], settings: Settings
) -> None:
    with pytest.raises(GatewayError, match="404"):
        HttpCarrier().parcel_status(tracking_number="nope")
    settings.CARRIER = settings.CARRIER | {"API_KEY": "wrong"}
    with pytest.raises(GatewayError, match="401"):
        HttpCarrier().create_shipment(order_id="o-1", idempotency_key="ship:o-1")


@pytest.mark.django_db
def test_shop_ships_and_refunds_a_returned_parcel_through_the_carrier(
    carrier: type[StubCarrier],
) -> None:
    order = services.place_order(amount="10.00")
    services.record_payment(order_id=order.pk, payment_ref="pay-1", amount="10.00")
    order = services.ship_order(order_id=order.pk)
    assert order.tracking_number == "SF000001"

    carrier.parcels[order.tracking_number] = "RETURNED"
    assert order.parcel_next_check_at is not None
    services.poll_parcels(now=order.parcel_next_check_at)

    order.refresh_from_db()
    assert order.status == Status.CANCELLED
    assert list(ParcelEvent.objects.filter(order_id=order.pk).values_list("status", flat=True)) == [
        "returned"
    ]
