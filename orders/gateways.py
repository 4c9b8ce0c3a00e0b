"""The outside world: the payment gateway (refunds) and the logistics provider (shipments).

Each is chosen by a dotted path in ``ORDERS`` (``PAYMENT_GATEWAY``, ``LOGISTICS_PROVIDER``)
and loaded once, like Django's ``SESSION_ENGINE``. The built-in backends work offline
and are deterministic, so that a retried call gives the same answer.
"""

from __future__ import annotations

import hashlib
from decimal import Decimal
from functools import cache
from typing import Any, Protocol

from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.module_loading import import_string

from orders.conf import get_settings


class GatewayError(Exception):
    """The provider refused or could not be reached. The order's state did not move;
    the caller may retry with the same idempotency key."""


class PaymentGateway(Protocol):
    def refund(
        self, *, payment_ref: str, amount: Decimal, currency: str, idempotency_key: str
    ) -> str:
        """Refund a payment; return the provider's refund reference.

        Called again with the same ``idempotency_key``, it must not refund twice and
        should return the same reference."""
        ...


class LogisticsProvider(Protocol):
    def create_shipment(self, *, order_id: str, idempotency_key: str) -> str:
        """Book a shipment for the order; return its tracking number (same key, same number)."""
        ...

    def parcel_status(self, *, tracking_number: str) -> str:
        """One of ``in_transit``, ``delivered``, ``returned``."""
        ...


def _stable_reference(prefix: str, key: str) -> str:
    return f"{prefix}_{hashlib.sha256(key.encode()).hexdigest()[:20]}"


class LocalPaymentGateway:
    """Confirms every refund at once. For development and tests."""

    def refund(
        self, *, payment_ref: str, amount: Decimal, currency: str, idempotency_key: str
    ) -> str:
        if amount <= 0:
            raise GatewayError(f"cannot refund a non-positive amount {amount} {currency}")
        return _stable_reference("rf", idempotency_key)


class LocalLogisticsProvider:
    """Ships at once and reports every parcel as in transit. For development and tests."""

    def create_shipment(self, *, order_id: str, idempotency_key: str) -> str:
        return _stable_reference("TRK", idempotency_key).upper()

    def parcel_status(self, *, tracking_number: str) -> str:
        return "in_transit"


@cache
def payment_gateway() -> PaymentGateway:
    gateway: PaymentGateway = import_string(get_settings().PAYMENT_GATEWAY)()
    return gateway


@cache
def logistics_provider() -> LogisticsProvider | None:
    """The provider, or None when ``ORDERS["LOGISTICS_PROVIDER"]`` is None: the shop ships
    orders itself."""
    path = get_settings().LOGISTICS_PROVIDER
    if path is None:
        return None
    provider: LogisticsProvider = import_string(path)()
    return provider


@receiver(setting_changed)
def _reload(*, setting: str, **kwargs: Any) -> None:
    if setting == "ORDERS":
        payment_gateway.cache_clear()
        logistics_provider.cache_clear()
