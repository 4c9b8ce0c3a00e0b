"""What the bench's receiver writes."""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from bench.receiver import TABLE


class StockReleased(models.Model):
    """One row per expired order heard, with the event's id unique, as a shop keeps
    its own record of what it released."""

    event_id = models.UUIDField(unique=True)
    order_id = models.UUIDField()
    at = models.DateTimeField(default=timezone.now)

    # Declared for django-stubs, which reads tests.settings, where this app is not installed.
    objects: models.Manager[StockReleased] = models.Manager()

    class Meta:
        # Importable where the app is not installed (the harness, which counts the SQL
        # of a delivery in its own process); its table is made by the harness.
        app_label = "bench_receiver"
        db_table = TABLE

    def __str__(self) -> str:
        return f"{self.order_id} released"
