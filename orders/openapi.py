"""The OpenAPI 3.1 description of the JSON API and the webhooks, built from the code's own
limits (states, timeouts, patterns) so that it cannot drift from what the views accept.
Served at ``/api/schema/``; ``docs/openapi.json`` is a copy that a test keeps current."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import reverse

from orders import services
from orders.api import IDEMPOTENCY_KEY_HEADER
from orders.conf import PAYMENT_METHOD_PATTERN, get_settings
from orders.http import json_endpoint
from orders.idempotency import KEY_PATTERN
from orders.models import (
    REASON_MAX_LENGTH,
    CancelReason,
    ParcelStatus,
    Payment,
    PaymentAttempt,
    Status,
)
from orders.webhooks import ID_HEADER

JsonSchema = dict[str, Any]

API_VERSION = "1.0.0"

# What the services accept as an amount (orders.services.parse_amount), as a pattern: ASCII
# digits, more than zero, at most 10 digits before the point and 2 significant after it.
AMOUNT_PATTERN = r"^0*([1-9][0-9]{0,9}(\.[0-9]{1,2}0*)?|0\.(0[1-9]|[1-9][0-9]?)0*)$"


def _ref(name: str) -> JsonSchema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: JsonSchema) -> JsonSchema:
    return {**schema, "type": [schema["type"], "null"]}


def _object(properties: dict[str, JsonSchema], *, required: list[str] | None = None) -> JsonSchema:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


_MOMENT = {"type": "string", "format": "date-time"}
_MONEY = {"type": "string", "pattern": r"^[0-9]+\.[0-9]{2}$", "examples": ["12.50"]}
_CURRENCY = {"type": "string", "pattern": r"^[A-Z]{3}$", "examples": ["CNY"]}
_ATTEMPT_REF = {
    "type": "string",
    "pattern": f"^{services.PAYMENT_REF_PATTERN}$",
    "description": "The payment provider's id for the attempt (its trade number, payment "
    "intent, QR code order): unique, 1 to 128 characters without control characters.",
}
# A payment attempt as the API answers it (orders.http.attempt_json).
_ATTEMPT: dict[str, JsonSchema] = {
    "attempt_ref": {"type": "string"},
    "method": {"type": "string"},
    "status": {
        "type": "string",
        "enum": PaymentAttempt.Outcome.values,
        "description": "`open`: the customer is paying and the order waits (until "
        "`hold_until`, then the provider is asked until `cap_at`). `paid`: it paid the order. "
        "`failed`: failed or expired at the provider, or its payment did not pay the order. "
        "`timed_out`: still pending at `cap_at`. `closed`: the order was paid otherwise, "
        "cancelled or expired.",
    },
    "started_at": _MOMENT,
    "hold_until": {**_MOMENT, "description": "The order's deadline waits at least until then."},
    "cap_at": {**_MOMENT, "description": "The provider is asked no longer than this."},
    "closed_at": _nullable(_MOMENT),
    "detail": {"type": "string", "description": "Why it closed, for people."},
}


def _schemas() -> dict[str, JsonSchema]:
    conf = get_settings()
    seconds = {"type": "number", "minimum": conf.MIN_TIMEOUT, "maximum": conf.MAX_TIMEOUT}
    amount_in = {
        "description": 'A decimal string of ASCII digits ("12.50", at most 2 decimals and '
        "10 digits) or a whole number. Never a JSON float: binary fractions are not money.",
        "anyOf": [
            {"type": "string", "maxLength": 32, "pattern": AMOUNT_PATTERN},
            {"type": "integer", "minimum": 1, "maximum": 10**10 - 1},
        ],
    }
    currency_in = {
        "type": ["string", "null"],
        "pattern": f"^{services.CURRENCY_PATTERN}$",
        "description": "ISO 4217 code, any case; stored in capitals. Default: "
        "ORDERS['CURRENCY'] when placing, the order's when paying.",
    }
    return {
        "Error": {
            **_object({"error": {"type": "string", "description": "What was wrong, for people."}}),
            "description": "Every refusal: a 4xx or 5xx status with this body.",
        },
        "Transition": _object(
            {
                "from": {"type": "string"},
                "to": {"type": "string"},
                "transition": {
                    "type": "string",
                    "description": "A transition of the lifecycle (pay, ship, expire, "
                    "cancel, refund, close), or place (the order was placed), "
                    "refund_payment (a payment that did not pay it was refunded), remind "
                    "(the reminder before the deadline was sent), payment_pending (a "
                    "payment attempt started: the order waits for it), payment_failed (an "
                    "attempt ended without paying).",
                },
                "by": {"type": "string", "description": "A user's name, or the system part."},
                "at": _MOMENT,
                "reason": {"type": "string"},
            }
        ),
        "Order": _object(
            {
                "id": {"type": "string", "format": "uuid"},
                "status": {"type": "string", "enum": Status.values},
                "amount": _MONEY,
                "currency": _CURRENCY,
                "created_at": _MOMENT,
                "expires_at": {
                    **_MOMENT,
                    "description": "The deadline: the end of a payment attempt's hold while "
                    "one holds the order.",
                },
                "original_expires_at": {
                    **_nullable(_MOMENT),
                    "description": "While a payment attempt holds the order (one is "
                    "open): the deadline the shop gave; `expires_at` is the later of it and "
                    "the attempts' holds. Kept once the order is paid, cancelled or expired "
                    "while held. Null when no attempt holds it.",
                },
                "paid_at": _nullable(_MOMENT),
                "delivered_at": _nullable(_MOMENT),
                "refunded_at": _nullable(_MOMENT),
                "cancelled_at": _nullable(_MOMENT),
                "cancel_reason": {
                    "type": ["string", "null"],
                    "enum": [*CancelReason.values, None],
                },
                "payment_ref": {"type": ["string", "null"]},
                "tracking_number": {"type": ["string", "null"]},
                "reference": {"type": ["string", "null"]},
                "metadata": _ref("Metadata"),
                "time_left_seconds": {
                    "type": ["number", "null"],
                    "minimum": 0,
                    "description": "Until the deadline; null once the order is no longer unpaid.",
                },
                "history": {"type": "array", "items": _ref("Transition")},
                "payment_attempts": {
                    "type": "array",
                    "items": _ref("PaymentAttempt"),
                    "description": "Oldest first.",
                },
            }
        ),
        "PaymentAttempt": _object(_ATTEMPT),
        "StartedPayment": _object({**_ATTEMPT, "order": _ref("Order")}),
        "Payment": _object(
            {
                "reference": {"type": "string"},
                "outcome": {
                    "type": "string",
                    "enum": Payment.Outcome.values,
                    "description": "Only `accepted` pays the order; any other is refunded.",
                },
                "amount": _MONEY,
                "currency": _CURRENCY,
                "refunded": {"type": "boolean"},
                "attempt_ref": {
                    "type": ["string", "null"],
                    "description": "The payment attempt it ended, if the provider named it.",
                },
            }
        ),
        "PaymentOutcome": _object({"payment": _ref("Payment"), "order": _ref("Order")}),
        "Metadata": {
            "type": "object",
            "description": "The shop's own facts about the order: a flat object, as Stripe's "
            "metadata is.",
            "maxProperties": services.METADATA_MAX_KEYS,
            "propertyNames": {
                "minLength": 1,
                "maxLength": services.METADATA_KEY_MAX_LENGTH,
                "pattern": f"^{services.NO_NUL_PATTERN}$",
            },
            "additionalProperties": {
                # maxLength and pattern apply to strings only.
                "type": ["string", "number", "boolean", "null"],
                "maxLength": services.METADATA_VALUE_MAX_LENGTH,
                "pattern": f"^{services.NO_NUL_PATTERN}$",
            },
        },
        "NewOrder": _object(
            {
                "amount": amount_in,
                "currency": currency_in,
                "reference": {
                    "type": ["string", "null"],
                    "pattern": f"^{services.REFERENCE_PATTERN}$",
                    "description": "The shop's own id for the order: unique (another order "
                    "with it is a 409), returned in the order and searchable in the admin.",
                },
                "metadata": {**_ref("Metadata"), "description": "Default: {}."},
                "timeout_seconds": {
                    **seconds,
                    "type": ["number", "null"],
                    "description": "Seconds to pay. Default: ORDERS['DEFAULT_TIMEOUT'].",
                },
            },
            required=["amount"],
        ),
        "Cancellation": _object(
            {
                "reason": {
                    "type": ["string", "null"],
                    "maxLength": REASON_MAX_LENGTH,
                    "pattern": f"^{services.REASON_PATTERN}$",
                    "description": "Kept in the order's history. No NUL characters.",
                }
            },
            required=[],
        ),
        "Extension": _object(
            {
                "seconds": {
                    **seconds,
                    "minimum": 1,
                    "description": "Added to the deadline; the new deadline may be at most "
                    "ORDERS['MAX_TIMEOUT'] away (else 409).",
                }
            }
        ),
        "NewPaymentAttempt": _object(
            {
                "attempt_ref": {
                    **_ATTEMPT_REF,
                    "description": _ATTEMPT_REF["description"] + " The same one again "
                    "changes nothing (200); one of another order is refused (400).",
                },
                "method": {
                    "type": "string",
                    "pattern": f"^{PAYMENT_METHOD_PATTERN}$",
                    "examples": ["card", "qr_code", "bank_transfer"],
                    "description": "A key of ORDERS['PAYMENT_HOLD'] (any other takes its "
                    '"default"): how long at most the attempt may hold the order.',
                },
                "hold_for_seconds": {
                    "type": ["number", "null"],
                    "minimum": 1,
                    "maximum": conf.MAX_TIMEOUT,
                    "description": "Hold the order this long from now (a QR code's own "
                    "validity); cut to the method's maximum. Default: the method's maximum.",
                },
            },
            required=["attempt_ref", "method"],
        ),
        "Shipment": _object(
            {
                "tracking_number": {
                    "type": "string",
                    "pattern": f"^{services.TRACKING_NUMBER_PATTERN}$",
                    "description": "The shipment the shop booked. The same number again "
                    "changes nothing; another one for a shipped order is a 409.",
                }
            }
        ),
        # The payment gateway's and the logistics provider's events.
        "PaymentEvent": _object(
            {
                "order_id": {"type": "string", "format": "uuid"},
                "payment_ref": {
                    "type": "string",
                    "pattern": f"^{services.PAYMENT_REF_PATTERN}$",
                    "description": "The gateway's reference: the same one again changes nothing.",
                },
                "amount": amount_in,
                "currency": {**currency_in, "type": "string"},
                "attempt_ref": {
                    **_ATTEMPT_REF,
                    "type": ["string", "null"],
                    "description": "The payment attempt this payment ends "
                    "(POST /api/orders/{order_id}/payment-attempts/), if known: it is "
                    "closed as paid (or failed, if the payment does not pay the order).",
                },
            },
            required=["order_id", "payment_ref", "amount", "currency"],
        ),
        "ParcelEvent": _object(
            {
                "order_id": {"type": "string", "format": "uuid"},
                "tracking_number": {
                    "type": "string",
                    "description": "The parcel's: a report about any other is refused (409).",
                },
                "status": {"type": "string", "enum": ParcelStatus.values},
            }
        ),
    }


def _error(description: str) -> JsonSchema:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref("Error")}},
    }


_RESPONSES = {
    "BadRequest": _error("The body or a field is not what this operation takes."),
    "Unauthorized": {
        **_error("No credentials, or wrong ones."),
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    },
    "BadSignature": _error("The signature header is missing or does not match the body."),
    "NotFound": _error("No order with this id (a malformed id names no order either)."),
    "Conflict": _error(
        "The order's state does not allow this (e.g. cancelling a paid order), or another "
        "order has the reference given."
    ),
    "TooLarge": _error("The body is larger than DATA_UPLOAD_MAX_MEMORY_SIZE."),
    "GatewayFailed": _error("The payment gateway or logistics provider failed; retry later."),
    "NotConfigured": _error("The server has no API token or webhook secret configured."),
}


def _responses(ok: JsonSchema, *errors: str) -> JsonSchema:
    codes = {
        "BadRequest": "400",
        "Unauthorized": "401",
        "BadSignature": "401",
        "NotFound": "404",
        "Conflict": "409",
        "TooLarge": "413",
        "GatewayFailed": "502",
        "NotConfigured": "503",
    }
    return {
        **ok,
        **{codes[name]: {"$ref": f"#/components/responses/{name}"} for name in errors},
    }


def _json_body(schema: str, *, required: bool = True) -> JsonSchema:
    return {
        "required": required,
        "content": {"application/json": {"schema": _ref(schema)}},
    }


def _order(description: str, status: str = "200") -> JsonSchema:
    return {
        status: {
            "description": description,
            "content": {"application/json": {"schema": _ref("Order")}},
        }
    }


_ORDER_ID = {
    "name": "order_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
}
_KEY = {"type": "string", "pattern": f"^{KEY_PATTERN}$"}
_IDEMPOTENCY_KEY = {
    "name": IDEMPOTENCY_KEY_HEADER,
    "in": "header",
    "required": False,
    "description": "Makes the request safe to retry: the same key and body answer with the "
    "first answer (header Idempotent-Replayed: true), the same key with another body is a "
    "409. Kept ORDERS['IDEMPOTENCY_KEY_TTL'] seconds.",
    "schema": _KEY,
}
# Standard Webhooks: the signature covers "id.timestamp.body".
_WEBHOOK_HEADERS = [
    {
        "name": ID_HEADER,
        "in": "header",
        "required": True,
        "description": "The message id: a delivery with an id already answered (within 10 "
        "minutes) gets the first answer back and changes nothing.",
        "schema": _KEY,
    },
    {
        "name": "webhook-timestamp",
        "in": "header",
        "required": True,
        "description": "Unix seconds; more than 5 minutes off is refused (401).",
        "schema": {"type": "string", "pattern": "^[0-9]{1,12}$"},
    },
]
_API: list[dict[str, list[str]]] = [{"bearerAuth": []}]
_PAYMENT_SIGNED: list[dict[str, list[str]]] = [{"paymentWebhookSignature": []}]
_LOGISTICS_SIGNED: list[dict[str, list[str]]] = [{"logisticsWebhookSignature": []}]
_API_ERRORS = ("Unauthorized", "NotFound", "NotConfigured")


def _paths() -> JsonSchema:
    return {
        "/api/orders/": {
            "post": {
                "operationId": "createOrder",
                "tags": ["orders"],
                "summary": "Place an unpaid order; its expiry timer is armed",
                "security": _API,
                "parameters": [_IDEMPOTENCY_KEY],
                "requestBody": _json_body("NewOrder"),
                "responses": _responses(
                    {
                        "201": {
                            "description": "The order, unpaid, with its deadline.",
                            "headers": {"Location": {"schema": {"type": "string"}}},
                            "content": {"application/json": {"schema": _ref("Order")}},
                        }
                    },
                    "BadRequest",
                    "Unauthorized",
                    "Conflict",
                    "TooLarge",
                    "NotConfigured",
                ),
            }
        },
        "/api/orders/{order_id}/": {
            "parameters": [_ORDER_ID],
            "get": {
                "operationId": "getOrder",
                "tags": ["orders"],
                "summary": "The order with its history, oldest first",
                "security": _API,
                "responses": _responses(_order("The order."), *_API_ERRORS),
            },
        },
        "/api/orders/{order_id}/cancel/": {
            "parameters": [_ORDER_ID],
            "post": {
                "operationId": "cancelOrder",
                "tags": ["orders"],
                "summary": "Cancel an unpaid order at the customer's request",
                "security": _API,
                "requestBody": _json_body("Cancellation", required=False),
                "responses": _responses(
                    _order("The cancelled order."),
                    "BadRequest",
                    *_API_ERRORS,
                    "Conflict",
                    "TooLarge",
                ),
            },
        },
        "/api/orders/{order_id}/extend/": {
            "parameters": [_ORDER_ID],
            "post": {
                "operationId": "extendOrder",
                "tags": ["orders"],
                "summary": "Move an unpaid order's deadline later",
                "security": _API,
                "requestBody": _json_body("Extension"),
                "responses": _responses(
                    _order("The order with its new deadline."),
                    "BadRequest",
                    *_API_ERRORS,
                    "Conflict",
                    "TooLarge",
                ),
            },
        },
        "/api/orders/{order_id}/ship/": {
            "parameters": [_ORDER_ID],
            "post": {
                "operationId": "shipOrder",
                "tags": ["orders"],
                "summary": "Ship a paid order under the shop's own tracking number",
                "description": "For shops that book shipments themselves "
                "(ORDERS['LOGISTICS_PROVIDER'] None); with a provider, paying books one.",
                "security": _API,
                "requestBody": _json_body("Shipment"),
                "responses": _responses(
                    _order("The shipped order."),
                    "BadRequest",
                    *_API_ERRORS,
                    "Conflict",
                    "TooLarge",
                ),
            },
        },
        "/api/orders/{order_id}/payment-attempts/": {
            "parameters": [_ORDER_ID],
            "post": {
                "operationId": "startPayment",
                "tags": ["orders"],
                "summary": "The customer started paying: the order waits for the payment",
                "description": "Call it when the customer presses Pay (a 3-D Secure "
                "challenge, a QR code, a bank transfer). The order's deadline (`expires_at`) "
                "becomes the later of its own and the hold's end, the shop's kept in "
                "`original_expires_at`; past the hold the payment provider is asked before "
                "the order expires. Safe to retry: the same `attempt_ref` answers 200.",
                "security": _API,
                "requestBody": _json_body("NewPaymentAttempt"),
                "responses": _responses(
                    {
                        "201": {
                            "description": "The attempt, open, and the order it holds.",
                            "content": {"application/json": {"schema": _ref("StartedPayment")}},
                        },
                        "200": {
                            "description": "This attempt was started before: as it is now.",
                            "content": {"application/json": {"schema": _ref("StartedPayment")}},
                        },
                    },
                    "BadRequest",
                    *_API_ERRORS,
                    "Conflict",
                    "TooLarge",
                ),
            },
        },
        "/webhooks/payment/": {
            "post": {
                "operationId": "paymentWebhook",
                "tags": ["webhooks"],
                "summary": "The payment gateway reports money received for an order",
                "description": "Safe to deliver any number of times. A payment that does not "
                "pay the order (late, surplus, wrong amount or currency) is kept and refunded.",
                "security": _PAYMENT_SIGNED,
                "parameters": _WEBHOOK_HEADERS,
                "requestBody": _json_body("PaymentEvent"),
                "responses": _responses(
                    {
                        "200": {
                            "description": "The payment's outcome and the order.",
                            "content": {"application/json": {"schema": _ref("PaymentOutcome")}},
                        }
                    },
                    "BadRequest",
                    "BadSignature",
                    "NotFound",
                    "Conflict",
                    "TooLarge",
                    "NotConfigured",
                ),
            }
        },
        "/webhooks/logistics/": {
            "post": {
                "operationId": "logisticsWebhook",
                "tags": ["webhooks"],
                "summary": "The logistics provider reports a parcel's status",
                "description": "Only about a shipped order, under its tracking number; "
                "nothing moves a parcel back from a final status. `returned` refunds the "
                "order, once.",
                "security": _LOGISTICS_SIGNED,
                "parameters": _WEBHOOK_HEADERS,
                "requestBody": _json_body("ParcelEvent"),
                "responses": _responses(
                    _order("The order."),
                    "BadRequest",
                    "BadSignature",
                    "NotFound",
                    "Conflict",
                    "TooLarge",
                    "GatewayFailed",
                    "NotConfigured",
                ),
            }
        },
        "/api/schema/": {
            "get": {
                "operationId": "getSchema",
                "tags": ["meta"],
                "summary": "This description",
                "security": [],
                "responses": {
                    "200": {
                        "description": "The OpenAPI document.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    }


def schema(*, mount: str = "/") -> JsonSchema:
    """The OpenAPI document, for the app's URLs included at ``mount``."""
    document: JsonSchema = {
        "openapi": "3.1.0",
        "info": {
            "title": "django-timely-orders",
            "version": API_VERSION,
            "description": "Orders that are cancelled when not paid in time. JSON in and out; "
            'every refusal is `{"error": "..."}` with a fitting status. '
            "See docs/SECURITY.md for who holds which secret.",
        },
        "tags": [
            {"name": "orders", "description": "For storefronts: Bearer API token."},
            {"name": "webhooks", "description": "For the payment gateway and the carrier."},
            {"name": "meta", "description": "Open."},
        ],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "responses": _RESPONSES,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "ORDERS['API_TOKEN'] (environment: ORDERS_API_TOKEN). "
                    "Never in the query string.",
                },
                **{
                    f"{provider}WebhookSignature": {
                        "type": "apiKey",
                        "in": "header",
                        "name": "webhook-signature",
                        "description": "Standard Webhooks: `v1,` and the base64 HMAC-SHA256 "
                        "of `{webhook-id}.{webhook-timestamp}.{body}`, keyed with the base64 "
                        f"after `whsec_` of {setting} (one secret per provider: a message "
                        "signed for one endpoint is refused at the other). Several "
                        "space-separated signatures are accepted, for rotation.",
                    }
                    for provider, setting in (
                        ("payment", "ORDERS['PAYMENT_WEBHOOK_SECRET']"),
                        ("logistics", "ORDERS['LOGISTICS_WEBHOOK_SECRET']"),
                    )
                },
            },
        },
    }
    if mount != "/":
        document["servers"] = [{"url": mount.rstrip("/")}]
    return document


def _open(request: HttpRequest) -> None:
    """No credentials: the description holds no secret and no data, and a client reads it
    before it has a token."""


@json_endpoint("GET", authenticate=_open)
def schema_view(request: HttpRequest) -> HttpResponse:
    mount = reverse("orders:api-orders").removesuffix("api/orders/")
    return JsonResponse(schema(mount=mount))
