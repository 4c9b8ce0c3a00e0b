"""The HTTP plumbing that the JSON API, the webhooks, ``/health/`` and ``/metrics`` share:
JSON bodies and fields, errors as ``{"error": ...}``, the order as JSON, and the
credentials (Bearer tokens, an operator's login)."""

from __future__ import annotations

import hmac
import json
import logging
import uuid
from collections.abc import Callable, Collection
from datetime import datetime
from functools import wraps
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from orders import get_order_model
from orders.conf import get_settings
from orders.gateways import GatewayError
from orders.logging import log_event, one_line
from orders.models import AbstractOrder, PaymentAttempt, permission_name
from orders.services import (
    DuplicateReference,
    InvalidInput,
    InvalidTransition,
    OrderError,
    OrderNotFound,
    brief,
)

logger = logging.getLogger("orders.http")

JsonObject = dict[str, Any]
View = Callable[..., HttpResponse]
Authenticator = Callable[[HttpRequest], None]


class Refused(Exception):
    """A request turned away before it reaches the services: method, credentials, size."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


# The order as JSON --------------------------------------------------------------------


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def attempt_json(attempt: PaymentAttempt) -> JsonObject:
    """A payment attempt (``services.start_payment``): while ``status`` is ``open`` it
    holds its order until ``hold_until``, and the provider is asked until ``cap_at``."""
    return {
        "attempt_ref": attempt.reference,
        "method": attempt.method,
        "status": str(attempt.outcome),
        "started_at": _iso(attempt.started_at),
        "hold_until": _iso(attempt.hold_until),
        "cap_at": _iso(attempt.cap_at),
        "closed_at": _iso(attempt.closed_at),
        "detail": attempt.detail,
    }


def order_json(order: AbstractOrder) -> JsonObject:
    """The order with its history, oldest transition first, and its payment attempts,
    oldest first: one query for each (none when prefetched). Outbound webhooks send the
    same, one event at a time, so a query per event is all it costs them."""
    time_left = order.time_left()
    return {
        "id": str(order.pk),
        "status": str(order.status),
        "amount": str(order.amount),
        "currency": order.currency,
        "created_at": _iso(order.created_at),
        "expires_at": _iso(order.expires_at),
        # While a payment attempt holds the order: the deadline the shop gave (expires_at
        # is the later of it and the holds), kept once the order ends while held; null
        # when no attempt holds it.
        "original_expires_at": _iso(order.original_expires_at),
        "paid_at": _iso(order.paid_at),
        "delivered_at": _iso(order.delivered_at),
        "refunded_at": _iso(order.refunded_at),
        "cancelled_at": _iso(order.cancelled_at),
        "cancel_reason": str(order.cancel_reason) or None,
        "payment_ref": order.payment_ref or None,
        "tracking_number": order.tracking_number or None,
        "reference": order.reference,
        "metadata": order.metadata,
        # An unpaid order past its deadline is about to expire: it has no time left,
        # not a negative amount of it.
        "time_left_seconds": None if time_left is None else max(0.0, round(time_left, 3)),
        "history": [
            {
                "from": step.source,
                "to": step.target,
                "transition": step.transition,
                "by": step.actor,
                "at": _iso(step.at),
                "reason": step.reason,
            }
            for step in order.history.all()
        ],
        "payment_attempts": [attempt_json(attempt) for attempt in order.payment_attempts.all()],
    }


# Requests and responses ---------------------------------------------------------------


def error_response(
    request: HttpRequest, status: int, message: str, headers: dict[str, str] | None = None
) -> JsonResponse:
    # Escaped here as well as by orders.logging.PlainFormatter: a host project may log
    # with a formatter of its own, and the path and message come from the request.
    log_event(
        logger,
        "http.refused",
        "Refused {method} {path} with {status}: {error}",
        level=logging.WARNING,
        method=one_line(str(request.method)),
        path=one_line(request.path),
        status=status,
        error=one_line(message),
    )
    return JsonResponse({"error": message}, status=status, headers=headers)


def _status_of(exc: OrderError) -> int:
    if isinstance(exc, OrderNotFound):
        return 404
    if isinstance(exc, InvalidTransition | DuplicateReference):
        return 409
    return 400


def json_endpoint(*methods: str, authenticate: Authenticator) -> Callable[[View], View]:
    """Make ``view`` a CSRF-exempt endpoint for machine clients: only ``methods``, only
    authenticated requests, and every refusal or service error as ``{"error": ...}``."""

    def decorate(view: View) -> View:
        @wraps(view)
        def endpoint(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            try:
                if request.method not in methods:
                    raise Refused(
                        405,
                        f"{request.method} is not allowed here; use {' or '.join(methods)}.",
                        {"Allow": ", ".join(methods)},
                    )
                authenticate(request)
                return view(request, *args, **kwargs)
            except Refused as exc:
                return error_response(request, exc.status, str(exc), exc.headers)
            except RequestDataTooBig:
                return error_response(request, 413, "The request body is too large.")
            except OrderError as exc:
                return error_response(request, _status_of(exc), str(exc))
            except GatewayError as exc:
                return error_response(
                    request, 502, f"The payment or logistics provider failed ({exc}); retry later."
                )

        return csrf_exempt(endpoint)

    return decorate


def json_object(
    request: HttpRequest, *, fields: Collection[str] | None = None, optional: bool = False
) -> JsonObject:
    """The body as a JSON object. With ``fields``, any other key is refused, so that a
    misspelt optional field is reported instead of silently ignored."""
    if optional and not request.body.strip():
        return {}
    try:
        data = json.loads(request.body, parse_float=_json_number)
    except (ValueError, RecursionError):
        # ValueError also covers bad UTF-8 and integers too long to convert;
        # RecursionError is what deeply nested arrays raise.
        raise InvalidInput("The request body is not valid JSON; send a JSON object.") from None
    if not isinstance(data, dict):
        raise InvalidInput(
            f"The request body must be a JSON object, got a JSON {_json_type(data)}."
        )
    if fields is not None and (unknown := sorted(set(data) - set(fields))):
        shown = ", ".join(brief(name) for name in unknown[:5])
        raise InvalidInput(f"Unknown field(s) {shown}; expected {', '.join(fields)}.")
    return data


def _json_number(text: str) -> int | float:
    """JSON has one kind of number: ``12.0`` is the whole number 12 (as JSON Schema says),
    so it is read as an int and taken wherever a whole number is. Only below 2**53, where
    a float is exact; beyond, it stays a float (``1e400`` is infinity, and refused)."""
    value = float(text)
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


def required(data: JsonObject, name: str) -> Any:
    value = data.get(name)
    if value is None:
        raise InvalidInput(f"{name} is required.")
    return value


def required_string(data: JsonObject, name: str) -> str:
    value = required(data, name)
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be a string, got a JSON {_json_type(value)}.")
    return value


def optional_number(data: JsonObject, name: str) -> int | float | None:
    value = data.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise InvalidInput(f"{name} must be a number of seconds, got {brief(value)}.")
    return value


def order_id_of(value: str) -> uuid.UUID:
    # A string that is not a UUID names no order: a 404 before any query.
    try:
        return uuid.UUID(value)
    except ValueError:
        raise OrderNotFound(f"No order with id {brief(value)}.") from None


# Authentication -----------------------------------------------------------------------


def require_token(request: HttpRequest, *, setting: str, what: str) -> None:
    """``Authorization: Bearer <ORDERS[setting]>``; ``what`` names the token in errors."""
    expected = getattr(get_settings(), setting)
    if not expected:
        raise Refused(503, f"The {what} is not configured: the server has no ORDERS[{setting!r}].")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Refused(
            401,
            f"Authentication required: send the header 'Authorization: Bearer <{what}>'.",
            {"WWW-Authenticate": "Bearer"},
        )
    # Bytes, because compare_digest refuses str with non-ASCII characters.
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise Refused(
            401, f"The {what} is not valid.", {"WWW-Authenticate": 'Bearer error="invalid_token"'}
        )


def is_operator(request: HttpRequest) -> bool:
    """A staff login allowed to view orders (a look from the browser)."""
    user = getattr(request, "user", None)
    return bool(
        user is not None
        and user.is_authenticated
        and user.is_staff
        and user.has_perm(permission_name(get_order_model(), "view_order"))
    )


def require_operator(request: HttpRequest) -> None:
    """The operators' reads (``/metrics``, the details of ``/health/``): an operator's
    login, or the read-only metrics token (a scraper), never the API's write token."""
    if not is_operator(request):
        require_token(request, setting="METRICS_TOKEN", what="metrics token")
