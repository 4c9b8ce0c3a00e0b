"""Hostile requests, as an attacker or a broken client sends them: each gets a clear 4xx
(never a 500) and leaves the database exactly as it was.

The classes come from the adversarial review of issue 8: auth bypass, bad signatures,
forged admin POSTs, XSS, hostile numbers, huge and nested bodies, wrong content types and
methods, NUL bytes, line breaks in paths, unknown and malformed ids.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from pytest_django import Settings

from orders import get_order_model, services
from orders.logging import PlainFormatter
from orders.models import AbstractOrder
from tests.dbstate import row_counts, snapshot

# The suite's own Standard Webhooks signer (from the specification, not the package the
# server uses): the bad signatures below are each bad for one reason.
from tests.test_webhooks import sign, signed

Order = get_order_model()
#: The prefix of the admin's URL names for the order model, whichever it is.
ADMIN = f"admin:{Order._meta.app_label}_{Order._meta.model_name}"

if TYPE_CHECKING:
    from django.test.client import _MonkeyPatchedWSGIResponse as Response

pytestmark = pytest.mark.django_db

TOKEN = "test-api-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = "application/json"


@dataclass
class World:
    """One order in each state a request could try to move."""

    unpaid: AbstractOrder
    paid: AbstractOrder
    shipped: AbstractOrder

    def path(self, template: str) -> str:
        """``template`` with ``{unpaid}``, ``{paid}``, ``{shipped}``, ``{missing}`` (an id
        no order has) and ``{tracking}`` (the shipped order's tracking number) filled in."""
        for name, value in (
            ("unpaid", self.unpaid.pk),
            ("paid", self.paid.pk),
            ("shipped", self.shipped.pk),
            ("missing", uuid.uuid4()),
            ("tracking", self.shipped.tracking_number),
        ):
            template = template.replace(f"{{{name}}}", str(value))
        return template

    def body(self, value: Any) -> bytes:
        """``value`` as the request body, ids filled in: bytes as they are, a str as
        written (for JSON that json.dumps cannot write, such as NaN), else as JSON."""
        if isinstance(value, bytes):
            return value
        return self.path(value if isinstance(value, str) else json.dumps(value)).encode()


@pytest.fixture
def world() -> World:
    unpaid = services.place_order(amount="12.50", timeout=600)
    paid = services.place_order(amount="12.50", timeout=600)
    services.record_payment(order_id=paid.pk, payment_ref="pay-paid", amount="12.50")
    shipped = services.place_order(amount="12.50", timeout=600)
    services.record_payment(order_id=shipped.pk, payment_ref="pay-shipped", amount="12.50")
    services.ship_order(order_id=shipped.pk)
    return World(*(Order.objects.get(pk=o.pk) for o in (unpaid, paid, shipped)))


@contextmanager
def nothing_changes() -> Iterator[None]:
    """Every row of orders, payments, transitions, parcel events and stored answers
    (tests/dbstate.py) is the same after."""
    before = snapshot()
    yield
    after = snapshot()
    assert row_counts(after) == row_counts(before)
    assert after == before


def send(
    client: Client,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    headers: dict[str, str] | None = None,
    content_type: str = JSON,
) -> Response:
    return client.generic(method, path, body, content_type=content_type, headers=headers or {})


def assert_refused(response: Response, status: int) -> None:
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"] == JSON
    assert response.json()["error"]


API_ENDPOINTS = [
    ("POST", "/api/orders/", {"amount": "12.50"}),
    ("GET", "/api/orders/{unpaid}/", None),
    ("POST", "/api/orders/{unpaid}/cancel/", {"reason": "bypass"}),
    ("POST", "/api/orders/{unpaid}/extend/", {"seconds": 600}),
    ("POST", "/api/orders/{unpaid}/payment-attempts/", {"attempt_ref": "a-9", "method": "card"}),
]
PAY = {"order_id": "{unpaid}", "payment_ref": "p-9", "amount": "12.50", "currency": "CNY"}
PARCEL = {"order_id": "{shipped}", "tracking_number": "{tracking}", "status": "returned"}
WEBHOOKS = [
    ("/webhooks/payment/", PAY),
    ("/webhooks/payment/", PAY | {"amount": "1.00"}),
    ("/webhooks/logistics/", PARCEL),
]
OTHER_PROVIDER = {
    "/webhooks/payment/": "/webhooks/logistics/",
    "/webhooks/logistics/": "/webhooks/payment/",
}


# Authentication ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        pytest.param({}, "", id="no-header"),
        pytest.param({"Authorization": ""}, "", id="empty-header"),
        pytest.param({"Authorization": "Bearer"}, "", id="scheme-only"),
        pytest.param({"Authorization": "Bearer "}, "", id="empty-token"),
        pytest.param({"Authorization": "Bearer garbage"}, "", id="garbage-token"),
        pytest.param({"Authorization": f"Bearer {TOKEN}x"}, "", id="token-plus-one"),
        pytest.param({"Authorization": f"Bearer {TOKEN[:-1]}"}, "", id="token-minus-one"),
        pytest.param({"Authorization": f"Bearer {TOKEN.upper()}"}, "", id="token-upper-case"),
        pytest.param({"Authorization": "Bearer tëst-äpi-tökén"}, "", id="non-ascii-token"),
        pytest.param({"Authorization": f"Basic {TOKEN}"}, "", id="basic-scheme"),
        pytest.param({"Authorization": f"Token {TOKEN}"}, "", id="token-scheme"),
        pytest.param({"Authorization": TOKEN}, "", id="no-scheme"),
        pytest.param({"X-Api-Token": TOKEN}, "", id="other-header"),
        pytest.param({}, f"?token={TOKEN}", id="token-in-query"),
        pytest.param({}, f"?access_token={TOKEN}", id="access-token-in-query"),
        pytest.param({"Cookie": f"token={TOKEN}"}, "", id="token-in-cookie"),
    ],
)
@pytest.mark.parametrize(("method", "template", "payload"), API_ENDPOINTS)
def test_the_api_refuses_anything_but_the_bearer_token(
    client: Client,
    world: World,
    headers: dict[str, str],
    query: str,
    method: str,
    template: str,
    payload: Any,
) -> None:
    body = b"" if payload is None else world.body(payload)
    with nothing_changes():
        response = send(client, method, world.path(template) + query, body, headers=headers)

    assert_refused(response, 401)
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-header"),
        pytest.param(AUTH, id="the-api-write-token"),
        pytest.param({"Authorization": "Bearer garbage"}, id="garbage"),
        pytest.param({"Authorization": "Basic test-metrics-token"}, id="basic-scheme"),
    ],
)
@pytest.mark.parametrize("path", ["/metrics", "/health/"])
def test_operator_reads_refuse_anything_but_the_metrics_token(
    client: Client, world: World, headers: dict[str, str], path: str
) -> None:
    with nothing_changes():
        response = client.get(path, headers=headers)

    if path == "/health/" and not headers:
        # The summary is open; only the details need the token.
        assert "checks" not in response.json()
    else:
        assert_refused(response, 401)


