"""The OpenAPI description: served open at /api/schema/, copied in docs/openapi.json, and
the API and webhooks fuzzed against it with schemathesis (no 500, every answer as
described, valid data accepted, invalid data refused)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.test import Client
from hypothesis import HealthCheck, settings
from schemathesis import checks

from orders import openapi, services
from tests.test_webhooks import signed

pytestmark = pytest.mark.django_db

DOCS_COPY = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
AUTH = {"Authorization": "Bearer test-api-token"}

# Loaded through the host project's own WSGI application, as a client would load it.
schema = schemathesis.openapi.from_wsgi("/api/schema/", WSGIHandler())


def test_the_description_is_served_without_credentials(client: Client) -> None:
    response = client.get("/api/schema/")

    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    document = response.json()
    assert document["openapi"] == "3.1.0"
    assert set(document["paths"]) == {
        "/api/orders/",
        "/api/orders/{order_id}/",
        "/api/orders/{order_id}/cancel/",
        "/api/orders/{order_id}/extend/",
        "/api/orders/{order_id}/ship/",
        "/api/orders/{order_id}/payment-attempts/",
        "/webhooks/payment/",
        "/webhooks/logistics/",
        "/api/schema/",
    }
    assert "servers" not in document, "mounted at the root, the paths are the URLs"


def test_the_copy_in_docs_is_the_served_description() -> None:
    # UPDATE_OPENAPI=1 rewrites the copy after a change to orders/openapi.py.
    current = json.dumps(openapi.schema(), indent=2, ensure_ascii=False) + "\n"
    if os.environ.get("UPDATE_OPENAPI"):
        DOCS_COPY.write_text(current)
    assert DOCS_COPY.read_text() == current, "run UPDATE_OPENAPI=1 pytest tests/test_openapi.py"


@pytest.fixture
def requests_keep_the_test_transaction() -> Iterator[None]:
    """A WSGI request closes the database connection when it starts and ends; in a test,
    that would end the test's transaction. Django's own test client disconnects the same
    handler."""
    for signal in (request_started, request_finished):
        signal.disconnect(close_old_connections)
    yield
    for signal in (request_started, request_finished):
        signal.connect(close_old_connections)


def _real_ids(case: Any) -> None:
    """Point a valid request at an order that exists, in a state where the operation can
    succeed: random UUIDs would only ever test the 404."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return
    if isinstance(case.body, dict):
        # A reference (the shop's, a payment attempt's) names one order: keep each one
        # new, as payment references below.
        for name in ("reference", "attempt_ref"):
            if isinstance(case.body.get(name), str):
                case.body[name] = f"{case.body[name][:95]}-{uuid.uuid4().hex}"
    order = services.place_order(amount="12.50", timeout=600)
    if "order_id" in case.path_parameters:
        case.path_parameters["order_id"] = str(order.pk)
        if case.operation.path.endswith("/ship/"):
            services.record_payment(
                order_id=order.pk, payment_ref=f"p-{order.pk}", amount="12.50", currency="CNY"
            )
    if isinstance(case.body, dict) and "order_id" in case.body:
        if "tracking_number" in case.body:
            services.record_payment(
                order_id=order.pk, payment_ref=f"p-{order.pk}", amount="12.50", currency="CNY"
            )
            order = services.ship_order(order_id=order.pk)
            case.body["tracking_number"] = order.tracking_number
        case.body["order_id"] = str(order.pk)
        if "payment_ref" in case.body:
            # A reference already used for another order is refused; keep each one new.
            case.body["payment_ref"] = f"{case.body['payment_ref'][:95]}-{uuid.uuid4().hex}"


def _serialized(body: Any) -> bytes:
    try:
        return json.dumps(body).encode()
    except TypeError:  # no body was generated (schemathesis' NotSet)
        return b""


# 30 examples an operation, the same ones every run, keep CI fast and stable (about 15 s);
# FUZZ_EXAMPLES=1000 explores further, with new examples each run.
EXPLORE = int(os.environ.get("FUZZ_EXAMPLES", "0"))


@schema.parametrize()
@settings(
    max_examples=EXPLORE or 30,
    derandomize=not EXPLORE,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_the_api_keeps_to_its_description(
    case: Any, requests_keep_the_test_transaction: None
) -> None:
    _real_ids(case)
    if case.operation.path.startswith("/webhooks/"):
        # The signature covers the exact bytes sent, so the body is serialized here and
        # signed with fresh Standard Webhooks headers (replacing the generated ones).
        # Those headers are then valid even in a negative case, so the two checks that
        # expect a refusal of a broken header do not apply; the body is still fuzzed.
        body = _serialized(case.body)
        case.call_and_validate(
            headers=signed(case.operation.path, body),
            data=body,
            excluded_checks=[checks.negative_data_rejection, checks.missing_required_header],
        )
    else:
        case.call_and_validate(headers=AUTH)
