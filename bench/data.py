"""Fast ways to make and clear the bench's orders, and to read back what happened.

Inserting hundreds of thousands of orders one ``place_order`` at a time would take
longer than the measurement, so the pending-timer and burst experiments insert rows
directly (COPY on PostgreSQL, executemany on SQLite) and arm their timers through the
scheduling module's own publish functions. What arming costs a real ``place_order``
is measured separately, with ``place_order`` itself.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.apps import apps
from django.core.management.color import no_style
from django.db import connection, transaction
from django.utils import timezone

from orders import get_order_model
from orders.models import Status

Order = get_order_model()


def insert_orders(deadlines: Sequence[datetime], *, armed: bool) -> list[uuid.UUID]:
    """Insert one unpaid order per deadline; ``armed`` marks their timers as enqueued
    (``timer_armed_for``), as ``place_order`` would. Every other column gets its model
    default, so the rows are what ``place_order`` makes. Returns the new ids."""
    ids = [uuid.uuid4() for _ in deadlines]
    now = timezone.now()
    fields = [f for f in Order._meta.concrete_fields]
    given: dict[str, Any] = {
        "amount": Decimal("10.00"),
        "currency": "CNY",
        "status": Status.CREATED.value,
        "created_at": now,
        "updated_at": now,
    }
    varying = ("id", "expires_at", "timer_armed_for")
    constants = {
        f.name: f.get_db_prep_save(given.get(f.name, f.get_default()), connection)
        for f in fields
        if f.name not in varying
    }
    id_field, at_field = Order._meta.pk, Order._meta.get_field("expires_at")
    assert id_field is not None

    def row(pk: uuid.UUID, deadline: datetime) -> tuple[Any, ...]:
        at = at_field.get_db_prep_save(deadline, connection)
        values = constants | {
            "id": id_field.get_db_prep_save(pk, connection),
            "expires_at": at,
            "timer_armed_for": at if armed else None,
        }
        return tuple(values[f.name] for f in fields)

    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    table = connection.ops.quote_name(Order._meta.db_table)
    with transaction.atomic():
        cursor = connection.cursor()
        if connection.vendor == "postgresql":
            with cursor.cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:  # psycopg 3
                for pk, deadline in zip(ids, deadlines, strict=True):
                    copy.write_row(row(pk, deadline))
        else:
            placeholders = ", ".join(["%s"] * len(fields))
            sql = f"INSERT INTO {table} ({columns}) VALUES ({placeholders})"
            batch: list[tuple[Any, ...]] = []
            for pk, deadline in zip(ids, deadlines, strict=True):
                batch.append(row(pk, deadline))
                if len(batch) == 5000:
                    cursor.executemany(sql, batch)
                    batch = []
            if batch:
                cursor.executemany(sql, batch)
        cursor.close()
    return ids


def clear_orders() -> None:
    """Empty every table of the orders app in the bench database (between experiments)."""
    tables = [model._meta.db_table for model in apps.get_app_config("orders").get_models()]
    statements = connection.ops.sql_flush(no_style(), tables, allow_cascade=True)
    connection.ops.execute_sql_flush(statements)


def unpaid_count() -> int:
    return Order.objects.filter(status=Status.CREATED).count()


def wait_until(predicate: Callable[[], bool], *, timeout: float, every: float = 0.05) -> bool:
    """Wait for ``predicate``; False on time-out (the bench reports it, never raises)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


@dataclass
class Lateness:
    """Seconds from deadline to cancellation, of every order expired in an experiment.
    ``recorded`` is ``cancelled_at - expires_at``, what the app stores; ``written`` is
    ``updated_at - expires_at``, when the row was actually written."""

    recorded: list[float]
    written: list[float]

    @classmethod
    def of_cancelled_orders(cls) -> Lateness:
        rows = Order.objects.filter(status=Status.CANCELLED).values_list(
            "expires_at", "cancelled_at", "updated_at"
        )
        recorded, written = [], []
        for expires_at, cancelled_at, updated_at in rows.iterator(chunk_size=5000):
            if cancelled_at is None:  # cancelled by a path that does not stamp it
                continue
            recorded.append((cancelled_at - expires_at).total_seconds())
            written.append((updated_at - expires_at).total_seconds())
        return cls(recorded=recorded, written=written)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), by linear interpolation; NaN when empty."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return float(values[0])
    return float(statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1])