def test_the_api_refuses_everything_when_no_token_is_configured(
    client: Client, world: World, settings: Settings
) -> None:
    settings.ORDERS = settings.ORDERS | {"API_TOKEN": ""}
    with nothing_changes():
        response = send(client, "POST", "/api/orders/", b'{"amount": "1"}', headers=AUTH)
        empty = send(client, "POST", "/api/orders/", b'{"amount": "1"}', headers={})

    assert_refused(response, 503)
    assert_refused(empty, 503)


def _without(name: str) -> Any:
    return lambda path, body: {k: v for k, v in signed(path, body).items() if k != name}


def _stamped(offset: timedelta) -> Any:
    # The time is read when the request is sent, not when the tests are collected.
    return lambda path, body: signed(path, body, at=timezone.now() + offset)


def _with_secret(secret: str) -> Any:
    def headers(path: str, body: bytes) -> dict[str, str]:
        good = signed(path, body)
        msg_id, stamp = good["webhook-id"], int(good["webhook-timestamp"])
        return good | {"webhook-signature": sign(body, secret, msg_id, stamp)}

    return headers


def _signature(edit: Any) -> Any:
    def headers(path: str, body: bytes) -> dict[str, str]:
        good = signed(path, body)
        return good | {"webhook-signature": edit(good["webhook-signature"])}

    return headers


