"""The signed webhooks: payments and parcel statuses, each safe to deliver twice."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
from django.test import Client
from django.utils import timezone
from pytest_django import Settings

from orders import get_order_model, services
from orders.conf import get_settings
from orders.gateways import GatewayError
from orders.models import (
    AbstractOrder,
    IdempotencyRecord,
    OrderTransition,
    ParcelEvent,
    ParcelStatus,
    Payment,
    Status,
)
from tests.conftest import at_once
from tests.redis_server import free_port, publishing_to

Order = get_order_model()

if TYPE_CHECKING:
    from django.test.client import _MonkeyPatchedWSGIResponse as Response

pytestmark = pytest.mark.django_db

PAYMENT_URL = "/webhooks/payment/"
LOGISTICS_URL = "/webhooks/logistics/"
#: Which secret signs for which endpoint (each provider has its own).
SECRET_OF = {PAYMENT_URL: "PAYMENT_WEBHOOK_SECRET", LOGISTICS_URL: "LOGISTICS_WEBHOOK_SECRET"}
#: In a test's changes to a payload: leave the field out.
DROP = object()


def secret(url: str) -> str:
    return str(getattr(get_settings(), SECRET_OF[url]))


def sign(body: bytes, secret: str, msg_id: str, timestamp: int) -> str:
    """The Standard Webhooks signature, computed here from the specification rather than
    by the package the server uses: HMAC-SHA256 of "id.timestamp.body", keyed with the
    base64-decoded secret after "whsec_"."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed(
    url: str,
    body: bytes,
    *,
    secret_for: str | None = None,
    msg_id: str | None = None,
    at: datetime | None = None,
) -> dict[str, str]:
    """Standard Webhooks headers for ``body``, signed with the secret of ``secret_for``
    (by default the endpoint's own), a fresh id and the current time."""
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    timestamp = int((at or timezone.now()).timestamp())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(body, secret(secret_for or url), msg_id, timestamp),
    }


def encoded(payload: Any) -> bytes:
    return payload if isinstance(payload, bytes) else json.dumps(payload).encode()


def deliver(
    client: Client, url: str, payload: Any, *, headers: dict[str, str] | None = None
) -> Response:
    """POST ``payload`` as JSON (bytes as they are), signed for ``url`` unless ``headers``
    are given."""
    body = encoded(payload)
    headers = signed(url, body) if headers is None else headers
    return client.post(url, body, content_type="application/json", headers=headers)


def payment_for(order: AbstractOrder, **changes: Any) -> dict[str, Any]:
    payment = {"order_id": str(order.pk), "payment_ref": "pay-1", "amount": "12.50"}
    return payment | {"currency": "CNY"} | changes


def parcel(order: AbstractOrder, status: Any, **changes: Any) -> dict[str, Any]:
    report = {"order_id": str(order.pk), "tracking_number": order.tracking_number}
    return report | {"status": status} | changes


@pytest.fixture
def shipped_order(paid_order: AbstractOrder) -> AbstractOrder:
    return services.ship_order(order_id=paid_order.pk)


def database() -> dict[str, Any]:
    """What a refused or replayed webhook must leave as it was."""
    return {
        "orders": list(Order.objects.order_by("pk").values()),
        "payments": list(Payment.objects.order_by("pk").values()),
        "history": OrderTransition.objects.count(),
        "parcel events": list(ParcelEvent.objects.order_by("pk").values()),
        "replay records": list(IdempotencyRecord.objects.order_by("pk").values()),
    }


def transitions(order: AbstractOrder) -> list[str]:
    return list(order.history.values_list("transition", flat=True))


class FailingGateway:
    """A payment gateway that is down."""

    def refund(
        self, *, payment_ref: str, amount: Decimal, currency: str, idempotency_key: str
    ) -> str:
        raise GatewayError("connection refused")


# Payments -----------------------------------------------------------------------------


