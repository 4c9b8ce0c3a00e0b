"""The signed webhooks: payments and parcel statuses, each safe to deliver twice."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
from django.test import Client
from django.utils import timezone
from pytest_django import Settings

from orders import services
from orders.gateways import GatewayError
from orders.models import Order, OrderTransition, Payment, Status

if TYPE_CHECKING:
    from django.test.client import _MonkeyPatchedWSGIResponse as Response

pytestmark = pytest.mark.django_db

SECRET = "test-webhook-secret"
PAYMENT_URL = "/webhooks/payment/"
LOGISTICS_URL = "/webhooks/logistics/"
UNSIGNED = object()
#: In a test's changes to a payload: leave the field out.
DROP = object()


def sign(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def deliver(client: Client, url: str, payload: Any, *, signature: Any = None) -> Response:
    """POST ``payload`` as JSON (bytes as they are), signed unless told otherwise."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    if signature is None:
        signature = sign(body)
    headers = {} if signature is UNSIGNED else {"X-Orders-Signature": signature}
    return client.post(url, body, content_type="application/json", headers=headers)


def payment_for(order: Order, **changes: Any) -> dict[str, Any]:
    return {"order_id": str(order.pk), "payment_ref": "pay-1", "amount": "12.50"} | changes


def parcel(order: Order, status: Any) -> dict[str, Any]:
    return {"order_id": str(order.pk), "status": status}


def transitions(order: Order) -> list[str]:
    return list(order.history.values_list("transition", flat=True))


class FailingGateway:
    """A payment gateway that is down."""

    def refund(
        self, *, payment_ref: str, amount: Decimal, currency: str, idempotency_key: str
    ) -> str:
        raise GatewayError("connection refused")


# Payments -----------------------------------------------------------------------------


def test_payment_webhook_pays_the_order(client: Client, order: Order) -> None:
    response = deliver(client, PAYMENT_URL, payment_for(order))

    assert response.status_code == 200
    body = response.json()
    assert body["payment"] == {
        "reference": "pay-1",
        "outcome": "accepted",
        "amount": "12.50",
        "currency": "CNY",
        "refunded": False,
    }
    assert (body["order"]["status"], body["order"]["payment_ref"]) == ("paid", "pay-1")
    assert body["order"]["history"][-1]["transition"] == "pay"
    assert body["order"]["history"][-1]["by"] == "payment webhook"
    order.refresh_from_db()
    assert order.status == Status.PAID
    assert transitions(order) == ["pay"]


def test_duplicate_payment_webhook_changes_nothing(client: Client, order: Order) -> None:
    first = deliver(client, PAYMENT_URL, payment_for(order))
    paid_at = Order.objects.get(pk=order.pk).paid_at

    second = deliver(client, PAYMENT_URL, payment_for(order))

    assert second.status_code == 200
    assert second.json() == first.json()
    assert Payment.objects.count() == 1
    order.refresh_from_db()
    assert (order.status, order.paid_at) == (Status.PAID, paid_at)
    assert transitions(order) == ["pay"]


def test_payment_after_cancellation_is_late_kept_and_refundable(
    client: Client, order: Order
) -> None:
    services.cancel_order(order_id=order.pk, by="customer")

    response = deliver(client, PAYMENT_URL, payment_for(order))

    assert response.status_code == 200
    body = response.json()
    assert (body["payment"]["outcome"], body["payment"]["refunded"]) == ("late", False)
    assert body["order"]["status"] == "cancelled"
    payment = Payment.objects.get()
    assert (payment.order_id, payment.outcome, payment.refunded_at) == (order.pk, "late", None)
    order.refresh_from_db()
    assert (order.status, order.cancel_reason) == (Status.CANCELLED, "customer")

    # In production the refund task queued on commit does this.
    services.refund_payment(payment_id=payment.pk)

    payment.refresh_from_db()
    assert payment.refunded_at is not None
    assert payment.refund_ref
    again = deliver(client, PAYMENT_URL, payment_for(order))
    assert again.json()["payment"]["refunded"] is True


def test_payment_after_the_deadline_expires_the_order_and_is_late(client: Client) -> None:
    order = services.place_order(
        amount="12.50", timeout=60, now=timezone.now() - timedelta(minutes=5)
    )

    response = deliver(client, PAYMENT_URL, payment_for(order))

    assert response.status_code == 200
    assert response.json()["payment"]["outcome"] == "late"
    order.refresh_from_db()
    assert (order.status, order.cancel_reason) == (Status.CANCELLED, "timeout")
    expiry = order.history.get()
    assert (expiry.transition, expiry.actor) == ("expire", "payment webhook")
    assert Payment.objects.get().outcome == "late"