SIX_MINUTES = timedelta(minutes=6)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(lambda path, body: {}, id="unsigned"),
        pytest.param(_without("webhook-signature"), id="no-signature"),
        pytest.param(_without("webhook-id"), id="no-id"),
        pytest.param(_without("webhook-timestamp"), id="no-timestamp"),
        pytest.param(_signature(lambda sig: ""), id="empty-signature"),
        pytest.param(_signature(lambda sig: "v1,garbage"), id="garbage"),
        pytest.param(_signature(lambda sig: sig.removeprefix("v1,")), id="no-version"),
        pytest.param(_signature(lambda sig: "v2," + sig[3:]), id="other-version"),
        pytest.param(_signature(lambda sig: sig[:-4] + "AAA="), id="altered"),
        pytest.param(_signature(lambda sig: sig.lower()), id="lower-case"),
        pytest.param(lambda path, body: signed(path, body + b" "), id="other-body"),
        pytest.param(
            lambda path, body: signed(path, body, secret_for=OTHER_PROVIDER[path]),
            id="other-providers-secret",
        ),
        pytest.param(
            _with_secret("whsec_" + base64.b64encode(TOKEN.encode()).decode()),
            id="api-token-as-secret",
        ),
        pytest.param(_stamped(-SIX_MINUTES), id="six-minutes-old"),
        pytest.param(_stamped(SIX_MINUTES), id="six-minutes-ahead"),
        pytest.param(
            lambda path, body: signed(path, body) | {"webhook-id": "msg_other"}, id="other-id"
        ),
        pytest.param(
            lambda path, body: {
                "X-Orders-Signature": hmac.new(b"x", body, hashlib.sha256).hexdigest()
            },
            id="old-scheme",
        ),
    ],
)
@pytest.mark.parametrize(("path", "payload"), WEBHOOKS)
def test_webhooks_refuse_a_bad_signature(
    client: Client, world: World, headers: Any, path: str, payload: Any
) -> None:
    body = world.body(payload)
    with nothing_changes():
        response = send(client, "POST", path, body, headers=headers(path, body))

    assert_refused(response, 401)


def test_a_correctly_signed_webhook_is_accepted_so_the_refusals_above_are_the_signature(
    client: Client, world: World
) -> None:
    path, payload = WEBHOOKS[0]
    body = world.body(payload)

    response = send(client, "POST", path, body, headers=signed(path, body))

    assert response.status_code == 200
    assert response.json()["payment"]["outcome"] == "accepted"


# Hostile numbers and bodies -----------------------------------------------------------

HOSTILE_NUMBERS = [
    pytest.param("NaN", id="NaN"),
    pytest.param("Infinity", id="Infinity"),
    pytest.param("-Infinity", id="-Infinity"),
    pytest.param("-0", id="minus-zero"),
    pytest.param("-0.0", id="minus-zero-float"),
    pytest.param("1e400", id="1e400"),
    pytest.param("1" + "0" * 4000, id="huge-int"),
    pytest.param("1" + "0" * 5000, id="int-beyond-pythons-limit"),
    pytest.param('"' + "9" * 1_000_000 + '"', id="huge-string"),
    pytest.param('"NaN"', id="string-NaN"),
    pytest.param('"Infinity"', id="string-Infinity"),
    pytest.param('"1e3"', id="string-exponent"),
    pytest.param('"1_000"', id="string-underscore"),
    pytest.param('"\uff11\uff12"', id="string-full-width"),
    pytest.param('"\\u0661"', id="string-arabic-indic"),
    pytest.param('"12.50\\u0000"', id="string-NUL"),
    pytest.param("[1]", id="array"),
    pytest.param("{}", id="object"),
    pytest.param("true", id="bool"),
]


@pytest.mark.parametrize("number", HOSTILE_NUMBERS)
@pytest.mark.parametrize(
    ("path", "template"),
    [
        ("/api/orders/", '{{"amount": {number}}}'),
        ("/api/orders/", '{{"amount": "1.00", "timeout_seconds": {number}}}'),
        ("/api/orders/{unpaid}/extend/", '{{"seconds": {number}}}'),
        (
            "/api/orders/{unpaid}/payment-attempts/",
            '{{"attempt_ref": "a-9", "method": "card", "hold_for_seconds": {number}}}',
        ),
    ],
    ids=["amount", "timeout_seconds", "extend-seconds", "hold_for_seconds"],
)
def test_hostile_numbers_in_the_api_are_400(
    client: Client, world: World, number: str, path: str, template: str
) -> None:
    body = template.format(number=number).encode()
    with nothing_changes():
        response = send(client, "POST", world.path(path), body, headers=AUTH)

    assert_refused(response, 400)
    assert len(response.content) < 1000, "the error does not echo the value back in full"