def test_payment_webhook_pays_the_order(client: Client, order: AbstractOrder) -> None:
    response = deliver(client, PAYMENT_URL, payment_for(order))

    assert response.status_code == 200
    body = response.json()
    assert body["payment"] == {
        "reference": "pay-1",
        "outcome": "accepted",
        "amount": "12.50",
        "currency": "CNY",
        "refunded": False,
        "attempt_ref": None,
    }
    assert (body["order"]["status"], body["order"]["payment_ref"]) == ("paid", "pay-1")
    assert body["order"]["history"][-1]["transition"] == "pay"
    assert body["order"]["history"][-1]["by"] == "payment webhook"
    order.refresh_from_db()
    assert order.status == Status.PAID
    assert transitions(order) == ["place", "pay"]


def test_duplicate_payment_webhook_changes_nothing(client: Client, order: AbstractOrder) -> None:
    first = deliver(client, PAYMENT_URL, payment_for(order))
    paid_at = Order.objects.get(pk=order.pk).paid_at

    second = deliver(client, PAYMENT_URL, payment_for(order))

    assert second.status_code == 200
    assert second.json() == first.json()
    assert Payment.objects.count() == 1
    order.refresh_from_db()
    assert (order.status, order.paid_at) == (Status.PAID, paid_at)
    assert transitions(order) == ["place", "pay"]


def test_payment_after_cancellation_is_late_kept_and_refundable(
    client: Client, order: AbstractOrder
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
    placed, expiry = order.history.all()
    assert placed.transition == "place"
    assert (expiry.transition, expiry.actor) == ("expire", "payment webhook")
    assert Payment.objects.get().outcome == "late"


@pytest.mark.parametrize(
    "changes",
    [{"amount": "12.49"}, {"amount": 13}, {"currency": "USD"}],
    ids=["amount-short", "amount-over", "currency"],
)
def test_payment_that_does_not_match_the_order_is_a_mismatch(
    client: Client, order: AbstractOrder, changes: dict[str, Any]
) -> None:
    response = deliver(client, PAYMENT_URL, payment_for(order, **changes))

    assert response.status_code == 200
    assert response.json()["payment"]["outcome"] == "mismatch"
    order.refresh_from_db()
    assert order.status == Status.CREATED
    assert Payment.objects.get().outcome == "mismatch"


def test_payment_on_a_paid_order_is_a_surplus(client: Client, paid_order: AbstractOrder) -> None:
    response = deliver(client, PAYMENT_URL, payment_for(paid_order, payment_ref="pay-2"))

    assert response.status_code == 200
    assert response.json()["payment"]["outcome"] == "surplus"
    assert transitions(paid_order) == ["place", "pay"]


def test_payment_ref_already_used_for_another_order_is_400(
    client: Client, paid_order: AbstractOrder
) -> None:
    other = services.place_order(amount="12.50")

    response = deliver(client, PAYMENT_URL, payment_for(other))

    assert response.status_code == 400
    assert "pay-1" in response.json()["error"]
    assert Order.objects.get(pk=other.pk).status == Status.CREATED


def test_a_payment_naming_its_attempt_pays_the_order_and_closes_the_attempt_as_paid(
    client: Client, order: AbstractOrder
) -> None:
    services.start_payment(order_id=order.pk, attempt_ref="att-w-1", method="card")

    response = deliver(client, PAYMENT_URL, payment_for(order, attempt_ref="att-w-1"))

    assert response.status_code == 200
    body = response.json()
    assert (body["payment"]["outcome"], body["payment"]["attempt_ref"]) == ("accepted", "att-w-1")
    assert body["order"]["status"] == "paid"
    [attempt] = body["order"]["payment_attempts"]
    assert (attempt["attempt_ref"], attempt["status"]) == ("att-w-1", "paid")


def test_a_payment_naming_its_attempt_that_does_not_pay_the_order_fails_the_attempt(
    client: Client, order: AbstractOrder
) -> None:
    services.start_payment(order_id=order.pk, attempt_ref="att-w-2", method="card")

    response = deliver(
        client, PAYMENT_URL, payment_for(order, amount="1.00", attempt_ref="att-w-2")
    )

    assert response.status_code == 200
    body = response.json()
    assert (body["payment"]["outcome"], body["payment"]["attempt_ref"]) == ("mismatch", "att-w-2")
    [attempt] = body["order"]["payment_attempts"]
    assert attempt["status"] == "failed"
    assert "refunded" in attempt["detail"]
    assert body["order"]["status"] == "created"


def test_a_payment_naming_no_attempt_or_an_unknown_one_pays_as_before(
    client: Client, order: AbstractOrder
) -> None:
    services.start_payment(order_id=order.pk, attempt_ref="att-w-3", method="card")

    response = deliver(client, PAYMENT_URL, payment_for(order, attempt_ref=None))
    other = services.place_order(amount="12.50")
    unknown = deliver(
        client, PAYMENT_URL, payment_for(other, payment_ref="pay-2", attempt_ref="att-nobody")
    )

    assert response.status_code == unknown.status_code == 200
    assert response.json()["payment"]["attempt_ref"] is None
    # The order was paid otherwise: its open attempt is closed (here and at the provider).
    [attempt] = response.json()["order"]["payment_attempts"]
    assert (attempt["status"], attempt["detail"]) == ("closed", "the order was paid by pay-1")
    assert unknown.json()["payment"] == unknown.json()["payment"] | {
        "outcome": "accepted",
        "attempt_ref": None,
    }


@pytest.mark.parametrize("order_id", [str(uuid.uuid4()), "nope"], ids=["unknown", "malformed"])
def test_payment_for_unknown_order_is_404(client: Client, order_id: str) -> None:
    payload = {"order_id": order_id, "payment_ref": "p", "amount": "1.00", "currency": "CNY"}

    response = deliver(client, PAYMENT_URL, payload)

    assert response.status_code == 404
    assert "No order" in response.json()["error"]
    assert not Payment.objects.exists()


# Signatures (Standard Webhooks) ------------------------------------------------------


def old_scheme(body: bytes) -> dict[str, str]:
    """The X-Orders-Signature header of the scheme before Standard Webhooks."""
    digest = hmac.new(b"test-webhook-secret", body, hashlib.sha256).hexdigest()
    return {"X-Orders-Signature": digest}


def without(headers: dict[str, str], name: str) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k != name}


