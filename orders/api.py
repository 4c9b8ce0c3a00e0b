"""The JSON API for machine clients: thin views over ``orders.services`` behind a Bearer
token. The plumbing it shares with the webhooks is in ``orders.http``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import reverse

from orders import get_order_model, services
from orders.conf import get_settings
from orders.http import (
    View,
    attempt_json,
    json_endpoint,
    json_object,
    optional_number,
    order_id_of,
    order_json,
    require_token,
    required,
)
from orders.idempotency import Answer, answer_once
from orders.models import CancelReason, PaymentAttempt
from orders.services import OrderNotFound, brief

#: Who the API's transitions are recorded as.
API_ACTOR = "customer (api)"
#: Who an order placed or shipped through the API is recorded as: the shop's systems.
API_SHOP = "shop (api)"
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"


def require_api_token(request: HttpRequest) -> None:
    """The storefront's token: it places and cancels orders."""
    require_token(request, setting="API_TOKEN", what="API token")


def api_endpoint(*methods: str) -> Callable[[View], View]:
    return json_endpoint(*methods, authenticate=require_api_token)


# Views --------------------------------------------------------------------------------


@api_endpoint("POST")
def create_order(request: HttpRequest) -> HttpResponse:
    """Place an order. With an ``Idempotency-Key`` header the request is safe to retry:
    the same key and body answer with the first answer (the order as it was placed),
    the same key with another body is a 409."""

    def place() -> Answer:
        data = json_object(
            request, fields=("amount", "currency", "timeout_seconds", "reference", "metadata")
        )
        order = services.place_order(
            amount=required(data, "amount"),
            currency=data.get("currency"),
            timeout=optional_number(data, "timeout_seconds"),
            reference=data.get("reference"),
            metadata=data.get("metadata"),
            by=API_SHOP,
        )
        return Answer(201, order_json(order))

    key = request.headers.get(IDEMPOTENCY_KEY_HEADER)
    if key is None:
        answer = place()
    else:
        answer = answer_once(
            # One API token, so one scope; a shop with one token per client would add it here.
            scope="api:create_order",
            key=key,
            key_name=IDEMPOTENCY_KEY_HEADER,
            request_body=request.body,
            keep_for=timedelta(seconds=get_settings().IDEMPOTENCY_KEY_TTL),
            act=place,
        )
    headers = {"Location": reverse("orders:api-order", args=[answer.body["id"]])}
    if answer.replayed:
        headers["Idempotent-Replayed"] = "true"
    return JsonResponse(answer.body, status=answer.status, headers=headers)


@api_endpoint("GET")
def order_detail(request: HttpRequest, order_id: str) -> HttpResponse:
    # Two queries either way: the order, then its history (order_json).
    order = get_order_model().objects.filter(pk=order_id_of(order_id)).first()
    if order is None:
        raise OrderNotFound(f"No order with id {brief(order_id)}.")
    return JsonResponse(order_json(order))


@api_endpoint("POST")
def cancel_order(request: HttpRequest, order_id: str) -> HttpResponse:
    data = json_object(request, fields=("reason",), optional=True)
    order = services.cancel_order(
        order_id=order_id_of(order_id),
        by=API_ACTOR,
        reason=data.get("reason"),
        cancel_reason=CancelReason.CUSTOMER,
    )
    return JsonResponse(order_json(order))


@api_endpoint("POST")
def extend_order(request: HttpRequest, order_id: str) -> HttpResponse:
    data = json_object(request, fields=("seconds",))
    order = services.extend_order(
        order_id=order_id_of(order_id), seconds=required(data, "seconds"), by=API_ACTOR
    )
    return JsonResponse(order_json(order))


@api_endpoint("POST")
def ship_order(request: HttpRequest, order_id: str) -> HttpResponse:
    """A paid order shipped by the shop itself (ORDERS["LOGISTICS_PROVIDER"] None)."""
    data = json_object(request, fields=("tracking_number",))
    order = services.ship_order(
        order_id=order_id_of(order_id),
        tracking_number=required(data, "tracking_number"),
        by=API_SHOP,
    )
    return JsonResponse(order_json(order))


@api_endpoint("POST")
def start_payment(request: HttpRequest, order_id: str) -> HttpResponse:
    """The customer pressed "Pay": the order waits for the payment (``start_payment``).
    201 with the attempt and the order; the same ``attempt_ref`` again answers 200 with
    the attempt as it is now, so a storefront may retry the call freely. No Location: an
    attempt has no URL of its own, it is read with its order."""
    data = json_object(request, fields=("attempt_ref", "method", "hold_for_seconds"))
    order_pk = order_id_of(order_id)
    # Checked before it is looked up: a NUL in a query parameter is a database error.
    attempt_ref = services.parse_payment_ref(required(data, "attempt_ref"), name="attempt_ref")
    # Asked before, not after: a second request with the same reference, racing the first,
    # is told 201 as well, with the same attempt.
    known = PaymentAttempt.objects.filter(reference=attempt_ref).exists()
    attempt = services.start_payment(
        order_id=order_pk,
        attempt_ref=attempt_ref,
        method=required(data, "method"),
        hold_for=optional_number(data, "hold_for_seconds"),
        by=API_ACTOR,
    )
    order = get_order_model().objects.get(pk=attempt.order_id)
    return JsonResponse(
        {**attempt_json(attempt), "order": order_json(order)}, status=200 if known else 201
    )