@pytest.mark.parametrize("number", HOSTILE_NUMBERS)
def test_hostile_amounts_in_the_payment_webhook_are_400(
    client: Client, world: World, number: str
) -> None:
    path = "/webhooks/payment/"
    body = world.body(
        '{"order_id": "{unpaid}", "payment_ref": "p-9", "currency": "CNY", "amount": '
        + number
        + "}"
    )
    with nothing_changes():
        response = send(client, "POST", path, body, headers=signed(path, body))

    assert_refused(response, 400)


NOT_A_JSON_OBJECT = [
    pytest.param(b"", JSON, id="empty"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, JSON, id="nested-arrays"),
    pytest.param(b'{"a":' * 100_000 + b"1" + b"}" * 100_000, JSON, id="nested-objects"),
    pytest.param(b'{"amount": "12.50"', JSON, id="truncated"),
    pytest.param(b'{"amount": "12.50"}{"amount": "1"}', JSON, id="two-objects"),
    pytest.param(b"\xff\xfe{}", JSON, id="bad-utf8"),
    pytest.param(b'["amount", "12.50"]', JSON, id="array"),
    pytest.param(b"null", JSON, id="null"),
    pytest.param(b"amount=12.50", "application/x-www-form-urlencoded", id="form"),
    pytest.param(
        b'--b\r\nContent-Disposition: form-data; name="amount"\r\n\r\n12.50\r\n--b--\r\n',
        "multipart/form-data; boundary=b",
        id="multipart",
    ),
    pytest.param(b"<order><amount>12.50</amount></order>", "application/xml", id="xml"),
    pytest.param(b"amount: 12.50", "application/yaml", id="yaml"),
]


@pytest.mark.parametrize(("body", "content_type"), NOT_A_JSON_OBJECT)
@pytest.mark.parametrize(
    "path",
    [
        "/api/orders/",
        "/api/orders/{unpaid}/extend/",
        "/api/orders/{unpaid}/cancel/",
        "/api/orders/{unpaid}/payment-attempts/",
    ],
)
def test_a_body_that_is_not_a_json_object_is_400_in_the_api(
    client: Client, world: World, body: bytes, content_type: str, path: str
) -> None:
    if body == b"" and path.endswith("/cancel/"):
        pytest.skip("an empty body is a cancel without a reason")
    with nothing_changes():
        response = send(
            client, "POST", world.path(path), body, headers=AUTH, content_type=content_type
        )

    assert_refused(response, 400)


@pytest.mark.parametrize(("body", "content_type"), NOT_A_JSON_OBJECT)
@pytest.mark.parametrize("path", ["/webhooks/payment/", "/webhooks/logistics/"])
def test_a_body_that_is_not_a_json_object_is_400_in_the_webhooks(
    client: Client, world: World, body: bytes, content_type: str, path: str
) -> None:
    with nothing_changes():
        response = send(
            client, "POST", path, body, headers=signed(path, body), content_type=content_type
        )

    # Standard Webhooks signs text: a body that is not UTF-8 fails the signature check.
    assert_refused(response, 401 if body.startswith(b"\xff") else 400)


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/api/orders/", AUTH),
        ("/api/orders/{unpaid}/cancel/", AUTH),
        ("/api/orders/{unpaid}/payment-attempts/", AUTH),
        ("/webhooks/payment/", None),
        ("/webhooks/logistics/", None),
    ],
)
def test_a_body_over_the_upload_limit_is_413(
    client: Client, world: World, settings: Settings, path: str, headers: dict[str, str] | None
) -> None:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    body = b'{"reason": "' + b"x" * limit + b'"}'
    with nothing_changes():
        response = send(
            client, "POST", world.path(path), body, headers=headers or signed(path, body)
        )

    assert_refused(response, 413)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/api/orders/", "POST"),
        ("PUT", "/api/orders/", "POST"),
        ("DELETE", "/api/orders/{unpaid}/", "GET"),
        ("PUT", "/api/orders/{unpaid}/", "GET"),
        ("PATCH", "/api/orders/{unpaid}/", "GET"),
        ("POST", "/api/orders/{unpaid}/", "GET"),
        ("GET", "/api/orders/{unpaid}/cancel/", "POST"),
        ("DELETE", "/api/orders/{unpaid}/cancel/", "POST"),
        ("GET", "/api/orders/{unpaid}/extend/", "POST"),
        ("GET", "/api/orders/{unpaid}/payment-attempts/", "POST"),
        ("PUT", "/api/orders/{unpaid}/payment-attempts/", "POST"),
        ("GET", "/webhooks/payment/", "POST"),
        ("PUT", "/webhooks/logistics/", "POST"),
        ("TRACE", "/api/orders/", "POST"),
        ("PROPFIND", "/api/orders/{unpaid}/", "GET"),
        ("POST", "/api/schema/", "GET"),
    ],
)
def test_a_method_not_allowed_is_405_with_allow(
    client: Client, world: World, method: str, path: str, allowed: str
) -> None:
    with nothing_changes():
        response = send(client, method, world.path(path), b'{"amount": "1"}', headers=AUTH)

    assert_refused(response, 405)
    assert response["Allow"] == allowed