def with_(headers: dict[str, str], **changes: str) -> dict[str, str]:
    return headers | {k.replace("_", "-"): v for k, v in changes.items()}


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda h, body: {}, id="no-headers"),
        pytest.param(lambda h, body: without(h, "webhook-id"), id="no-id"),
        pytest.param(lambda h, body: without(h, "webhook-timestamp"), id="no-timestamp"),
        pytest.param(lambda h, body: without(h, "webhook-signature"), id="no-signature"),
        pytest.param(lambda h, body: with_(h, webhook_signature=""), id="empty-signature"),
        pytest.param(lambda h, body: with_(h, webhook_signature="deadbeef"), id="no-version"),
        pytest.param(lambda h, body: with_(h, webhook_signature="v1,!!"), id="bad-base64"),
        pytest.param(
            lambda h, body: with_(h, webhook_signature="v1," + "\u00e9" * 44), id="non-ascii"
        ),
        pytest.param(
            lambda h, body: with_(h, webhook_signature="v2" + h["webhook-signature"][2:]),
            id="other-version",
        ),
        pytest.param(lambda h, body: with_(h, webhook_timestamp="soon"), id="bad-timestamp"),
        pytest.param(lambda h, body: with_(h, webhook_timestamp="nan"), id="nan-timestamp"),
        pytest.param(lambda h, body: with_(h, webhook_id="msg_other"), id="other-id"),
        pytest.param(
            lambda h, body: with_(h, webhook_timestamp=str(int(h["webhook-timestamp"]) + 1)),
            id="other-timestamp",
        ),
        pytest.param(
            lambda h, body: signed(PAYMENT_URL, b'{"order_id": "x"}', msg_id=h["webhook-id"]),
            id="other-body",
        ),
        pytest.param(
            lambda h, body: signed(PAYMENT_URL, body, secret_for=LOGISTICS_URL), id="other-secret"
        ),
        pytest.param(lambda h, body: old_scheme(body), id="old-scheme-alone"),
    ],
)
def test_badly_signed_payment_is_401_and_changes_nothing(
    client: Client, order: AbstractOrder, tamper: Callable[[dict[str, str], bytes], dict[str, str]]
) -> None:
    body = encoded(payment_for(order))
    before = database()

    response = deliver(client, PAYMENT_URL, body, headers=tamper(signed(PAYMENT_URL, body), body))

    assert response.status_code == 401
    assert "Standard Webhooks" in response.json()["error"]
    assert database() == before
    assert Order.objects.get(pk=order.pk).status == Status.CREATED


