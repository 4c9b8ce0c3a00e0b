"""Webhooks from the payment gateway and the logistics provider: JSON signed per Standard
Webhooks, thin callers of ``orders.services``. Both may be delivered any number of times.

Each provider has its own secret, so a message signed for one endpoint is refused at the
other. The signature covers the message id and a timestamp with the body; a timestamp
more than 5 minutes off is refused, and an id seen within that window is a retry: it
gets the first answer back and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from functools import wraps

from django.http import HttpRequest, HttpResponse, JsonResponse
from standardwebhooks.webhooks import (
    EmptyWebhookSecretError,
    Webhook,
    WebhookVerificationError,
)

from orders import services
from orders.conf import get_settings
from orders.http import (
    Authenticator,
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
from orders.idempotency import Answer, answer_once
from orders.models import Payment, PaymentAttempt

ID_HEADER = "webhook-id"

PAYMENT_ACTOR = "payment webhook"
LOGISTICS_ACTOR = "logistics webhook"

#: The standardwebhooks package refuses timestamps more than 5 minutes off, either way.
#: A message stamped 5 minutes ahead is accepted for 10 minutes, so its id is kept
#: that long; a later copy is refused by its timestamp already.
SIGNATURE_TOLERANCE = timedelta(minutes=5)
KEEP_IDS_FOR = 2 * SIGNATURE_TOLERANCE


def require_signature(setting: str) -> Authenticator:
    """Check the Standard Webhooks signature with the secret ``ORDERS[setting]``."""

    def authenticate(request: HttpRequest) -> None:
        secret = getattr(get_settings(), setting)
        if not secret:
            # 503 rather than 401: the sender retries, and succeeds once the secret is set.
            raise Refused(
                503, f"Webhooks are not configured: the server has no ORDERS[{setting!r}]."
            )
        try:
            webhook = Webhook(secret)
        except (ValueError, EmptyWebhookSecretError):
            raise Refused(
                503, f"ORDERS[{setting!r}] is not a Standard Webhooks secret (whsec_...)."
            ) from None
        try:
            webhook.verify(request.body, dict(request.headers), json_parse=False)
        except WebhookVerificationError as exc:
            reason = str(exc)
        # The package raises these for a signature without "v1,", bad base64, or a body
        # that is not UTF-8.
        except ValueError:
            reason = "malformed webhook-signature, or a body that is not UTF-8"
        else:
            return
        raise Refused(
            401,
            f"The webhook signature was refused ({reason}). Sign per Standard Webhooks: "
            "headers webhook-id, webhook-timestamp (Unix seconds, within 5 minutes) and "
            "webhook-signature (v1,<base64 HMAC-SHA256 of 'id.timestamp.body'>), keyed "
            "with this endpoint's own secret.",
        )

    return authenticate


def webhook(setting: str, scope: str) -> Callable[[Callable[[HttpRequest], JsonObject]], View]:
    """A signed POST endpoint whose view answers once per ``webhook-id``."""

    def decorate(view: Callable[[HttpRequest], JsonObject]) -> View:
        @wraps(view)
        def once(request: HttpRequest) -> HttpResponse:
            answer = answer_once(
                scope=scope,
                key=request.headers[ID_HEADER],
                key_name=ID_HEADER,
                request_body=request.body,
                keep_for=KEEP_IDS_FOR,
                act=lambda: Answer(200, view(request)),
            )
            return JsonResponse(answer.body, status=answer.status)

        return json_endpoint("POST", authenticate=require_signature(setting))(once)

    return decorate


def payment_json(payment: Payment) -> JsonObject:
    return {
        "reference": payment.reference,
        "outcome": payment.outcome,
        "amount": str(payment.amount),
        "currency": payment.currency,
        "refunded": payment.refunded_at is not None,
        # The payment attempt it ended (paid, or failed if the payment was refunded), if
        # the provider named it, now or when it was asked about it.
        "attempt_ref": PaymentAttempt.objects.filter(payment_id=payment.pk)
        .values_list("reference", flat=True)
        .first(),
    }


@webhook("PAYMENT_WEBHOOK_SECRET", scope="webhook:payment")
def payment(request: HttpRequest) -> JsonObject:
    data = json_object(
        request, fields=("order_id", "payment_ref", "amount", "currency", "attempt_ref")
    )
    recorded = services.record_payment(
        order_id=order_id_of(required_string(data, "order_id")),
        payment_ref=required(data, "payment_ref"),
        amount=required(data, "amount"),
        currency=required_string(data, "currency"),
        attempt_ref=data.get("attempt_ref"),
        by=PAYMENT_ACTOR,
    )
    return {"payment": payment_json(recorded), "order": order_json(recorded.order)}


@webhook("LOGISTICS_WEBHOOK_SECRET", scope="webhook:logistics")
def logistics(request: HttpRequest) -> JsonObject:
    data = json_object(request, fields=("order_id", "tracking_number", "status"))
    order = services.record_parcel_status(
        order_id=order_id_of(required_string(data, "order_id")),
        tracking_number=required_string(data, "tracking_number"),
        status=required_string(data, "status"),
        by=LOGISTICS_ACTOR,
    )
    return order_json(order)