# Payment attempts ---------------------------------------------------------------------

ATTEMPTS = "/api/orders/{unpaid}/payment-attempts/"


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({"attempt_ref": "a-9"}, id="no-method"),
        pytest.param({"method": "card"}, id="no-ref"),
        pytest.param({"attempt_ref": None, "method": "card"}, id="null-ref"),
        pytest.param({"attempt_ref": ["a-9"], "method": "card"}, id="array-ref"),
        pytest.param({"attempt_ref": {"a": 9}, "method": "card"}, id="object-ref"),
        pytest.param({"attempt_ref": 9, "method": "card"}, id="number-ref"),
        pytest.param({"attempt_ref": "a" * 129, "method": "card"}, id="long-ref"),
        pytest.param({"attempt_ref": "a\u2028b", "method": "card"}, id="line-separator-ref"),
        pytest.param({"attempt_ref": "a\x85b", "method": "card"}, id="c1-control-ref"),
        pytest.param({"attempt_ref": "a-9", "method": 1}, id="number-method"),
        pytest.param({"attempt_ref": "a-9", "method": ""}, id="empty-method"),
        pytest.param({"attempt_ref": "a-9", "method": "x" * 33}, id="long-method"),
        pytest.param({"attempt_ref": "a-9", "method": "CARD"}, id="upper-case-method"),
        pytest.param({"attempt_ref": "a-9", "method": "card payment"}, id="space-in-method"),
        pytest.param({"attempt_ref": "a-9", "method": "<script>"}, id="markup-method"),
        pytest.param(
            {"attempt_ref": "a-9", "method": "card", "hold_for_seconds": 10**9},
            id="hold-beyond-max-timeout",
        ),
        pytest.param(
            {"attempt_ref": "a-9", "method": "card", "hold_for_seconds": 1e-300}, id="hold-tiny"
        ),
        pytest.param(
            {"attempt_ref": "a-9", "method": "card", "hold_for_seconds": [600]}, id="hold-array"
        ),
        pytest.param(
            {"attempt_ref": "a-9", "method": "card", "order_id": "{paid}"}, id="unknown-field"
        ),
        pytest.param({"attempt_ref": "a-9", "method": "card", "status": "paid"}, id="status-field"),
    ],
)
def test_a_bad_payment_attempt_is_400_and_changes_nothing(
    client: Client, world: World, payload: dict[str, Any]
) -> None:
    body = world.body(payload)
    with nothing_changes():
        response = send(client, "POST", world.path(ATTEMPTS), body, headers=AUTH)

    assert_refused(response, 400)
    assert len(response.content) < 1000, "the error does not echo the value back in full"


@pytest.mark.parametrize("state", ["paid", "shipped", "cancelled", "expired", "overdue"])
def test_a_payment_attempt_for_an_order_not_awaiting_payment_is_409(
    client: Client, world: World, state: str
) -> None:
    if state in ("paid", "shipped"):
        order = getattr(world, state)
    elif state == "cancelled":
        order = services.cancel_order(order_id=world.unpaid.pk, by="customer")
    else:  # past its deadline: expired, or about to be (its timer has not fired yet)
        order = services.place_order(amount="12.50", timeout=60, now=timezone.now() - SIX_MINUTES)
        if state == "expired":
            services.expire_order(order_id=order.pk)
    path = f"/api/orders/{order.pk}/payment-attempts/"
    body = world.body({"attempt_ref": "a-9", "method": "card"})
    with nothing_changes():
        response = send(client, "POST", path, body, headers=AUTH)

    assert_refused(response, 409)


def test_an_attempt_ref_of_another_order_is_400_and_changes_nothing(
    client: Client, world: World
) -> None:
    other = services.place_order(amount="12.50", timeout=600)
    services.start_payment(order_id=other.pk, attempt_ref="a-other", method="card")
    body = world.body({"attempt_ref": "a-other", "method": "card"})
    with nothing_changes():
        response = send(client, "POST", world.path(ATTEMPTS), body, headers=AUTH)

    assert_refused(response, 400)
    assert "another order" in response.json()["error"]