def test_the_old_scheme_beside_a_good_signature_changes_nothing_either_way(
    client: Client, order: AbstractOrder
) -> None:
    """The old header is ignored, not a second way in: a good Standard Webhooks signature
    is what lets the message through."""
    body = encoded(payment_for(order))

    response = deliver(
        client, PAYMENT_URL, body, headers=signed(PAYMENT_URL, body) | old_scheme(body)
    )

    assert response.status_code == 200


def test_signature_over_a_different_body_is_401(
    client: Client, shipped_order: AbstractOrder
) -> None:
    signed_body = encoded(parcel(shipped_order, "in_transit"))
    sent = encoded(parcel(shipped_order, "returned"))
    before = database()

    response = deliver(client, LOGISTICS_URL, sent, headers=signed(LOGISTICS_URL, signed_body))

    assert response.status_code == 401
    assert database() == before
    assert Order.objects.get(pk=shipped_order.pk).status == Status.DELIVERED


@pytest.mark.parametrize(
    ("url", "signed_for"),
    [(LOGISTICS_URL, PAYMENT_URL), (PAYMENT_URL, LOGISTICS_URL)],
    ids=["payment-signed-to-logistics", "logistics-signed-to-payment"],
)
def test_a_message_signed_for_one_endpoint_is_refused_at_the_other(
    client: Client, shipped_order: AbstractOrder, url: str, signed_for: str
) -> None:
    """The attack seen in the review: a body signed for /webhooks/payment/ posted to
    /webhooks/logistics/ refunded the order. Each provider has its own secret now."""
    body = encoded(
        parcel(shipped_order, "returned") | payment_for(shipped_order, payment_ref="pay-2")
    )
    before = database()

    response = deliver(client, url, body, headers=signed(url, body, secret_for=signed_for))

    assert response.status_code == 401
    assert database() == before
    assert Order.objects.get(pk=shipped_order.pk).status == Status.DELIVERED


@pytest.mark.parametrize(
    ("skew", "status"),
    [
        (timedelta(minutes=-6), 401),
        (timedelta(minutes=6), 401),
        (timedelta(days=-365), 401),
        (timedelta(minutes=-4), 200),
        (timedelta(minutes=4), 200),
    ],
    ids=["6-min-old", "6-min-ahead", "a-year-old", "4-min-old", "4-min-ahead"],
)
def test_a_timestamp_more_than_5_minutes_off_is_refused(
    client: Client, order: AbstractOrder, skew: timedelta, status: int
) -> None:
    body = encoded(payment_for(order))
    before = database()

    response = deliver(
        client, PAYMENT_URL, body, headers=signed(PAYMENT_URL, body, at=timezone.now() + skew)
    )

    assert response.status_code == status
    if status == 401:
        assert "timestamp" in response.json()["error"]
        assert database() == before
    else:
        assert Payment.objects.get().outcome == "accepted"


def test_a_signed_body_that_is_not_utf8_is_refused_and_changes_nothing(
    client: Client, order: AbstractOrder
) -> None:
    body = b'{"order_id": "\xff"}'
    before = database()

    response = deliver(client, PAYMENT_URL, body, headers=signed(PAYMENT_URL, body))

    assert response.status_code == 401
    assert "UTF-8" in response.json()["error"]
    assert database() == before


@pytest.mark.parametrize("msg_id", ["m" * 256, "tab\tin-id"], ids=["too-long", "control"])
def test_a_signed_but_unusable_webhook_id_is_400_and_changes_nothing(
    client: Client, order: AbstractOrder, msg_id: str
) -> None:
    body = encoded(payment_for(order))
    before = database()

    response = deliver(client, PAYMENT_URL, body, headers=signed(PAYMENT_URL, body, msg_id=msg_id))

    assert response.status_code == 400
    assert "webhook-id" in response.json()["error"]
    assert database() == before


