"""Celery tasks: thin callers of ``orders.services``. They take ids, never instances,
acknowledge late (settings), and may run any number of times."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from celery import shared_task

from orders import events, outbound, services
from orders.gateways import GatewayError

#: A provider that fails is asked again, backing off up to 10 minutes, until it answers:
#: the database says the work is still owed, and the idempotency key makes it once.
RETRY_UNTIL_THE_PROVIDER_ANSWERS: dict[str, Any] = {
    "autoretry_for": (GatewayError,),
    "retry_backoff": True,
    "retry_backoff_max": 600,
    "max_retries": None,
}


@shared_task(name="orders.expire_order", acks_late=True)
def expire_order_task(order_id: str) -> str:
    return services.expire_order(order_id=order_id).value


@shared_task(name="orders.expire_bucket", acks_late=True)
def expire_bucket_task(bucket: int, share: bool = True) -> int:
    return services.expire_bucket(bucket=bucket, share=share)


@shared_task(name="orders.remind_order", acks_late=True)
def remind_order_task(order_id: str, deadline: str) -> str:
    return services.remind_order(order_id=order_id, deadline=datetime.fromisoformat(deadline)).value


@shared_task(name="orders.remind_bucket", acks_late=True)
def remind_bucket_task(bucket: int) -> int:
    return services.remind_bucket(bucket=bucket)


@shared_task(name="orders.ship_order", acks_late=True, **RETRY_UNTIL_THE_PROVIDER_ANSWERS)
def ship_order_task(order_id: str) -> str:
    return services.ship_order(order_id=order_id).status


@shared_task(name="orders.refund_payment", acks_late=True, **RETRY_UNTIL_THE_PROVIDER_ANSWERS)
def refund_payment_task(payment_id: str) -> str:
    return services.refund_payment(payment_id=payment_id).refund_ref


@shared_task(name="orders.close_payment", acks_late=True, **RETRY_UNTIL_THE_PROVIDER_ANSWERS)
def close_payment_task(attempt_id: str) -> str:
    return services.close_payment(attempt_id=attempt_id).outcome


@shared_task(name="orders.sweep", acks_late=True)
def sweep_task() -> dict[str, object]:
    return vars(services.sweep())


@shared_task(name="orders.poll_parcels", acks_late=True)
def poll_parcels_task() -> dict[str, int]:
    return vars(services.poll_parcels())


@shared_task(name="orders.dispatch_events", acks_late=True)
def dispatch_events_task(order_ids: list[str]) -> dict[str, int]:
    return vars(events.dispatch(order_ids))


@shared_task(name="orders.send_webhooks", acks_late=True)
def send_webhooks_task(delivery_ids: list[str]) -> int:
    return outbound.send(delivery_ids)


@shared_task(name="orders.send_due_webhooks", acks_late=True)
def send_due_webhooks_task() -> int:
    return outbound.send_due()