def test_a_payment_naming_another_orders_attempt_leaves_that_attempt_open(
    client: Client, world: World
) -> None:
    other = services.place_order(amount="12.50", timeout=600)
    services.start_payment(order_id=other.pk, attempt_ref="a-other", method="card")
    path = "/webhooks/payment/"
    body = world.body(PAY | {"attempt_ref": "a-other"})

    response = send(client, "POST", path, body, headers=signed(path, body))

    assert response.status_code == 200
    assert response.json()["payment"]["attempt_ref"] is None
    [attempt] = client.get(f"/api/orders/{other.pk}/", headers=AUTH).json()["payment_attempts"]
    assert attempt["status"] == "open"


# Ids ----------------------------------------------------------------------------------

BAD_IDS = [
    pytest.param("{missing}", id="unknown-uuid"),
    pytest.param("00000000-0000-0000-0000-000000000000", id="nil-uuid"),
    pytest.param("not-a-uuid", id="word"),
    pytest.param("12345", id="number"),
    pytest.param("{unpaid}0", id="uuid-plus-one"),
    pytest.param("' OR '1'='1", id="sql"),
    pytest.param("%00", id="NUL"),
    pytest.param("x" * 2000, id="long"),
]


@pytest.mark.parametrize("order_id", BAD_IDS)
@pytest.mark.parametrize(
    ("method", "action", "payload"),
    [
        ("GET", "", None),
        ("POST", "cancel/", {}),
        ("POST", "extend/", {"seconds": 60}),
        ("POST", "payment-attempts/", {"attempt_ref": "a-9", "method": "card"}),
    ],
)
def test_an_unknown_or_malformed_order_id_is_404_in_the_api(
    client: Client, world: World, order_id: str, method: str, action: str, payload: Any
) -> None:
    path = world.path(f"/api/orders/{order_id}/{action}")
    body = b"" if payload is None else world.body(payload)
    with nothing_changes():
        response = send(client, method, path, body, headers=AUTH)

    assert_refused(response, 404)


@pytest.mark.parametrize(
    "order_id",
    [*BAD_IDS, pytest.param("\x00", id="NUL-char"), pytest.param(42, id="json-number")],
)
@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/webhooks/payment/", {"payment_ref": "p-9", "amount": "12.50", "currency": "CNY"}),
        ("/webhooks/logistics/", {"tracking_number": "{tracking}", "status": "returned"}),
    ],
)
def test_an_unknown_or_malformed_order_id_is_404_or_400_in_the_webhooks(
    client: Client, world: World, order_id: Any, path: str, payload: dict[str, str]
) -> None:
    value = world.path(order_id) if isinstance(order_id, str) else order_id
    body = world.body({**payload, "order_id": value})
    with nothing_changes():
        response = send(client, "POST", path, body, headers=signed(path, body))

    assert_refused(response, 400 if isinstance(order_id, int) else 404)


# NUL bytes and line breaks ------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/api/orders/{unpaid}/cancel/", {"reason": "changed\x00my mind"}),
        ("/api/orders/", {"amount": "12.50", "currency": "CN\x00"}),
        ("/api/orders/", {"amount": "12.50", "\x00": 1}),
        ("/webhooks/payment/", PAY | {"payment_ref": "p\x00"}),
        ("/webhooks/payment/", PAY | {"payment_ref": "p\n9"}),
        ("/webhooks/payment/", PAY | {"currency": "\x00"}),
        ("/webhooks/payment/", PAY | {"attempt_ref": "a\x00"}),
        ("/api/orders/{unpaid}/payment-attempts/", {"attempt_ref": "a\x00", "method": "card"}),
        ("/api/orders/{unpaid}/payment-attempts/", {"attempt_ref": "a-9", "method": "card\x00"}),
        ("/api/orders/{unpaid}/payment-attempts/", {"attempt_ref": "a\n9", "method": "card"}),
        ("/webhooks/logistics/", PARCEL | {"status": "returned\x00"}),
    ],
    ids=[
        "cancel-reason",
        "currency",
        "field-name",
        "payment-ref",
        "payment-ref-newline",
        "payment-currency",
        "payment-attempt-ref",
        "attempt-ref",
        "attempt-method",
        "attempt-ref-newline",
        "parcel-status",
    ],
)
def test_a_nul_byte_is_400_not_a_database_error(
    client: Client, world: World, path: str, payload: dict[str, Any]
) -> None:
    body = world.body(payload)
    headers = signed(path, body) if path.startswith("/webhooks/") else AUTH
    with nothing_changes():
        response = send(client, "POST", world.path(path), body, headers=headers)

    assert_refused(response, 400)