@pytest.mark.parametrize(
    "changes",
    [{"amount": "12.49"}, {"amount": 13}, {"currency": "USD"}],
    ids=["amount-short", "amount-over", "currency"],
)
def test_payment_that_does_not_match_the_order_is_a_mismatch(
    client: Client, order: Order, changes: dict[str, Any]
) -> None:
    response = deliver(client, PAYMENT_URL, payment_for(order, **changes))

    assert response.status_code == 200
    assert response.json()["payment"]["outcome"] == "mismatch"
    order.refresh_from_db()
    assert order.status == Status.CREATED
    assert Payment.objects.get().outcome == "mismatch"


def test_payment_on_a_paid_order_is_a_surplus(client: Client, paid_order: Order) -> None:
    response = deliver(client, PAYMENT_URL, payment_for(paid_order, payment_ref="pay-2"))

    assert response.status_code == 200
    assert response.json()["payment"]["outcome"] == "surplus"
    assert transitions(paid_order) == ["pay"]


def test_payment_ref_already_used_for_another_order_is_400(
    client: Client, paid_order: Order
) -> None:
    other = services.place_order(amount="12.50")

    response = deliver(client, PAYMENT_URL, payment_for(other))

    assert response.status_code == 400
    assert "pay-1" in response.json()["error"]
    assert Order.objects.get(pk=other.pk).status == Status.CREATED


@pytest.mark.parametrize("order_id", [str(uuid.uuid4()), "nope"], ids=["unknown", "malformed"])
def test_payment_for_unknown_order_is_404(client: Client, order_id: str) -> None:
    payload = {"order_id": order_id, "payment_ref": "p", "amount": "1.00"}

    response = deliver(client, PAYMENT_URL, payload)

    assert response.status_code == 404
    assert "No order" in response.json()["error"]
    assert not Payment.objects.exists()


# Signatures ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "signature",
    [
        pytest.param(UNSIGNED, id="missing"),
        pytest.param("", id="empty"),
        pytest.param("deadbeef", id="garbage"),
        pytest.param("\u00e9" * 64, id="non-ascii"),
        pytest.param(sign(b"{}", "another-secret"), id="other-secret"),
        pytest.param(sign(b'{"order_id": "x"}'), id="other-body"),
    ],
)
def test_badly_signed_payment_is_401_and_records_nothing(
    client: Client, order: Order, signature: Any
) -> None:
    response = deliver(client, PAYMENT_URL, payment_for(order), signature=signature)

    assert response.status_code == 401
    assert "X-Orders-Signature" in response.json()["error"]
    assert not Payment.objects.exists()
    assert Order.objects.get(pk=order.pk).status == Status.CREATED


def test_signature_over_a_different_body_is_401(client: Client, paid_order: Order) -> None:
    signed = json.dumps({"order_id": str(paid_order.pk), "status": "in_transit"}).encode()
    sent = json.dumps(parcel(paid_order, "returned")).encode()

    response = deliver(client, LOGISTICS_URL, sent, signature=sign(signed))

    assert response.status_code == 401
    assert Order.objects.get(pk=paid_order.pk).status == Status.PAID


def test_webhooks_refuse_everything_when_no_secret_is_configured(
    client: Client, settings: Settings, order: Order
) -> None:
    settings.ORDERS = settings.ORDERS | {"WEBHOOK_SECRET": ""}
    body = json.dumps(payment_for(order)).encode()

    for signature in (sign(body, ""), sign(body)):
        response = deliver(client, PAYMENT_URL, body, signature=signature)
        assert response.status_code == 503
        assert "not configured" in response.json()["error"]
    assert not Payment.objects.exists()


def test_webhooks_need_no_csrf_token(order: Order) -> None:
    response = deliver(Client(enforce_csrf_checks=True), PAYMENT_URL, payment_for(order))

    assert response.status_code == 200


@pytest.mark.parametrize("url", [PAYMENT_URL, LOGISTICS_URL])
def test_get_on_a_webhook_is_405(client: Client, url: str) -> None:
    response = client.get(url)

    assert response.status_code == 405
    assert response["Allow"] == "POST"
    assert response.json()["error"]


# Malformed bodies ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "body", [b"order_id=1", b"", b"[]", b'"pay-1"'], ids=["form", "empty", "array", "string"]
)
def test_payment_body_that_is_not_a_json_object_is_400(
    client: Client, order: Order, body: bytes
) -> None:
    response = deliver(client, PAYMENT_URL, body)

    assert response.status_code == 400
    assert "JSON" in response.json()["error"]
    assert not Payment.objects.exists()


