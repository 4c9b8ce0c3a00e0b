"""Outbound webhooks: each event POSTed to the shop's endpoints, signed per Standard
Webhooks, and retried from the database until it is answered with a 2xx or given up.

The dispatcher (``orders.events``) writes one ``WebhookDelivery`` per event and endpoint
in its own transaction and queues the first try (``send_soon``). Every try is claimed
first in a short transaction, under a lease, so that two workers never send one delivery
at once; the request itself runs outside any transaction. A failed try is given its next
time in the database (exponential backoff), and the periodic ``send_due`` picks up what
is due: no countdown waits days in the broker, and a lost task loses nothing.

One task sends the deliveries of one endpoint, and stops at that endpoint's first
failure: a slow or dead endpoint costs at most one timeout per run, and holds back no
other endpoint.

Endpoints are outside URLs typed by staff: a URL whose host resolves to a loopback,
private, link-local or otherwise non-public address is refused (``check_url``), when the
endpoint is saved and again before each request, which is then made to the address that
was checked (a second DNS answer cannot point it inside).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from django.db import connection, transaction
from django.utils import timezone
from standardwebhooks.webhooks import Webhook

from orders import get_order_model, scheduling
from orders.conf import get_settings
from orders.http import order_json
from orders.logging import log_event
from orders.models import OrderTransition, Payment, WebhookAttempt, WebhookDelivery

logger = logging.getLogger("orders.outbound")

#: The most deliveries of one endpoint that one periodic run queues: an endpoint with
#: thousands pending is worked through over several runs, beside every other endpoint.
PER_ENDPOINT_PER_RUN = 100
#: A claimed try is another worker's for this many WEBHOOK_TIMEOUTs; a worker killed
#: mid-request leaves its delivery due again once the lease has passed.
LEASE_TIMEOUTS = 3
#: What is kept of an endpoint's answer or of an error, per attempt.
ERROR_MAX_LENGTH = 2000
USER_AGENT = "django-timely-orders-webhooks"


# Which URLs may be called ----------------------------------------------------------------


class RefusedURL(ValueError):
    """A webhook URL this server will not call; the message says why, to staff."""


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _not_public(address: IPAddress) -> str | None:
    """Why a request to ``address`` could reach inside the shop's network, or None."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    # The narrowest name first: link-local and unspecified addresses are private too.
    for kind in ("loopback", "unspecified", "link-local", "multicast", "reserved", "private"):
        if getattr(address, f"is_{kind.replace('-', '_')}"):
            return kind
    if not address.is_global:  # shared (carrier-grade NAT), documentation ranges, ...
        return "non-public"
    return None


