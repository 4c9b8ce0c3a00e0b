"""The JSON API: Bearer token, JSON in and out, every refusal a clear JSON error."""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
from django.test import Client
from pytest_django import DjangoAssertNumQueries, Settings

from orders import get_order_model, services
from orders.models import AbstractOrder, IdempotencyRecord, OrderTransition, Payment, Status
from tests.conftest import at_once
from tests.dbstate import snapshot

Order = get_order_model()

if TYPE_CHECKING:
    from django.test.client import _MonkeyPatchedWSGIResponse as Response

pytestmark = pytest.mark.django_db

TOKEN = "test-api-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ORDERS_URL = "/api/orders/"

ORDER_KEYS = {
    "id",
    "status",
    "amount",
    "currency",
    "created_at",
    "expires_at",
    "paid_at",
    "delivered_at",
    "refunded_at",
    "cancelled_at",
    "cancel_reason",
    "payment_ref",
    "tracking_number",
    "reference",
    "metadata",
    "time_left_seconds",
    "history",
    "original_expires_at",
    "payment_attempts",
}
ATTEMPT_KEYS = {
    "attempt_ref",
    "method",
    "status",
    "started_at",
    "hold_until",
    "cap_at",
    "closed_at",
    "detail",
}


def post(
    client: Client, url: str, body: Any = None, *, headers: dict[str, str] | None = None
) -> Response:
    """POST ``body`` as JSON (bytes are sent as they are), with the API token by default."""
    raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    return client.post(
        url, raw, content_type="application/json", headers=AUTH if headers is None else headers
    )


def order_url(order: AbstractOrder | str, action: str = "") -> str:
    order_id = order.pk if isinstance(order, AbstractOrder) else order
    return f"{ORDERS_URL}{order_id}/" + (f"{action}/" if action else "")


# Creating -----------------------------------------------------------------------------


def test_create_order_returns_201_with_the_order_and_its_location(client: Client) -> None:
    response = post(
        client, ORDERS_URL, {"amount": "12.50", "currency": "USD", "timeout_seconds": 600}
    )

    assert response.status_code == 201
    body = response.json()
    assert set(body) == ORDER_KEYS
    assert response["Location"] == order_url(body["id"])
    assert body["status"] == "created"
    assert body["amount"] == "12.50"
    assert body["currency"] == "USD"
    # The history starts with the order's placing, by the shop, when it was created.
    assert body["history"] == [
        {
            "from": "",
            "to": "created",
            "transition": "place",
            "by": "shop (api)",
            "at": body["created_at"],
            "reason": "",
        }
    ]
    for key in (
        "paid_at",
        "delivered_at",
        "refunded_at",
        "cancelled_at",
        "cancel_reason",
        "payment_ref",
        "tracking_number",
    ):
        assert body[key] is None, key
    created_at = datetime.fromisoformat(body["created_at"])
    assert datetime.fromisoformat(body["expires_at"]) == created_at + timedelta(seconds=600)
    assert 599 < body["time_left_seconds"] <= 600
    order = Order.objects.get(pk=body["id"])
    assert (order.status, order.amount, order.currency) == (Status.CREATED, Decimal("12.50"), "USD")
    assert order.expires_at == created_at + timedelta(seconds=600)


def test_create_order_defaults_to_1800_seconds_and_the_default_currency(client: Client) -> None:
    response = post(client, ORDERS_URL, {"amount": "5"})

    assert response.status_code == 201
    body = response.json()
    assert body["amount"] == "5.00"
    assert body["currency"] == "CNY"
    expires_at = datetime.fromisoformat(body["expires_at"])
    assert expires_at - datetime.fromisoformat(body["created_at"]) == timedelta(seconds=1800)


def test_create_order_accepts_a_whole_amount_as_a_json_number(client: Client) -> None:
    response = post(client, ORDERS_URL, {"amount": 12, "currency": "eur"})

    assert response.status_code == 201
    assert (response.json()["amount"], response.json()["currency"]) == ("12.00", "EUR")


