"""The outside world: the payment gateway (refunds, and what became of a payment attempt)
and the logistics provider (shipments).

Each is chosen by a dotted path in ``ORDERS`` (``PAYMENT_GATEWAY``, ``LOGISTICS_PROVIDER``)
and loaded once, like Django's ``SESSION_ENGINE``. The built-in backends work offline
and are deterministic, so that a retried call gives the same answer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Any, Literal, Protocol, runtime_checkable

import redis
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.module_loading import import_string

from orders import broker
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


@dataclass(frozen=True)
class AttemptStatus:
    """What the provider says of a payment attempt. ``paid`` comes with the payment's
    reference, amount and currency (the same reference its webhook will bring)."""

    status: Literal["pending", "paid", "failed", "expired"]
    payment_ref: str = ""
    amount: Decimal | None = None
    currency: str = ""
    detail: str = ""


@runtime_checkable
class AsksPaymentStatus(Protocol):
    """A gateway that can say what became of a payment attempt (optional): an order held
    by an attempt is expired only after asking it."""

    def payment_status(self, *, attempt_ref: str) -> AttemptStatus:
        """Answer within a few seconds, or raise ``GatewayError``: an unanswered question
        counts as "pending", and never holds the order past the attempt's cap."""
        ...


@runtime_checkable
class ClosesPayments(Protocol):
    """A gateway that can stop an attempt being payable (optional; WeChat Pay's and
    Alipay's "close order"): called once for each attempt still open when its order
    expires or is paid otherwise, so that a late payment cannot happen at all."""

    def close_payment(self, *, attempt_ref: str) -> None:
        """Idempotent. If the attempt was paid already there is nothing to close: return
        normally (an "already paid" answer is no error, or the close would be retried for
        ever); its payment notification arrives as usual (and a late one is refunded)."""
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
    """Confirms every refund at once, and knows of the payment attempts what it was told
    with ``simulate`` (kept in the broker's Redis, so that every process sees the same).
    For development and tests."""

    #: ``simulate``'s status for a provider that does not answer at all.
    SILENT = "silent"

    def refund(
        self, *, payment_ref: str, amount: Decimal, currency: str, idempotency_key: str
    ) -> str:
        if amount <= 0:
            raise GatewayError(f"cannot refund a non-positive amount {amount} {currency}")
        return _stable_reference("rf", idempotency_key)

    @staticmethod
    def _key(attempt_ref: str) -> str:
        return f"{broker.key_prefix()}orders:local-gateway:{attempt_ref}"

    def simulate(
        self,
        attempt_ref: str,
        status: str,
        *,
        payment_ref: str = "",
        amount: Decimal | str | None = None,
        currency: str = "",
    ) -> None:
        """What the provider answers from now on about ``attempt_ref``: "pending" (the
        answer until told otherwise), "paid" (with the payment), "failed", "expired", or
        ``SILENT`` (no answer)."""
        fields: dict[str | bytes, str] = {
            "status": status,
            "payment_ref": payment_ref,
            "amount": str(amount or ""),
            "currency": currency,
        }
        _local_redis().hset(self._key(attempt_ref), mapping=fields)  # type: ignore[arg-type]

    def payment_status(self, *, attempt_ref: str) -> AttemptStatus:
        try:
            raw = _local_redis().hgetall(self._key(attempt_ref))
        except (redis.exceptions.RedisError, OSError) as exc:
            raise GatewayError(f"no answer about {attempt_ref}: {exc}") from exc
        known = {_text(key): _text(value) for key, value in raw.items()}
        status = known.get("status", "pending")
        if status == self.SILENT:
            raise GatewayError(f"no answer about {attempt_ref} (simulated)")
        if status == "closed":
            status = "expired"
        if status not in ("pending", "paid", "failed", "expired"):
            raise GatewayError(f"unknown status {status!r} for {attempt_ref}")
        try:
            amount = Decimal(known["amount"]) if known.get("amount") else None
        except InvalidOperation as exc:
            raise GatewayError(f"unreadable amount for {attempt_ref}") from exc
        return AttemptStatus(
            status=status,  # type: ignore[arg-type]  # checked just above
            payment_ref=known.get("payment_ref", ""),
            amount=amount,
            currency=known.get("currency", ""),
        )

    def close_payment(self, *, attempt_ref: str) -> None:
        # Closed unless paid meanwhile, in one step; the calls are counted for the tests.
        try:
            _local_redis().eval(_CLOSE_UNLESS_PAID, 1, self._key(attempt_ref))
        except (redis.exceptions.RedisError, OSError) as exc:
            raise GatewayError(f"could not close {attempt_ref}: {exc}") from exc


_CLOSE_UNLESS_PAID = """
redis.call('HINCRBY', KEYS[1], 'close_calls', 1)
if redis.call('HGET', KEYS[1], 'status') ~= 'paid' then
  redis.call('HSET', KEYS[1], 'status', 'closed')
end
redis.call('EXPIRE', KEYS[1], 30 * 24 * 3600)
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@cache
def _local_redis() -> redis.Redis:
    return broker.redis_client()


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
