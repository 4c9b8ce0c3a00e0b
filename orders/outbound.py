"""Outbound webhooks: events sent to the shop's endpoints, signed per Standard Webhooks.

(Being written: see issue 11.)"""

from __future__ import annotations

from collections.abc import Iterable

from orders import scheduling
from orders.models import WebhookDelivery


def send_soon(deliveries: Iterable[WebhookDelivery]) -> None:
    """Queue the first attempt of these deliveries once the caller's transaction commits;
    a lost task is picked up by the periodic ``orders.send_due_webhooks``."""
    from orders.tasks import send_webhooks_task

    ids = [str(delivery.pk) for delivery in deliveries]
    if ids:
        scheduling.enqueue_on_commit(send_webhooks_task, ids, what="webhook delivery")


def send(delivery_ids: Iterable[str]) -> int:
    raise NotImplementedError("outbound webhooks: being written")