def test_a_json_number_with_a_zero_fraction_is_a_whole_number(client: Client) -> None:
    # JSON (and JSON Schema) has one number type: 12.0 is the integer 12, and 600.0 seconds
    # are 600. A fraction is still refused for an amount (test below).
    response = post(client, ORDERS_URL, b'{"amount": 12.0, "timeout_seconds": 600.0}')

    assert response.status_code == 201
    assert response.json()["amount"] == "12.00"


@pytest.mark.parametrize(
    "currency", ["\u00dfab", "\ufb00a", "\u0131sk"], ids=["sharp-s", "ligature", "dotless-i"]
)
def test_a_currency_that_only_upper_cases_to_three_letters_is_400(
    client: Client, currency: str
) -> None:
    # "ßab".upper() is "SSAB" and "ﬀa".upper() "FFA": letters are checked before upper().
    response = post(client, ORDERS_URL, {"amount": "1.00", "currency": currency})

    assert response.status_code == 400
    assert not Order.objects.exists()


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        pytest.param(b"amount=12.50", "JSON", id="not-json"),
        pytest.param(b"", "JSON", id="empty-body"),
        pytest.param(b'{"amount": "\xff"}', "JSON", id="not-utf8"),
        pytest.param(b"[" * 100_000, "JSON", id="deeply-nested"),
        pytest.param(b'["12.50"]', "JSON object", id="array"),
        pytest.param(b'"12.50"', "JSON object", id="string"),
        pytest.param({}, "amount", id="amount-missing"),
        pytest.param({"amount": None}, "amount", id="amount-null"),
        pytest.param({"amount": "0"}, "amount", id="amount-zero"),
        pytest.param({"amount": "-1.00"}, "amount", id="amount-negative"),
        pytest.param({"amount": 12.5}, "amount", id="amount-float"),
        pytest.param({"amount": "abc"}, "amount", id="amount-not-a-number"),
        pytest.param({"amount": "NaN"}, "amount", id="amount-nan"),
        pytest.param({"amount": "1.234"}, "amount", id="amount-three-decimals"),
        pytest.param({"amount": "12345678901"}, "amount", id="amount-too-many-digits"),
        pytest.param({"amount": True}, "amount", id="amount-bool"),
        pytest.param({"amount": ["12.50"]}, "amount", id="amount-array"),
        pytest.param({"amount": "1", "currency": "EURO"}, "currency", id="currency-long"),
        pytest.param({"amount": "1", "currency": "C1Y"}, "currency", id="currency-digit"),
        pytest.param({"amount": "1", "currency": ""}, "currency", id="currency-empty"),
        pytest.param({"amount": "1", "currency": 978}, "currency", id="currency-number"),
        pytest.param({"amount": "1", "timeout_seconds": 0}, "timeout", id="timeout-zero"),
        pytest.param({"amount": "1", "timeout_seconds": -60}, "timeout", id="timeout-negative"),
        pytest.param({"amount": "1", "timeout_seconds": 10**9}, "timeout", id="timeout-huge"),
        pytest.param(b'{"amount": "1", "timeout_seconds": 1e999}', "timeout", id="timeout-inf"),
        pytest.param(
            {"amount": "1", "timeout_seconds": "600"}, "timeout_seconds", id="timeout-string"
        ),
        pytest.param(
            {"amount": "1", "timeout_seconds": True}, "timeout_seconds", id="timeout-bool"
        ),
        pytest.param({"amount": "1", "timeout": 600}, "timeout", id="unknown-field"),
    ],
)
def test_create_order_rejects_bad_input_with_400(client: Client, body: Any, mentions: str) -> None:
    response = post(client, ORDERS_URL, body)

    assert response.status_code == 400
    assert mentions in response.json()["error"]
    assert not Order.objects.exists()


