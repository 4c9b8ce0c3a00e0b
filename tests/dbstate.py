"""What "the database did not change" means in a test: every row of the app's tables, as
read before and after a request that should have been refused."""

from __future__ import annotations

from typing import Any

from django.db.models import Model

from orders import get_order_model
from orders.models import (
    IdempotencyRecord,
    OrderTransition,
    ParcelEvent,
    Payment,
    PaymentAttempt,
)

TABLES: tuple[type[Model], ...] = (
    get_order_model(),
    Payment,
    PaymentAttempt,
    OrderTransition,
    ParcelEvent,
    IdempotencyRecord,
)

Snapshot = dict[str, list[dict[str, Any]]]


def snapshot() -> Snapshot:
    """Every row of orders, payments, payment attempts, transitions, parcel events and
    stored answers to repeatable requests, so that a refused request is seen to have
    changed nothing: no row added, none updated."""
    return {
        model._meta.label: [dict(row) for row in model._default_manager.order_by("pk").values()]
        for model in TABLES
    }


def row_counts(state: Snapshot) -> dict[str, int]:
    return {table: len(rows) for table, rows in state.items()}