@pytest.mark.parametrize("url", [PAYMENT_URL, LOGISTICS_URL])
def test_webhooks_refuse_everything_when_no_secret_is_configured(
    client: Client, settings: Settings, order: AbstractOrder, url: str
) -> None:
    settings.ORDERS = settings.ORDERS | {SECRET_OF[url]: ""}
    body = encoded(payment_for(order))
    before = database()

    response = deliver(client, url, body)

    assert response.status_code == 503
    assert "not configured" in response.json()["error"]
    assert SECRET_OF[url] in response.json()["error"]
    assert database() == before


def test_a_malformed_secret_refuses_with_503(
    client: Client, settings: Settings, order: AbstractOrder
) -> None:
    headers = signed(PAYMENT_URL, encoded(payment_for(order)))
    settings.ORDERS = settings.ORDERS | {"PAYMENT_WEBHOOK_SECRET": "whsec_"}
    before = database()

    response = deliver(client, PAYMENT_URL, payment_for(order), headers=headers)

    assert response.status_code == 503
    assert "whsec_" in response.json()["error"]
    assert database() == before


def test_webhooks_need_no_csrf_token(order: AbstractOrder) -> None:
    response = deliver(Client(enforce_csrf_checks=True), PAYMENT_URL, payment_for(order))

    assert response.status_code == 200


@pytest.mark.parametrize("url", [PAYMENT_URL, LOGISTICS_URL])
def test_get_on_a_webhook_is_405(client: Client, url: str) -> None:
    response = client.get(url)

    assert response.status_code == 405
    assert response["Allow"] == "POST"
    assert response.json()["error"]


# Replays: the same webhook-id again -----------------------------------------------------


def test_a_replayed_payment_gets_the_first_answer_and_changes_nothing(
    client: Client, order: AbstractOrder
) -> None:
    body = encoded(payment_for(order))
    headers = signed(PAYMENT_URL, body)
    first = deliver(client, PAYMENT_URL, body, headers=headers)
    # The order moves on after the first delivery: the replay still gets the first answer.
    services.ship_order(order_id=order.pk)
    before = database()

    again = deliver(client, PAYMENT_URL, body, headers=headers)

    assert (first.status_code, again.status_code) == (200, 200)
    assert again.json() == first.json()
    assert again.json()["order"]["status"] == "paid"
    assert database() == before
    assert Payment.objects.count() == 1
    assert IdempotencyRecord.objects.get().key == headers["webhook-id"]


def test_a_retry_re_signed_with_a_new_timestamp_is_still_a_replay(
    client: Client, shipped_order: AbstractOrder
) -> None:
    """Senders keep the id and sign each attempt anew; the id says it is the same message."""
    body = encoded(parcel(shipped_order, "returned"))
    first = deliver(client, LOGISTICS_URL, body, headers=signed(LOGISTICS_URL, body, msg_id="m1"))
    before = database()

    again = deliver(
        client,
        LOGISTICS_URL,
        body,
        headers=signed(LOGISTICS_URL, body, msg_id="m1", at=timezone.now() + timedelta(minutes=2)),
    )

    assert again.status_code == 200
    assert again.json() == first.json()
    assert database() == before
    assert transitions(shipped_order) == ["place", "pay", "ship", "refund", "close"]


def test_the_same_id_with_another_body_is_409_and_changes_nothing(
    client: Client, shipped_order: AbstractOrder
) -> None:
    first = encoded(parcel(shipped_order, "in_transit"))
    deliver(client, LOGISTICS_URL, first, headers=signed(LOGISTICS_URL, first, msg_id="m1"))
    other = encoded(parcel(shipped_order, "returned"))
    before = database()

    response = deliver(
        client, LOGISTICS_URL, other, headers=signed(LOGISTICS_URL, other, msg_id="m1")
    )

    assert response.status_code == 409
    assert "m1" in response.json()["error"]
    assert database() == before