# Values that once reached past the checks in orders.services into a 500.
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            b'{"amount": "1e30"}',
            id="amount-1e30",
        ),
        pytest.param(
            b'{"amount": "1", "timeout_seconds": 1' + b"0" * 400 + b"}",
            id="timeout-10**400",
        ),
        pytest.param(
            b'{"amount": "1", "currency": "CNY\\n"}',
            id="currency-trailing-newline",
        ),
    ],
)
def test_create_order_rejects_pathological_input_with_400(client: Client, body: bytes) -> None:
    response = post(client, ORDERS_URL, body)

    assert response.status_code == 400
    assert not Order.objects.exists()


def test_create_order_refuses_a_body_over_the_upload_limit_with_413(
    client: Client, settings: Settings
) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10

    response = post(client, ORDERS_URL, {"amount": "12.50", "currency": "CNY"})

    assert response.status_code == 413
    assert "too large" in response.json()["error"]
    assert not Order.objects.exists()


# Safe to retry: the Idempotency-Key header --------------------------------------------


def keyed(key: str) -> dict[str, str]:
    return AUTH | {"Idempotency-Key": key}


def stored() -> dict[str, Any]:
    """What a replayed or refused create must leave as it was."""
    return {
        "orders": list(Order.objects.order_by("pk").values()),
        "history": OrderTransition.objects.count(),
        "keys": list(IdempotencyRecord.objects.order_by("pk").values()),
    }


