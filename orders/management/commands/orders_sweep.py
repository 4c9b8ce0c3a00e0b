"""``manage.py orders_sweep``: run the sweep now, as beat does every SWEEP_INTERVAL."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from orders import services


class Command(BaseCommand):
    help = (
        "Run one sweep now: expire unpaid orders past their deadline plus the grace "
        "period whose timers were lost, arm timers that came within the horizon, and "
        "retry shipments and refunds whose tasks never ran. Beat runs the same every "
        "ORDERS['SWEEP_INTERVAL'] seconds."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        report = services.sweep()
        self.stdout.write(
            f"Expired {report.expired} overdue orders (up to {report.max_lateness:.1f}s late), "
            f"armed {report.timers_armed} timers, retried {report.shipments_retried} shipments "
            f"and {report.refunds_retried} refunds; {len(report.errors)} errors."
        )
        for error in report.errors:
            self.stderr.write(error)