def test_ids_are_kept_per_endpoint(client: Client, shipped_order: AbstractOrder) -> None:
    """The same id from the two providers names two messages."""
    pay = encoded(payment_for(shipped_order, payment_ref="pay-2"))
    report = encoded(parcel(shipped_order, "in_transit"))

    paid = deliver(client, PAYMENT_URL, pay, headers=signed(PAYMENT_URL, pay, msg_id="m1"))
    parcel_answer = deliver(
        client, LOGISTICS_URL, report, headers=signed(LOGISTICS_URL, report, msg_id="m1")
    )

    assert (paid.status_code, parcel_answer.status_code) == (200, 200)
    assert paid.json()["payment"]["outcome"] == "surplus"
    assert Order.objects.get(pk=shipped_order.pk).parcel_status == ParcelStatus.IN_TRANSIT


# Malformed bodies ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "body", [b"order_id=1", b"", b"[]", b'"pay-1"'], ids=["form", "empty", "array", "string"]
)
def test_payment_body_that_is_not_a_json_object_is_400(
    client: Client, order: AbstractOrder, body: bytes
) -> None:
    before = database()

    response = deliver(client, PAYMENT_URL, body)

    assert response.status_code == 400
    assert "JSON" in response.json()["error"]
    assert database() == before


@pytest.mark.parametrize(
    ("changes", "mentions"),
    [
        pytest.param({"order_id": DROP}, "order_id", id="order-id-missing"),
        pytest.param({"order_id": 1}, "order_id", id="order-id-number"),
        pytest.param({"payment_ref": DROP}, "payment_ref", id="payment-ref-missing"),
        pytest.param({"payment_ref": ""}, "payment_ref", id="payment-ref-empty"),
        pytest.param({"payment_ref": 7}, "payment_ref", id="payment-ref-number"),
        pytest.param({"payment_ref": "p" * 129}, "payment_ref", id="payment-ref-too-long"),
        pytest.param({"attempt_ref": ""}, "attempt_ref", id="attempt-ref-empty"),
        pytest.param({"attempt_ref": 7}, "attempt_ref", id="attempt-ref-number"),
        pytest.param({"attempt_ref": "att\n1"}, "attempt_ref", id="attempt-ref-line-break"),
        pytest.param({"amount": DROP}, "amount", id="amount-missing"),
        pytest.param({"amount": 12.5}, "amount", id="amount-float"),
        pytest.param({"amount": "abc"}, "amount", id="amount-not-a-number"),
        pytest.param({"amount": "-12.50"}, "amount", id="amount-negative"),
        pytest.param({"currency": "EURO"}, "currency", id="currency-bad"),
        pytest.param({"currency": DROP}, "currency", id="currency-missing"),
        pytest.param({"currency": 156}, "currency", id="currency-number"),
        pytest.param(
            {"currency": DROP, "currency_code": "USD"}, "currency_code", id="unknown-field"
        ),
        pytest.param({"note": "hi"}, "note", id="extra-field"),
    ],
)
def test_malformed_payment_is_400_and_changes_nothing(
    client: Client, order: AbstractOrder, changes: dict[str, Any], mentions: str
) -> None:
    payload = {k: v for k, v in (payment_for(order) | changes).items() if v is not DROP}
    before = database()

    response = deliver(client, PAYMENT_URL, payload)

    assert response.status_code == 400
    assert mentions in response.json()["error"]
    assert database() == before
    assert not Payment.objects.exists()
    order.refresh_from_db()
    assert order.status == Status.CREATED
    assert transitions(order) == ["place"]


# Logistics ----------------------------------------------------------------------------


def test_returned_parcel_refunds_and_closes_the_shipped_order(
    client: Client, shipped_order: AbstractOrder
) -> None:
    response = deliver(client, LOGISTICS_URL, parcel(shipped_order, "returned"))

    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["cancel_reason"]) == ("cancelled", "refund")
    assert body["refunded_at"] is not None
    assert [(s["transition"], s["by"]) for s in body["history"]] == [
        ("place", "shop"),
        ("pay", "payment gateway"),
        ("ship", "shipping"),
        ("refund", "logistics webhook"),
        ("close", "system"),
    ]
    shipped_order.refresh_from_db()
    assert (shipped_order.status, shipped_order.cancel_reason) == (Status.CANCELLED, "refund")
    assert shipped_order.refund_ref
    assert Payment.objects.get().refunded_at is not None
    assert list(ParcelEvent.objects.values_list("status", "source")) == [
        ("returned", "logistics webhook")
    ]


