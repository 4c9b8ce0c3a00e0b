"""Webhooks from the payment gateway and the logistics provider: signed JSON, thin
callers of ``orders.services``. Both may be delivered any number of times."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse, JsonResponse

from orders import services
from orders.api import (
    JsonObject,
    Refused,
    View,
    json_endpoint,
    json_object,
    order_id_of,
    order_json,
    required,
    required_string,
)
from orders.conf import get_settings
from orders.models import Payment

SIGNATURE_HEADER = "X-Orders-Signature"

PAYMENT_ACTOR = "payment webhook"
LOGISTICS_ACTOR = "logistics webhook"


def signature(body: bytes, secret: str) -> str:
    """Hex HMAC-SHA256 of the raw body: what the sender puts in ``X-Orders-Signature``."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def require_signature(request: HttpRequest) -> None:
    secret = get_settings().WEBHOOK_SECRET
    if not secret:
        # 503 rather than 401: the sender retries, and succeeds once the secret is set.
        raise Refused(
            503, "Webhooks are not configured: the server has no ORDERS['WEBHOOK_SECRET']."
        )
    given = request.headers.get(SIGNATURE_HEADER, "").strip()
    if not given:
        raise Refused(
            401,
            f"The {SIGNATURE_HEADER} header is missing: send the hex HMAC-SHA256 "
            "of the raw body, keyed with the webhook secret.",
        )
    # Bytes, because compare_digest refuses str with non-ASCII characters.
    if not hmac.compare_digest(given.encode(), signature(request.body, secret).encode()):
        raise Refused(401, f"The {SIGNATURE_HEADER} header does not match the body.")


def webhook(*methods: str) -> Callable[[View], View]:
    return json_endpoint(*methods, authenticate=require_signature)


def payment_json(payment: Payment) -> JsonObject:
    return {
        "reference": payment.reference,
        "outcome": payment.outcome,
        "amount": str(payment.amount),
        "currency": payment.currency,
        "refunded": payment.refunded_at is not None,
    }


@webhook("POST")
def payment(request: HttpRequest) -> HttpResponse:
    data = json_object(request)
    recorded = services.record_payment(
        order_id=order_id_of(required_string(data, "order_id")),
        payment_ref=required(data, "payment_ref"),
        amount=required(data, "amount"),
        currency=data.get("currency"),
        by=PAYMENT_ACTOR,
    )
    return JsonResponse({"payment": payment_json(recorded), "order": order_json(recorded.order)})


@webhook("POST")
def logistics(request: HttpRequest) -> HttpResponse:
    data = json_object(request)
    order = services.record_parcel_status(
        order_id=order_id_of(required_string(data, "order_id")),
        status=required_string(data, "status"),
        by=LOGISTICS_ACTOR,
    )
    return JsonResponse(order_json(order))