def check_url(url: str) -> list[IPAddress]:
    """The addresses ``url`` may be called at: every address its host resolves to, when
    all are public. Raises ``RefusedURL`` for another scheme than http(s), a host that
    does not resolve, or any address that is not public. With
    ``ORDERS["WEBHOOK_ALLOW_PRIVATE"]`` only the scheme is checked, and nothing is
    resolved (an empty list: call the URL as it is)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RefusedURL(f"Webhook URLs must be http:// or https:// URLs with a host, not {url!r}.")
    if get_settings().WEBHOOK_ALLOW_PRIVATE:
        return []
    host = parts.hostname
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise RefusedURL(
            f"The host {host!r} of the webhook URL could not be resolved ({exc})."
        ) from None
    addresses: list[IPAddress] = []
    for *_, sockaddr in found:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if (kind := _not_public(address)) is not None:
            article = "an" if kind[0] in "aeiou" else "a"
            raise RefusedURL(
                f"The host {host!r} of the webhook URL resolves to {address}, {article} {kind} "
                "address: webhooks are only sent to public addresses (set "
                'ORDERS["WEBHOOK_ALLOW_PRIVATE"] to allow private ones, e.g. in development).'
            )
        if address not in addresses:
            addresses.append(address)
    return addresses


# Sending ---------------------------------------------------------------------------------


def send_soon(deliveries: Iterable[WebhookDelivery]) -> None:
    """Queue the first try of these deliveries once the caller's transaction commits, one
    task per endpoint; a lost task is picked up by the periodic ``send_due``."""
    by_endpoint: dict[int, list[str]] = {}
    for delivery in deliveries:
        by_endpoint.setdefault(delivery.endpoint_id, []).append(str(delivery.pk))
    for ids in by_endpoint.values():
        _queue(ids)


def _queue(delivery_ids: list[str]) -> None:
    from orders.tasks import send_webhooks_task  # tasks import us

    scheduling.enqueue_on_commit(send_webhooks_task, delivery_ids, what="webhook delivery")


def send(delivery_ids: Iterable[Any]) -> int:
    """Try each of these deliveries that is still owed and due now. After an endpoint's
    first failure its other deliveries here are left for a later run. Never raises for
    what an endpoint does. Returns how many were delivered."""
    delivered = 0
    failed_endpoints: set[int] = set()
    for delivery_id in delivery_ids:
        delivery = _claim(delivery_id, skip_endpoints=failed_endpoints)
        if delivery is None:
            continue
        if _try(delivery):
            delivered += 1
        else:
            failed_endpoints.add(delivery.endpoint_id)
    return delivered


def _claim(delivery_id: Any, *, skip_endpoints: set[int]) -> WebhookDelivery | None:
    """The delivery, leased to this worker, if it is owed and due, no other worker holds
    it and its endpoint is not one of ``skip_endpoints``; else None."""
    now = timezone.now()
    owed = WebhookDelivery.objects.filter(
        pk=delivery_id,
        delivered_at__isnull=True,
        gave_up_at__isnull=True,
        next_attempt_at__lte=now,
        endpoint__active=True,
    ).exclude(endpoint_id__in=skip_endpoints)
    with transaction.atomic():
        if connection.vendor != "mysql" or connection.features.has_select_for_update_of:
            locked = owed.select_for_update(skip_locked=True, of=("self",))
            delivery = locked.select_related("endpoint", "event").first()
        else:
            # MariaDB: no FOR UPDATE OF, and a locking join would lock the endpoint's row
            # too (a second delivery of it would be skipped). The delivery's row alone.
            # The delivery's own conditions again under its lock: another worker may have
            # claimed it between the two reads.
            delivery = (
                WebhookDelivery.objects.select_for_update(skip_locked=True)
                .filter(
                    pk__in=list(owed.values_list("pk", flat=True)),
                    delivered_at__isnull=True,
                    gave_up_at__isnull=True,
                    next_attempt_at__lte=now,
                )
                .first()
            )
        if delivery is None:
            return None
        lease = get_settings().WEBHOOK_TIMEOUT * LEASE_TIMEOUTS
        delivery.next_attempt_at = now + timedelta(seconds=lease)
        delivery.save(update_fields=["next_attempt_at"])
    return delivery


@dataclass
class _Answer:
    status_code: int | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def _try(delivery: WebhookDelivery) -> bool:
    """One request for a claimed delivery, and its record. Returns whether it was taken."""
    conf = get_settings()
    started = timezone.now()
    clock = time.monotonic()
    answer = _post(delivery)
    latency_ms = (time.monotonic() - clock) * 1000
    now = timezone.now()
    with transaction.atomic():
        WebhookAttempt.objects.create(
            delivery=delivery,
            at=started,
            status_code=answer.status_code,
            latency_ms=round(latency_ms, 1),
            error=answer.error[:ERROR_MAX_LENGTH],
        )
        if answer.ok:
            delivery.delivered_at, delivery.next_attempt_at = now, None
        else:
            delivery.attempts += 1
            if now - delivery.created_at > timedelta(seconds=conf.WEBHOOK_GIVE_UP_AFTER):
                delivery.gave_up_at, delivery.next_attempt_at = now, None
            else:
                backoff = conf.WEBHOOK_RETRY_BACKOFF * 2 ** (delivery.attempts - 1)
                delivery.next_attempt_at = now + timedelta(
                    seconds=min(backoff, conf.WEBHOOK_RETRY_MAX_BACKOFF)
                )
        delivery.save(update_fields=["attempts", "delivered_at", "gave_up_at", "next_attempt_at"])
    _log_try(delivery, answer, latency_ms)
    return answer.ok


def _log_try(delivery: WebhookDelivery, answer: _Answer, latency_ms: float) -> None:
    fields: dict[str, Any] = {
        "delivery_id": delivery.pk,
        "event_id": str(delivery.event.event_id),
        "event_type": delivery.event.event_type,
        "order_id": str(delivery.event.order_id),
        "url": delivery.endpoint.url,
        "status_code": answer.status_code,
        "error": answer.error,
        "latency_ms": round(latency_ms, 1),
        "attempts": delivery.attempts,
    }
    what = f"HTTP {answer.status_code}" if answer.status_code is not None else answer.error
    if answer.ok:
        log_event(
            logger,
            "webhook.delivered",
            "Webhook {event_type} {event_id} delivered to {url} in {latency_ms:.0f} ms.",
            **fields,
        )
    elif delivery.gave_up_at is not None:
        log_event(
            logger,
            "webhook.gave_up",
            "Webhook {event_type} {event_id} to {url} given up after {attempts} attempts "
            "(last: {what}); send it again from the admin once the endpoint works.",
            level=logging.ERROR,
            what=what,
            **fields,
        )
    else:
        log_event(
            logger,
            "webhook.failed",
            "Webhook {event_type} {event_id} to {url} failed (attempt {attempts}: {what}); "
            "next try at {next_attempt_at}.",
            level=logging.WARNING,
            what=what,
            next_attempt_at=delivery.next_attempt_at.isoformat()
            if delivery.next_attempt_at
            else None,
            **fields,
        )


def payload(event: OrderTransition) -> dict[str, Any]:
    """The body of an event's webhook: its type and time, and the order as the API's
    ``GET /api/orders/<id>/`` returns it now (with the refunded payment, for
    ``payment.refunded``)."""
    data = order_json(get_order_model().objects.get(pk=event.order_id))
    if event.payment_id is not None:
        payment: Payment = event.payment  # type: ignore[assignment]
        data["payment"] = {
            "reference": payment.reference,
            "amount": str(payment.amount),
            "currency": payment.currency,
            "outcome": payment.outcome,
            "refunded_at": payment.refunded_at.isoformat() if payment.refunded_at else None,
            "refund_ref": payment.refund_ref or None,
        }
    return {"type": event.event_type, "timestamp": event.at.isoformat(), "data": data}


def _post(delivery: WebhookDelivery) -> _Answer:
    """POST the event to the endpoint, signed; what came back, or what went wrong."""
    endpoint, event = delivery.endpoint, delivery.event
    try:
        addresses = check_url(endpoint.url)
        body = json.dumps(payload(event), separators=(",", ":"))
        msg_id, sent_at = str(event.event_id), timezone.now()
        url = httpx.URL(endpoint.url)
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": Webhook(endpoint.secret).sign(msg_id, sent_at, body),
        }
        extensions: dict[str, Any] = {}
        if addresses:
            # Connect to the address that was checked, naming the host in the Host header
            # and, for https, in the TLS handshake (which checks the certificate for it).
            headers["host"] = url.netloc.decode("ascii")
            if url.scheme == "https":
                extensions["sni_hostname"] = url.host
            url = url.copy_with(host=str(addresses[0]))
        with httpx.Client(timeout=get_settings().WEBHOOK_TIMEOUT, follow_redirects=False) as client:
            response = client.post(url, content=body, headers=headers, extensions=extensions)
    except RefusedURL as exc:
        return _Answer(error=f"refused: {exc}")
    except httpx.TimeoutException as exc:
        timeout = get_settings().WEBHOOK_TIMEOUT
        return _Answer(error=f"timed out after {timeout}s ({type(exc).__name__})")
    except httpx.HTTPError as exc:
        return _Answer(error=f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # a secret or URL mangled in the database: recorded, retried
        log_event(
            logger,
            "webhook.not_sent",
            "Webhook {event_id} could not be sent to {url}: {error}",
            level=logging.ERROR,
            exc_info=True,
            event_id=str(event.event_id),
            url=endpoint.url,
            error=f"{type(exc).__name__}: {exc}",
        )
        return _Answer(error=f"{type(exc).__name__}: {exc}")
    return _Answer(
        status_code=response.status_code,
        error="" if response.is_success else response.text[:ERROR_MAX_LENGTH],
    )


# The periodic pick-up and the admin's "send again" ----------------------------------------


def due_batches(now: datetime | None = None) -> list[list[str]]:
    """The deliveries due now, at most PER_ENDPOINT_PER_RUN per endpoint, earliest first:
    one list per endpoint."""
    due = WebhookDelivery.objects.filter(
        next_attempt_at__lte=now or timezone.now(),
        delivered_at__isnull=True,
        gave_up_at__isnull=True,
        endpoint__active=True,
    )
    endpoints = due.values_list("endpoint_id", flat=True).distinct().order_by()
    return [
        [
            str(pk)
            for pk in due.filter(endpoint_id=endpoint_id)
            .order_by("next_attempt_at", "id")
            .values_list("pk", flat=True)[:PER_ENDPOINT_PER_RUN]
        ]
        for endpoint_id in endpoints
    ]


def send_due(now: datetime | None = None) -> int:
    """Queue the deliveries that are due (retries, lost tasks, leases of killed workers),
    one task per endpoint. Returns how many deliveries were queued."""
    batches = due_batches(now)
    for ids in batches:
        _queue(ids)
    return sum(len(ids) for ids in batches)


def send_again(deliveries: Iterable[WebhookDelivery]) -> int:
    """Send these deliveries once more, now, with the same ``webhook-id``: those given up
    or still retrying, and those delivered already (their earlier attempts stay on
    record). Deliveries to an inactive endpoint are left as they are. Returns how many
    were queued."""
    chosen = WebhookDelivery.objects.filter(
        pk__in=[delivery.pk for delivery in deliveries], endpoint__active=True
    )
    with transaction.atomic():
        ids = list(chosen.values_list("pk", flat=True))
        WebhookDelivery.objects.filter(pk__in=ids).update(
            next_attempt_at=timezone.now(), delivered_at=None, gave_up_at=None
        )
        send_soon(WebhookDelivery.objects.filter(pk__in=ids).only("id", "endpoint_id"))
    return len(ids)