def test_a_nul_in_a_tracking_number_names_no_parcel_409(client: Client, world: World) -> None:
    # Compared with the order's, never stored: another parcel's number, a conflict.
    path = "/webhooks/logistics/"
    body = world.body(PARCEL | {"tracking_number": "{tracking}\x00"})
    with nothing_changes():
        response = send(client, "POST", path, body, headers=signed(path, body))

    assert_refused(response, 409)


def test_a_cancel_reason_over_1000_characters_is_400(client: Client, world: World) -> None:
    body = world.body({"reason": "x" * 1001})
    with nothing_changes():
        response = send(
            client, "POST", world.path("/api/orders/{unpaid}/cancel/"), body, headers=AUTH
        )

    assert_refused(response, 400)
    assert "1000" in response.json()["error"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/orders/abc%0A2026-11-30 09:00:00,000 WARNING orders forged/"),
        ("POST", "/api/orders/abc%0D%0Aforged/cancel/"),
        ("GET", "/api/orders/%E2%80%A8forged/"),
    ],
    ids=["LF", "CRLF", "line-separator"],
)
def test_a_line_break_in_the_path_does_not_forge_a_log_line(
    client: Client, world: World, caplog: pytest.LogCaptureFixture, method: str, path: str
) -> None:
    # The host project's own console formatter (LOG_FORMAT: plain, or json).
    [console] = [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]
    assert console.formatter is not None
    with nothing_changes(), caplog.at_level(logging.WARNING):
        response = send(client, method, path, headers=AUTH)

    assert_refused(response, 404)
    records = [r for r in caplog.records if r.name in ("orders.http", "django.request")]
    assert [r.name for r in records] == ["orders.http", "django.request"]
    for record in records:
        line = console.formatter.format(record)
        assert line.splitlines() == [line]
        assert "forged" in line


def test_the_plain_log_keeps_a_record_on_one_line_and_a_traceback_on_its_own() -> None:
    # What a reason or a reference (logged by the services) could carry, through the host
    # project's console formatter.
    [console] = [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]
    assert isinstance(console.formatter, PlainFormatter), "LOG_FORMAT=plain, the default"
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "orders",
            logging.ERROR,
            "",
            0,
            "Refunded: %s",
            ("a\r\nERROR forged\u2028x",),
            sys.exc_info(),
        )

    lines = console.formatter.format(record).splitlines()

    assert lines[0].endswith("Refunded: a\\r\\nERROR forged\\u2028x")
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: boom"


# The admin ----------------------------------------------------------------------------


def transition_url(order: AbstractOrder, name: str) -> str:
    return reverse(f"{ADMIN}_transition", kwargs={"object_id": order.pk, "transition_name": name})


def staff_client(django_user_model: Any, *codenames: str, is_staff: bool = True) -> Client:
    user = django_user_model.objects.create_user(username="mallory", is_staff=is_staff)
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="orders", codename__in=codenames)
    )
    client = Client()
    client.force_login(user)
    return client


NO_INLINE_ROWS = {
    f"{prefix}-{key}": "0"
    for prefix in ("payments", "payment_attempts", "parcel_events", "history")
    for key in ("TOTAL_FORMS", "INITIAL_FORMS")
}


@pytest.mark.parametrize(
    ("codenames", "is_staff"),
    [
        pytest.param((), False, id="not-staff"),
        pytest.param((), True, id="staff-without-permissions"),
        pytest.param(("view_order",), True, id="view-only"),
        pytest.param(("view_order", "change_order"), True, id="change-without-refund"),
        pytest.param(("view_order", "refund_order"), True, id="refund-without-change"),
        pytest.param(("view_order", "change_order", "cancel_order"), True, id="cancel-not-refund"),
    ],
)
def test_forged_admin_refunds_by_staff_without_the_permission_change_nothing(
    django_user_model: Any, world: World, codenames: tuple[str, ...], is_staff: bool
) -> None:
    client = staff_client(django_user_model, *codenames, is_staff=is_staff)
    change = reverse(f"{ADMIN}_change", args=[world.paid.pk])
    changelist = reverse(f"{ADMIN}_changelist")
    with nothing_changes():
        button = client.post(transition_url(world.paid, "refund"), {"reason": "forged"})
        change_form = client.post(change, {"_fsm_transition_to": "refund", **NO_INLINE_ROWS})
        bulk = client.post(
            changelist,
            {
                "action": "refund_selected",
                "_selected_action": [world.paid.pk, world.shipped.pk],
                "post": "yes",
                "reason": "forged",
                "index": "0",
            },
            follow=True,
        )

    # Refused as the admin refuses: a 403, the login page, back to the page with an
    # error, or (for an action the admin does not offer this user) the list again.
    assert button.status_code in (302, 403)
    assert change_form.status_code in (302, 403)
    assert bulk.status_code in (200, 403)
    assert "Refunded and closed" not in bulk.content.decode()


