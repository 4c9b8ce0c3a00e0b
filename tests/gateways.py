"""Payment gateway and logistics provider that record every call in Redis, for the
randomized tests: many processes (workers, webhook actors, the test itself) call them,
so the record must live outside any one process.

Selected with ``ORDERS_PAYMENT_GATEWAY=tests.gateways.RecordingPaymentGateway`` and
``ORDERS_LOGISTICS_PROVIDER=tests.gateways.RecordingLogisticsProvider`` (read by
tests/settings.py), recording under the Redis key prefix ``ORDERS_TEST_RECORDS`` on the
run's Redis (``settings.CELERY_BROKER_URL``).

They behave as a real provider with idempotency keys: the first call with a key does
the work (a refund, a booked shipment), later calls with the same key return the same
reference and do nothing. The payment gateway answers about payment attempts as the
local one does (``simulate``), recording each question, when it first answered "paid",
and each ``close_payment``. With ``ORDERS_TEST_FAILURE_RATE`` > 0 some calls fail with
a ``GatewayError`` *after* the work was done: the ambiguous timeout that makes callers
retry, the case idempotency keys exist for.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import redis
from django.conf import settings

from orders import broker
from orders.gateways import (
    AttemptStatus,
    GatewayError,
    LocalLogisticsProvider,
    LocalPaymentGateway,
)

REFUND_CALLS = "refund-calls"  # hash: idempotency key -> calls
REFUNDS = "refunds"  # hash: idempotency key -> "payment_ref amount currency", first call wins
SHIPMENT_CALLS = "shipment-calls"
SHIPMENTS = "shipments"  # hash: idempotency key -> order id
STATUS_ASKS = "status-asks"  # hash: attempt reference -> payment_status calls
PAID_ANSWERS = "paid-answers"  # hash: attempt reference -> when first answered "paid"
CLOSE_CALLS = "close-calls"  # hash: attempt reference -> close_payment calls


def redis_client(url: str | None = None) -> redis.Redis:
    return broker.redis_client(url or settings.CELERY_BROKER_URL, timeout=10)


def _prefix() -> str:
    prefix = os.environ.get("ORDERS_TEST_RECORDS")
    if not prefix:
        raise RuntimeError("ORDERS_TEST_RECORDS is not set: where should calls be recorded?")
    return prefix


def _record(calls: str, done: str, key: str, value: str) -> None:
    prefix = _prefix()
    pipe = redis_client().pipeline()
    pipe.hincrby(prefix + calls, key, 1)
    pipe.hsetnx(prefix + done, key, value)
    pipe.execute()
    rate = float(os.environ.get("ORDERS_TEST_FAILURE_RATE") or 0)
    if rate and random.random() < rate:
        raise GatewayError(f"timed out waiting for the provider ({key}); retry")


class RecordingPaymentGateway(LocalPaymentGateway):
    def refund(
        self, *, payment_ref: str, amount: Decimal, currency: str, idempotency_key: str
    ) -> str:
        reference = super().refund(
            payment_ref=payment_ref,
            amount=amount,
            currency=currency,
            idempotency_key=idempotency_key,
        )
        _record(REFUND_CALLS, REFUNDS, idempotency_key, f"{payment_ref} {amount} {currency}")
        return reference

    def payment_status(self, *, attempt_ref: str) -> AttemptStatus:
        redis_client().hincrby(_prefix() + STATUS_ASKS, attempt_ref, 1)
        answer = super().payment_status(attempt_ref=attempt_ref)
        if answer.status == "paid":
            redis_client().hsetnx(_prefix() + PAID_ANSWERS, attempt_ref, repr(time.time()))
        return answer

    def close_payment(self, *, attempt_ref: str) -> None:
        super().close_payment(attempt_ref=attempt_ref)
        redis_client().hincrby(_prefix() + CLOSE_CALLS, attempt_ref, 1)


class RecordingLogisticsProvider(LocalLogisticsProvider):
    def create_shipment(self, *, order_id: str, idempotency_key: str) -> str:
        tracking_number = super().create_shipment(
            order_id=order_id, idempotency_key=idempotency_key
        )
        _record(SHIPMENT_CALLS, SHIPMENTS, idempotency_key, order_id)
        return tracking_number


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class Record:
    """What the providers saw, read back by the test."""

    refund_calls: dict[str, int]
    refunds: dict[str, str]
    shipment_calls: dict[str, int]
    shipments: dict[str, str]
    status_asks: dict[str, int]
    paid_answers: dict[str, datetime]
    close_calls: dict[str, int]

    @classmethod
    def read(cls, client: redis.Redis, prefix: str) -> Record:
        def read_hash(name: str) -> dict[str, str]:
            raw = client.hgetall(prefix + name)
            return {_text(k): _text(v) for k, v in raw.items()}

        return cls(
            refund_calls={k: int(v) for k, v in read_hash(REFUND_CALLS).items()},
            refunds=read_hash(REFUNDS),
            shipment_calls={k: int(v) for k, v in read_hash(SHIPMENT_CALLS).items()},
            shipments=read_hash(SHIPMENTS),
            status_asks={k: int(v) for k, v in read_hash(STATUS_ASKS).items()},
            paid_answers={
                k: datetime.fromtimestamp(float(v), tz=UTC)
                for k, v in read_hash(PAID_ANSWERS).items()
            },
            close_calls={k: int(v) for k, v in read_hash(CLOSE_CALLS).items()},
        )

    @staticmethod
    def clear(client: redis.Redis, prefix: str) -> None:
        client.delete(
            *(
                prefix + name
                for name in (
                    REFUND_CALLS,
                    REFUNDS,
                    SHIPMENT_CALLS,
                    SHIPMENTS,
                    STATUS_ASKS,
                    PAID_ANSWERS,
                    CLOSE_CALLS,
                )
            )
        )