@pytest.mark.parametrize(
    ("changes", "mentions"),
    [
        pytest.param({"order_id": DROP}, "order_id", id="order-id-missing"),
        pytest.param({"order_id": 1}, "order_id", id="order-id-number"),
        pytest.param({"payment_ref": DROP}, "payment_ref", id="payment-ref-missing"),
        pytest.param({"payment_ref": ""}, "payment_ref", id="payment-ref-empty"),
        pytest.param({"payment_ref": 7}, "payment_ref", id="payment-ref-number"),
        pytest.param({"payment_ref": "p" * 129}, "payment_ref", id="payment-ref-too-long"),
        pytest.param({"amount": DROP}, "amount", id="amount-missing"),
        pytest.param({"amount": 12.5}, "amount", id="amount-float"),
        pytest.param({"amount": "abc"}, "amount", id="amount-not-a-number"),
        pytest.param({"amount": "-12.50"}, "amount", id="amount-negative"),
        pytest.param({"currency": "EURO"}, "currency", id="currency-bad"),
    ],
)
def test_malformed_payment_is_400_and_changes_nothing(
    client: Client, order: Order, changes: dict[str, Any], mentions: str
) -> None:
    payload = {k: v for k, v in (payment_for(order) | changes).items() if v is not DROP}

    response = deliver(client, PAYMENT_URL, payload)

    assert response.status_code == 400
    assert mentions in response.json()["error"]
    assert not Payment.objects.exists()
    order.refresh_from_db()
    assert order.status == Status.CREATED
    assert transitions(order) == []


# Logistics ----------------------------------------------------------------------------


def test_returned_parcel_refunds_and_closes_the_paid_order(
    client: Client, paid_order: Order
) -> None:
    response = deliver(client, LOGISTICS_URL, parcel(paid_order, "returned"))

    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["cancel_reason"]) == ("cancelled", "refund")
    assert body["refunded_at"] is not None
    assert [(s["transition"], s["by"]) for s in body["history"]] == [
        ("pay", "payment gateway"),
        ("refund", "logistics webhook"),
        ("close", "system"),
    ]
    paid_order.refresh_from_db()
    assert (paid_order.status, paid_order.cancel_reason) == (Status.CANCELLED, "refund")
    assert paid_order.refund_ref
    assert Payment.objects.get().refunded_at is not None


def test_returned_parcel_of_a_delivered_order_is_refunded(
    client: Client, paid_order: Order
) -> None:
    services.ship_order(order_id=paid_order.pk)

    response = deliver(client, LOGISTICS_URL, parcel(paid_order, "returned"))

    assert response.status_code == 200
    assert transitions(paid_order) == ["pay", "ship", "refund", "close"]


def test_duplicate_returned_parcel_refunds_once(client: Client, paid_order: Order) -> None:
    payload = parcel(paid_order, "returned")
    deliver(client, LOGISTICS_URL, payload)
    refund_ref = Payment.objects.get().refund_ref

    response = deliver(client, LOGISTICS_URL, payload)

    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert OrderTransition.objects.filter(order=paid_order, transition="refund").count() == 1
    assert Payment.objects.get().refund_ref == refund_ref


def test_parcel_in_transit_changes_nothing(client: Client, paid_order: Order) -> None:
    response = deliver(client, LOGISTICS_URL, parcel(paid_order, "in_transit"))

    assert response.status_code == 200
    assert response.json()["status"] == "paid"
    assert transitions(paid_order) == ["pay"]


@pytest.mark.parametrize(
    "status",
    ["lost", "", "RETURNED", 5, None],
    ids=["unknown", "empty", "case", "number", "missing"],
)
def test_bad_parcel_status_is_400_and_changes_nothing(
    client: Client, paid_order: Order, status: Any
) -> None:
    response = deliver(client, LOGISTICS_URL, parcel(paid_order, status))

    assert response.status_code == 400
    assert "status" in response.json()["error"]
    assert transitions(paid_order) == ["pay"]


@pytest.mark.parametrize("order_id", [str(uuid.uuid4()), "nope"], ids=["unknown", "malformed"])
def test_parcel_status_for_unknown_order_is_404(client: Client, order_id: str) -> None:
    response = deliver(client, LOGISTICS_URL, {"order_id": order_id, "status": "returned"})

    assert response.status_code == 404
    assert response.json()["error"]


def test_gateway_failure_is_502_and_leaves_the_order_paid(
    client: Client, settings: Settings, paid_order: Order
) -> None:
    settings.ORDERS = settings.ORDERS | {"PAYMENT_GATEWAY": "tests.test_webhooks.FailingGateway"}

    response = deliver(client, LOGISTICS_URL, parcel(paid_order, "returned"))

    assert response.status_code == 502
    assert "connection refused" in response.json()["error"]
    paid_order.refresh_from_db()
    assert paid_order.status == Status.PAID
    assert Payment.objects.get().refunded_at is None