def test_an_admin_post_without_the_csrf_token_is_403(django_user_model: Any, world: World) -> None:
    admin = django_user_model.objects.create_superuser(username="root", password="x")
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin)
    with nothing_changes():
        response = client.post(transition_url(world.paid, "refund"), {"reason": "csrf"})

    assert response.status_code == 403


def test_an_anonymous_admin_post_goes_to_the_login_page(client: Client, world: World) -> None:
    with nothing_changes():
        response = client.post(transition_url(world.paid, "refund"), {"reason": "anon"})

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


@pytest.mark.parametrize(
    "query",
    [
        {"q": "\x00"},
        {"q": "' OR 1=1 --"},
        {"q": "x" * 10_000},
        {"status__exact": "\x00"},
        {"status__exact": "<script>"},
        {"currency__exact": "\x00"},
        {"late_payment": "\x00"},
        {"expiring": "year"},
        {"o": "99"},
        {"o": "-1.x"},
        {"p": "-1"},
        {"p": "99999999999999999999"},
        {"created_at__day": "abc"},
        {"created_at__year": "\x00"},
        {"created_at__year": "9999", "created_at__month": "12", "created_at__day": "32"},
        {"id__in": "1,2"},
        {"amount__gt": "NaN"},
        {"password__startswith": "x"},
    ],
)
def test_hostile_query_strings_on_the_order_list_are_not_a_server_error(
    admin_client: Client, world: World, query: dict[str, str]
) -> None:
    with nothing_changes():
        response = admin_client.get(reverse(f"{ADMIN}_changelist"), query)

    # 200 (ignored), 302 to ?e=1 (a bad lookup), or 400 (a lookup the admin forbids).
    assert response.status_code in (200, 302, 400), response.status_code


@pytest.mark.parametrize(
    "object_id", ["not-a-uuid", "%00", "{missing}", "' OR 1=1 --", "..%2F..%2Fetc"]
)
@pytest.mark.parametrize(
    ("method", "page"),
    [
        ("GET", "change/"),
        ("POST", "change/"),
        ("GET", "transition/refund/"),
        ("POST", "transition/refund/"),
    ],
)
def test_a_malformed_or_unknown_id_in_an_admin_url_is_not_a_server_error(
    admin_client: Client, world: World, object_id: str, method: str, page: str
) -> None:
    url = world.path(f"/admin/orders/order/{object_id}/{page}")
    with nothing_changes():
        response = admin_client.generic(
            method,
            url,
            "reason=x&_fsm_transition_to=refund",
            content_type="application/x-www-form-urlencoded",
        )

    # Django answers an unknown object with a redirect to the admin and a message.
    assert response.status_code in (302, 404), response.status_code


XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def test_xss_in_a_reason_and_a_payment_reference_is_escaped_in_the_admin(
    admin_client: Client, client: Client, world: World
) -> None:
    # Both are accepted (they are text like any other) and stored as sent.
    paid = world.body(PAY | {"order_id": "{paid}", "payment_ref": XSS})
    payment = "/webhooks/payment/"
    assert send(client, "POST", payment, paid, headers=signed(payment, paid)).status_code == 200
    cancel = world.path("/api/orders/{unpaid}/cancel/")
    assert (
        send(client, "POST", cancel, world.body({"reason": XSS}), headers=AUTH).status_code == 200
    )

    page = admin_client.get(reverse(f"{ADMIN}_change", args=[world.unpaid.pk]))
    listing = admin_client.get(reverse(f"{ADMIN}_changelist"), {"q": XSS[:20]})

    for response in (page, listing):
        assert response.status_code == 200
        content = response.content.decode()
        assert "<script>alert" not in content
        assert "<img src=x" not in content
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page.content.decode()