def test_the_same_key_and_body_answer_with_the_first_order(client: Client) -> None:
    body = {"amount": "12.50", "timeout_seconds": 600}
    first = post(client, ORDERS_URL, body, headers=keyed("k-1"))
    # The order moves on; the retry still gets the answer the first request had.
    services.cancel_order(order_id=first.json()["id"], by="customer")
    before = stored()

    again = post(client, ORDERS_URL, body, headers=keyed("k-1"))

    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json() == first.json()
    assert again["Location"] == first["Location"]
    assert again["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first
    assert stored() == before
    assert Order.objects.count() == 1


def test_the_same_key_with_another_body_is_409_and_creates_nothing(client: Client) -> None:
    post(client, ORDERS_URL, {"amount": "12.50"}, headers=keyed("k-1"))
    before = stored()

    response = post(client, ORDERS_URL, {"amount": "99.00"}, headers=keyed("k-1"))

    assert response.status_code == 409
    assert "k-1" in response.json()["error"]
    assert stored() == before


def test_other_keys_and_no_key_place_new_orders(client: Client) -> None:
    body = {"amount": "12.50"}

    answers = [
        post(client, ORDERS_URL, body, headers=keyed("k-1")),
        post(client, ORDERS_URL, body, headers=keyed("k-2")),
        post(client, ORDERS_URL, body),
        post(client, ORDERS_URL, body),
    ]

    assert [a.status_code for a in answers] == [201] * 4
    assert len({a.json()["id"] for a in answers}) == 4
    assert IdempotencyRecord.objects.count() == 2


def test_a_refused_create_keeps_no_key_so_the_fixed_request_may_use_it(client: Client) -> None:
    refused = post(client, ORDERS_URL, {"amount": "-1"}, headers=keyed("k-1"))
    assert refused.status_code == 400
    assert not IdempotencyRecord.objects.exists()

    placed = post(client, ORDERS_URL, {"amount": "1.00"}, headers=keyed("k-1"))

    assert placed.status_code == 201
    assert Order.objects.get().amount == Decimal("1.00")


@pytest.mark.parametrize(
    "key", ["", "k" * 256, "tab\there"], ids=["empty", "too-long", "control-character"]
)
def test_a_malformed_key_is_400_and_creates_nothing(client: Client, key: str) -> None:
    before = stored()

    response = post(client, ORDERS_URL, {"amount": "1.00"}, headers=keyed(key))

    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()["error"]
    assert stored() == before


def test_keys_are_forgotten_by_the_sweep_after_the_ttl(client: Client, settings: Settings) -> None:
    settings.ORDERS = settings.ORDERS | {"IDEMPOTENCY_KEY_TTL": 3600}
    post(client, ORDERS_URL, {"amount": "1.00"}, headers=keyed("k-1"))
    created = IdempotencyRecord.objects.get().created_at

    services.sweep(now=created + timedelta(minutes=59))
    assert IdempotencyRecord.objects.exists()
    services.sweep(now=created + timedelta(minutes=61))
    assert not IdempotencyRecord.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_the_same_key_sent_concurrently_places_one_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client timed out and retried while the first request was still running: eight
    requests with one key at once. The first holds the key while it places the order
    (slowed down here so that the others surely arrive meanwhile); the others wait for
    it and answer with its order."""
    place_order = services.place_order

    def slow_place_order(**kwargs: Any) -> AbstractOrder:
        order = place_order(**kwargs)
        time.sleep(0.5)
        return order

    monkeypatch.setattr(services, "place_order", slow_place_order)
    answers = at_once(
        8, lambda: post(Client(), ORDERS_URL, {"amount": "5.00"}, headers=keyed("k-1"))
    )

    assert [a.status_code for a in answers] == [201] * 8
    assert len({a.json()["id"] for a in answers}) == 1
    assert sum(a.has_header("Idempotent-Replayed") for a in answers) == 7
    assert Order.objects.count() == 1
    assert IdempotencyRecord.objects.count() == 1


# Authentication -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"Authorization": "Bearer wrong-token"}, id="wrong"),
        pytest.param({"Authorization": "Bearer "}, id="empty"),
        pytest.param({"Authorization": f"Basic {TOKEN}"}, id="other-scheme"),
        pytest.param({"Authorization": TOKEN}, id="no-scheme"),
        pytest.param({"Authorization": "Bearer t\u00f6ken"}, id="non-ascii"),
    ],
)
def test_api_refuses_a_missing_or_wrong_token_with_401(
    client: Client, order: AbstractOrder, headers: dict[str, str]
) -> None:
    created = post(client, ORDERS_URL, {"amount": "1"}, headers=headers)
    read = client.get(order_url(order), headers=headers)
    cancelled = post(client, order_url(order, "cancel"), headers=headers)

    for response in (created, read, cancelled):
        assert response.status_code == 401
        assert response["WWW-Authenticate"].startswith("Bearer")
        assert response.json()["error"]
    assert Order.objects.get() == order
    order.refresh_from_db()
    assert order.status == Status.CREATED


def test_api_accepts_the_bearer_scheme_in_any_case(client: Client) -> None:
    headers = {"Authorization": f"bearer {TOKEN}"}

    response = post(client, ORDERS_URL, {"amount": "1"}, headers=headers)

    assert response.status_code == 201


def test_api_refuses_everything_when_no_token_is_configured(
    client: Client, settings: Settings
) -> None:
    settings.ORDERS = settings.ORDERS | {"API_TOKEN": ""}

    for headers in ({"Authorization": "Bearer "}, AUTH):
        response = post(client, ORDERS_URL, {"amount": "1"}, headers=headers)
        assert response.status_code == 503
        assert "not configured" in response.json()["error"]
    assert not Order.objects.exists()


def test_refused_requests_are_logged_without_the_token(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="orders.http"):
        post(client, ORDERS_URL, {"amount": "1"}, headers={"Authorization": "Bearer s3cr3t-guess"})

    [record] = [r for r in caplog.records if r.name == "orders.http"]
    assert record.levelno == logging.WARNING
    assert "401" in record.getMessage()
    assert "s3cr3t-guess" not in caplog.text
    assert TOKEN not in caplog.text


# Reading ------------------------------------------------------------------------------


def test_get_order_returns_it_with_its_history_oldest_first(
    client: Client, paid_order: AbstractOrder
) -> None:
    services.refund_order(order_id=paid_order.pk, by="staff", reason="damaged")

    response = client.get(order_url(paid_order), headers=AUTH)

    assert response.status_code == 200
    body = response.json()
    assert set(body) == ORDER_KEYS
    assert body["id"] == str(paid_order.pk)
    assert (body["status"], body["cancel_reason"]) == ("cancelled", "refund")
    assert body["payment_ref"] == "pay-1"
    assert body["time_left_seconds"] is None
    assert [(s["transition"], s["from"], s["to"], s["by"]) for s in body["history"]] == [
        ("place", "", "created", "shop"),
        ("pay", "created", "paid", "payment gateway"),
        ("refund", "paid", "refunded", "staff"),
        ("close", "refunded", "cancelled", "system"),
    ]
    assert body["history"][2]["reason"] == "damaged"
    assert all(datetime.fromisoformat(step["at"]) for step in body["history"])


def test_get_order_reads_the_history_and_the_payment_attempts_in_one_query_each(
    client: Client, order: AbstractOrder, django_assert_num_queries: DjangoAssertNumQueries
) -> None:
    for attempt_ref in ("att-q-1", "att-q-2"):
        services.start_payment(order_id=order.pk, attempt_ref=attempt_ref, method="card")
    services.record_payment(
        order_id=order.pk, payment_ref="pay-q", amount="12.50", attempt_ref="att-q-2"
    )

    # The order, then its whole history, then all its payment attempts.
    with django_assert_num_queries(3):
        response = client.get(order_url(order), headers=AUTH)

    body = response.json()
    assert len(body["history"]) == 4
    assert [a["status"] for a in body["payment_attempts"]] == ["closed", "paid"]


@pytest.mark.parametrize(
    "order_id",
    [str(uuid.uuid4()), "not-a-uuid", "123", "%20"],
    ids=["unknown", "word", "int", "blank"],
)
def test_get_unknown_or_malformed_order_id_is_404(client: Client, order_id: str) -> None:
    response = client.get(order_url(order_id), headers=AUTH)

    assert response.status_code == 404
    assert "No order" in response.json()["error"]


def test_api_needs_no_csrf_token(order: AbstractOrder) -> None:
    client = Client(enforce_csrf_checks=True)

    response = post(client, order_url(order, "cancel"))

    assert response.status_code == 200


def test_wrong_method_is_405_with_json_and_allow_header(
    client: Client, order: AbstractOrder
) -> None:
    listing = client.get(ORDERS_URL, headers=AUTH)
    deleting = client.delete(order_url(order), headers=AUTH)
    cancel_by_get = client.get(order_url(order, "cancel"), headers=AUTH)

    assert (listing.status_code, listing["Allow"]) == (405, "POST")
    assert (deleting.status_code, deleting["Allow"]) == (405, "GET")
    assert (cancel_by_get.status_code, cancel_by_get["Allow"]) == (405, "POST")
    assert all(r.json()["error"] for r in (listing, deleting, cancel_by_get))
    assert Order.objects.get(pk=order.pk).status == Status.CREATED


# Cancelling ---------------------------------------------------------------------------


def test_cancel_unpaid_order_cancels_it_for_the_customer(
    client: Client, order: AbstractOrder
) -> None:
    response = post(client, order_url(order, "cancel"), {"reason": "changed my mind"})

    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["cancel_reason"]) == ("cancelled", "customer")
    assert body["cancelled_at"] is not None
    assert body["time_left_seconds"] is None
    assert body["history"][0]["transition"] == "place"
    assert body["history"][1:] == [
        {
            "from": "created",
            "to": "cancelled",
            "transition": "cancel",
            "by": "customer (api)",
            "at": body["cancelled_at"],
            "reason": "changed my mind",
        },
    ]
    order.refresh_from_db()
    assert (order.status, order.cancel_reason) == (Status.CANCELLED, "customer")


def test_cancel_needs_no_body(client: Client, order: AbstractOrder) -> None:
    response = post(client, order_url(order, "cancel"))

    assert response.status_code == 200
    [_, cancel] = response.json()["history"]
    assert (cancel["transition"], cancel["reason"]) == ("cancel", "")


@pytest.mark.parametrize(
    "body",
    [{"reason": 5}, {"reason": ["x"]}, {"reason": {}}, {"why": "x"}, [1]],
    ids=["int", "list", "object", "typo", "array"],
)
def test_cancel_with_bad_body_is_400_and_keeps_the_order(
    client: Client, order: AbstractOrder, body: Any
) -> None:
    response = post(client, order_url(order, "cancel"), body)

    assert response.status_code == 400
    assert response.json()["error"]
    order.refresh_from_db()
    assert order.status == Status.CREATED


def test_cancel_paid_order_is_409_and_keeps_it_paid(
    client: Client, paid_order: AbstractOrder
) -> None:
    response = post(client, order_url(paid_order, "cancel"))

    assert response.status_code == 409
    assert "paid" in response.json()["error"]
    paid_order.refresh_from_db()
    assert paid_order.status == Status.PAID


@pytest.mark.parametrize("order_id", [str(uuid.uuid4()), "nope"], ids=["unknown", "malformed"])
def test_cancel_or_extend_unknown_order_is_404(client: Client, order_id: str) -> None:
    assert post(client, order_url(order_id, "cancel")).status_code == 404
    assert post(client, order_url(order_id, "extend"), {"seconds": 60}).status_code == 404


# Extending ----------------------------------------------------------------------------


def test_extend_moves_the_deadline_by_the_seconds(client: Client, order: AbstractOrder) -> None:
    deadline = order.expires_at

    response = post(client, order_url(order, "extend"), {"seconds": 600})

    assert response.status_code == 200
    body = response.json()
    assert datetime.fromisoformat(body["expires_at"]) == deadline + timedelta(seconds=600)
    assert body["time_left_seconds"] > 600
    order.refresh_from_db()
    assert order.expires_at == deadline + timedelta(seconds=600)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"seconds": 0},
        {"seconds": -60},
        {"seconds": "600"},
        {"seconds": True},
        {"seconds": 10**9},
        {"secs": 600},
    ],
    ids=["missing", "zero", "negative", "string", "bool", "huge", "typo"],
)
def test_extend_with_bad_seconds_is_400_and_keeps_the_deadline(
    client: Client, order: AbstractOrder, body: Any
) -> None:
    deadline = order.expires_at

    response = post(client, order_url(order, "extend"), body)

    assert response.status_code == 400
    assert "seconds" in response.json()["error"]
    order.refresh_from_db()
    assert order.expires_at == deadline


def test_extend_paid_order_is_409(client: Client, paid_order: AbstractOrder) -> None:
    response = post(client, order_url(paid_order, "extend"), {"seconds": 600})

    assert response.status_code == 409
    assert response.json()["error"]
    assert Payment.objects.get().order_id == paid_order.pk
    paid_order.refresh_from_db()
    assert paid_order.status == Status.PAID


# The shop's reference and metadata ------------------------------------------------------


def test_create_order_keeps_the_shops_reference_and_metadata(client: Client) -> None:
    metadata = {"channel": "web", "customer_id": 42, "gift": True, "note": None}

    response = post(
        client, ORDERS_URL, {"amount": "12.50", "reference": "shop-1001", "metadata": metadata}
    )

    assert response.status_code == 201
    body = response.json()
    assert (body["reference"], body["metadata"]) == ("shop-1001", metadata)
    order = Order.objects.get(pk=body["id"])
    assert (order.reference, order.metadata) == ("shop-1001", metadata)
    assert client.get(order_url(body["id"]), headers=AUTH).json()["metadata"] == metadata


def test_a_reference_another_order_has_is_a_409_and_changes_nothing(client: Client) -> None:
    first = post(client, ORDERS_URL, {"amount": "12.50", "reference": "shop-1001"}).json()
    before = snapshot()

    response = post(client, ORDERS_URL, {"amount": "99.00", "reference": "shop-1001"})

    assert response.status_code == 409
    assert first["id"] in response.json()["error"]
    assert snapshot() == before


@pytest.mark.parametrize(
    ("field", "value", "mentions"),
    [
        ("reference", "", "reference must be 1 to 128 characters"),
        ("reference", "x" * 129, "reference must be 1 to 128 characters"),
        ("reference", "a\u0000b", "without control characters"),
        ("reference", 1001, "reference must be"),
        ("metadata", ["a"], "metadata must be a JSON object"),
        ("metadata", {"k": {"nested": 1}}, "metadata is flat"),
        ("metadata", {"k": "v\u0000"}, "without NUL"),
        ("metadata", {"k\u0000": "v"}, "without NUL"),
        ("metadata", {"": "v"}, "keys must be 1 to 40 characters"),
        ("metadata", {"k" * 41: "v"}, "keys must be 1 to 40 characters"),
        ("metadata", {"k": "v" * 501}, "at most 500 characters"),
        ("metadata", {f"k{i}": i for i in range(51)}, "at most 50 keys"),
    ],
)
def test_a_bad_reference_or_metadata_is_a_400_and_changes_nothing(
    client: Client, field: str, value: Any, mentions: str
) -> None:
    before = snapshot()

    response = post(client, ORDERS_URL, {"amount": "12.50", field: value})

    assert response.status_code == 400
    assert mentions in response.json()["error"]
    assert snapshot() == before


def test_metadata_with_an_infinite_number_is_a_400_and_changes_nothing(client: Client) -> None:
    before = snapshot()

    response = post(client, ORDERS_URL, b'{"amount": "12.50", "metadata": {"k": 1e400}}')

    assert response.status_code == 400
    assert "finite number" in response.json()["error"]
    assert snapshot() == before


# Payment attempts ---------------------------------------------------------------------


def start(
    client: Client, order: AbstractOrder | str, body: Any, *, headers: dict[str, str] | None = None
) -> Response:
    return post(client, order_url(order, "payment-attempts"), body, headers=headers)


def test_a_payment_attempt_holds_the_order_and_answers_201_with_the_attempt_and_the_order(
    client: Client, order: AbstractOrder
) -> None:
    deadline = order.expires_at  # ten minutes away
    before = datetime.now(tz=deadline.tzinfo)

    response = start(
        client, order, {"attempt_ref": "att-api-1", "method": "card", "hold_for_seconds": 720}
    )

    assert response.status_code == 201
    assert "Location" not in response, "an attempt has no URL of its own"
    body = response.json()
    assert set(body) == ATTEMPT_KEYS | {"order"}
    assert (body["attempt_ref"], body["method"], body["status"]) == ("att-api-1", "card", "open")
    assert (body["closed_at"], body["detail"]) == (None, "")
    started, hold_until = (datetime.fromisoformat(body[k]) for k in ("started_at", "hold_until"))
    assert before <= started <= datetime.now(tz=deadline.tzinfo)
    assert hold_until == started + timedelta(seconds=720)
    # The card's cap (15 minutes, ORDERS["PAYMENT_HOLD"]), whatever the hold asked for.
    assert datetime.fromisoformat(body["cap_at"]) == started + timedelta(minutes=15)
    held = body["order"]
    assert set(held) == ORDER_KEYS
    assert datetime.fromisoformat(held["expires_at"]) == hold_until
    assert datetime.fromisoformat(held["original_expires_at"]) == deadline
    assert held["payment_attempts"] == [{k: v for k, v in body.items() if k != "order"}]
    assert (held["history"][-1]["transition"], held["history"][-1]["by"]) == (
        "payment_pending",
        "customer (api)",
    )
    order.refresh_from_db()
    assert (order.expires_at, order.original_expires_at) == (hold_until, deadline)


def test_the_same_attempt_again_is_200_with_the_same_attempt_and_changes_nothing(
    client: Client, order: AbstractOrder
) -> None:
    first = start(client, order, {"attempt_ref": "att-api-2", "method": "qr_code"})
    state = snapshot()

    again = start(client, order, {"attempt_ref": "att-api-2", "method": "qr_code"})

    assert (first.status_code, again.status_code) == (201, 200)
    attempt = {k: v for k, v in first.json().items() if k != "order"}
    assert {k: v for k, v in again.json().items() if k != "order"} == attempt
    assert again.json()["order"]["expires_at"] == first.json()["order"]["expires_at"]
    assert snapshot() == state


def test_a_hold_shorter_than_the_time_left_leaves_the_deadline_alone(
    client: Client, order: AbstractOrder
) -> None:
    response = start(
        client, order, {"attempt_ref": "att-api-3", "method": "card", "hold_for_seconds": 60}
    )

    assert response.status_code == 201
    held = response.json()["order"]
    assert datetime.fromisoformat(held["expires_at"]) == order.expires_at
    # Held all the same (the mark the sweep goes by): the shop's deadline is the deadline.
    assert datetime.fromisoformat(held["original_expires_at"]) == order.expires_at
    assert held["payment_attempts"][0]["status"] == "open"


def test_get_order_shows_no_hold_and_no_attempts_for_an_order_nobody_is_paying(
    client: Client, order: AbstractOrder
) -> None:
    body = client.get(order_url(order), headers=AUTH).json()

    assert (body["original_expires_at"], body["payment_attempts"]) == (None, [])


def test_a_payment_for_the_attempt_shows_it_paid_in_the_order(
    client: Client, order: AbstractOrder
) -> None:
    start(client, order, {"attempt_ref": "att-api-4", "method": "card"})
    services.record_payment(
        order_id=order.pk, payment_ref="pay-api-4", amount="12.50", attempt_ref="att-api-4"
    )

    body = client.get(order_url(order), headers=AUTH).json()

    assert body["status"] == "paid"
    [attempt] = body["payment_attempts"]
    assert attempt["status"] == "paid"
    assert attempt["closed_at"] is not None


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        ({"method": "card"}, "attempt_ref"),
        ({"attempt_ref": "att-x"}, "method"),
        ({"attempt_ref": "", "method": "card"}, "attempt_ref"),
        ({"attempt_ref": 12, "method": "card"}, "attempt_ref"),
        ({"attempt_ref": "a" * 129, "method": "card"}, "attempt_ref"),
        ({"attempt_ref": "att-x", "method": "Card"}, "method"),
        ({"attempt_ref": "att-x", "method": "card", "hold_for_seconds": 0}, "hold_for"),
        ({"attempt_ref": "att-x", "method": "card", "hold_for_seconds": -5}, "hold_for"),
        ({"attempt_ref": "att-x", "method": "card", "hold_for_seconds": "600"}, "hold_for"),
        ({"attempt_ref": "att-x", "method": "card", "hold_for_seconds": True}, "hold_for"),
        ({"attempt_ref": "att-x", "method": "card", "hold_for": 600}, "Unknown field"),
    ],
    ids=[
        "no-ref",
        "no-method",
        "empty-ref",
        "number-ref",
        "long-ref",
        "upper-case-method",
        "zero-hold",
        "negative-hold",
        "string-hold",
        "bool-hold",
        "typo",
    ],
)
def test_a_bad_payment_attempt_is_400_and_changes_nothing(
    client: Client, order: AbstractOrder, body: Any, mentions: str
) -> None:
    state = snapshot()

    response = start(client, order, body)

    assert response.status_code == 400
    assert mentions in response.json()["error"]
    assert snapshot() == state


def test_a_payment_attempt_for_a_paid_order_is_409(
    client: Client, paid_order: AbstractOrder
) -> None:
    state = snapshot()

    response = start(client, paid_order, {"attempt_ref": "att-late", "method": "card"})

    assert response.status_code == 409
    assert "paid" in response.json()["error"]
    assert snapshot() == state


@pytest.mark.parametrize("order_id", [str(uuid.uuid4()), "nope"], ids=["unknown", "malformed"])
def test_a_payment_attempt_for_an_unknown_order_is_404(client: Client, order_id: str) -> None:
    response = start(client, order_id, {"attempt_ref": "att-x", "method": "card"})

    assert response.status_code == 404
    assert "No order" in response.json()["error"]
