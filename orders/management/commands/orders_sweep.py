"""``manage.py orders_sweep``: run the sweep now, as beat does every SWEEP_INTERVAL."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from orders import services
from orders.management.progress import progress_bar


class Command(BaseCommand):
    help = (
        "Run one sweep now: expire unpaid orders past their deadline plus the grace "
        "period whose timers were lost, arm timers that came within the horizon, and "
        "retry shipments and refunds whose tasks never ran, send reminders whose timer "
        "was lost, and queue again events still owed to a receiver. Beat runs the same every "
        "ORDERS['SWEEP_INTERVAL'] seconds."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        total = len(services.SWEEP_STEPS)

        def show(done: int, name: str) -> None:
            self.stderr.write(progress_bar(done, total, f"Sweep: {name:<22}"), ending="")

        report = services.sweep(on_step=show)
        self.stderr.write("")
        self.stdout.write(
            f"Expired {report.expired} overdue orders (up to {report.max_lateness:.1f}s late), "
            f"armed {report.timers_armed} timers, retried {report.shipments_retried} shipments "
            f"and {report.refunds_retried} refunds, sent {report.reminders_sent} late "
            f"reminders, re-queued the events of {report.events_requeued} orders; "
            f"{len(report.errors)} errors."
        )
        for error in report.errors:
            self.stderr.write(error)