def test_duplicate_returned_parcel_under_a_new_id_refunds_once(
    client: Client, shipped_order: AbstractOrder
) -> None:
    payload = parcel(shipped_order, "returned")
    deliver(client, LOGISTICS_URL, payload)
    refund_ref = Payment.objects.get().refund_ref

    response = deliver(client, LOGISTICS_URL, payload)

    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert (
        OrderTransition.objects.filter(order_id=shipped_order.pk, transition="refund").count() == 1
    )
    assert Payment.objects.get().refund_ref == refund_ref
    assert ParcelEvent.objects.count() == 1


def test_parcel_in_transit_is_recorded_and_leaves_the_order_delivered(
    client: Client, shipped_order: AbstractOrder
) -> None:
    response = deliver(client, LOGISTICS_URL, parcel(shipped_order, "in_transit"))

    assert response.status_code == 200
    assert response.json()["status"] == "delivered"
    assert transitions(shipped_order) == ["place", "pay", "ship"]
    assert Order.objects.get(pk=shipped_order.pk).parcel_status == ParcelStatus.IN_TRANSIT


@pytest.mark.parametrize("terminal", ["returned", "delivered"])
@pytest.mark.parametrize("late", ["in_transit", "delivered", "returned"])
def test_no_parcel_status_moves_after_a_terminal_one(
    client: Client, shipped_order: AbstractOrder, terminal: str, late: str
) -> None:
    """The review replayed an old in_transit after the refund and moved the cancelled
    order's parcel back. Delivered and returned are the end of a parcel's journey."""
    deliver(client, LOGISTICS_URL, parcel(shipped_order, terminal))
    before = database()

    response = deliver(client, LOGISTICS_URL, parcel(shipped_order, late))

    assert response.status_code == 200
    assert response.json()["status"] == before["orders"][0]["status"]
    after = database()
    assert after.pop("replay records") != before.pop("replay records")  # a new id, kept
    assert after == before
    assert Order.objects.get(pk=shipped_order.pk).parcel_status == terminal


def test_returned_for_an_order_paid_but_never_shipped_is_409_and_stores_nothing(
    client: Client, paid_order: AbstractOrder
) -> None:
    """The review's returned-for-a-paid-order refunded an order whose parcel never left."""
    before = database()

    response = deliver(
        client, LOGISTICS_URL, parcel(paid_order, "returned", tracking_number="TRK-guess")
    )

    assert response.status_code == 409
    assert "never shipped" in response.json()["error"]
    assert database() == before
    assert Order.objects.get(pk=paid_order.pk).status == Status.PAID


@pytest.mark.parametrize("status", ["returned", "in_transit", "delivered"])
def test_parcel_status_for_an_unpaid_order_is_409_and_stores_nothing(
    client: Client, order: AbstractOrder, status: str
) -> None:
    before = database()

    response = deliver(client, LOGISTICS_URL, parcel(order, status, tracking_number="TRK-1"))

    assert response.status_code == 409
    assert database() == before


def test_parcel_status_with_another_tracking_number_is_409_and_stores_nothing(
    client: Client, shipped_order: AbstractOrder
) -> None:
    before = database()

    response = deliver(
        client, LOGISTICS_URL, parcel(shipped_order, "returned", tracking_number="TRK-other")
    )

    assert response.status_code == 409
    assert "TRK-other" in response.json()["error"]
    assert database() == before


@pytest.mark.parametrize(
    ("changes", "mentions"),
    [
        pytest.param({"status": "lost"}, "status", id="unknown"),
        pytest.param({"status": ""}, "status", id="empty"),
        pytest.param({"status": "RETURNED"}, "status", id="case"),
        pytest.param({"status": 5}, "status", id="number"),
        pytest.param({"status": DROP}, "status", id="missing"),
        pytest.param({"tracking_number": DROP}, "tracking_number", id="no-tracking-number"),
        pytest.param({"tracking_number": 7}, "tracking_number", id="tracking-number-number"),
        pytest.param({"note": "x"}, "note", id="unknown-field"),
    ],
)
def test_bad_parcel_report_is_400_and_changes_nothing(
    client: Client, shipped_order: AbstractOrder, changes: dict[str, Any], mentions: str
) -> None:
    payload = {
        k: v for k, v in (parcel(shipped_order, "returned") | changes).items() if v is not DROP
    }
    before = database()

    response = deliver(client, LOGISTICS_URL, payload)

    assert response.status_code == 400
    assert mentions in response.json()["error"]
    assert database() == before


@pytest.mark.parametrize("order_id", [str(uuid.uuid4()), "nope"], ids=["unknown", "malformed"])
def test_parcel_status_for_unknown_order_is_404(client: Client, order_id: str) -> None:
    payload = {"order_id": order_id, "tracking_number": "TRK-1", "status": "returned"}

    response = deliver(client, LOGISTICS_URL, payload)

    assert response.status_code == 404
    assert response.json()["error"]
    assert not IdempotencyRecord.objects.exists()


def test_gateway_failure_is_502_stores_nothing_and_the_retry_refunds(
    client: Client, settings: Settings, shipped_order: AbstractOrder
) -> None:
    working = settings.ORDERS
    settings.ORDERS = settings.ORDERS | {"PAYMENT_GATEWAY": "tests.test_webhooks.FailingGateway"}
    body = encoded(parcel(shipped_order, "returned"))
    before = database()

    response = deliver(
        client, LOGISTICS_URL, body, headers=signed(LOGISTICS_URL, body, msg_id="m1")
    )

    assert response.status_code == 502
    assert "connection refused" in response.json()["error"]
    assert database() == before, "the parcel event and the id roll back with the refund"

    # The provider retries the same message once the gateway is back: it is judged anew.
    settings.ORDERS = working
    retry = deliver(client, LOGISTICS_URL, body, headers=signed(LOGISTICS_URL, body, msg_id="m1"))

    assert retry.status_code == 200
    assert retry.json()["status"] == "cancelled"
    assert Payment.objects.get().refunded_at is not None


# Keeping ids only as long as needed -----------------------------------------------------


def test_the_sweep_forgets_webhook_ids_after_twice_the_tolerance(
    client: Client, order: AbstractOrder
) -> None:
    deliver(client, PAYMENT_URL, payment_for(order))
    record = IdempotencyRecord.objects.get()

    services.sweep(now=record.created_at + timedelta(minutes=9))
    assert IdempotencyRecord.objects.exists()

    services.sweep(now=record.created_at + timedelta(minutes=11))
    assert not IdempotencyRecord.objects.exists()


# Concurrent duplicates ----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_same_message_delivered_concurrently_acts_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Eight copies of one message at once (the sender timed out and retried, twice
    over). The first holds its claim on the id while it acts (slowed down here, so that
    the others surely arrive meanwhile); they wait for it and answer what it answered."""
    order = services.place_order(amount="12.50", timeout=600)
    body = encoded(payment_for(order))
    headers = signed(PAYMENT_URL, body)
    record_payment = services.record_payment
    acted: list[str] = []

    def slow_record_payment(**kwargs: Any) -> Payment:
        acted.append(kwargs["payment_ref"])
        payment = record_payment(**kwargs)
        time.sleep(0.5)
        return payment

    monkeypatch.setattr(services, "record_payment", slow_record_payment)
    # These threads commit for real: their shipping task goes nowhere, so that the
    # suite's worker (if an earlier test started it) is not shipping the order while
    # the test's tables are truncated (a deadlock seen in CI).
    with publishing_to(f"redis://127.0.0.1:{free_port()}/0"):
        answers = at_once(8, lambda: deliver(Client(), PAYMENT_URL, body, headers=headers))

    assert [a.status_code for a in answers] == [200] * 8
    # The payment reference alone would keep the Payment single; the id keeps the
    # service from running more than once at all.
    assert acted == ["pay-1"]
    assert len({json.dumps(a.json(), sort_keys=True) for a in answers}) == 1
    assert Payment.objects.count() == 1
    assert IdempotencyRecord.objects.count() == 1
    assert transitions(order) == ["place", "pay"], "paid once"
