"""``manage.py orders_rearm``: re-arm the timers of every unpaid order from the database."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from orders import scheduling, services
from orders.management.progress import progress_bar


class Command(BaseCommand):
    help = (
        "Arm again the expiry timer of every unpaid order whose deadline is within the "
        "timer horizon, reading the database. Run it after Redis lost its data (FLUSHALL, "
        "a failover without persistence). Idempotent and safe while workers run: a "
        "duplicate timer is a no-op. Without it the sweep still expires every such order, "
        "only later."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        done = 0
        try:
            for done, total in services.rearm_timers():
                self.stderr.write(progress_bar(done, total, "Re-arming timers"), ending="")
        except scheduling.BROKER_ERRORS as exc:
            raise CommandError(
                f"The broker is unreachable ({exc}): run orders_rearm again once it is back "
                "(the sweep expires the orders meanwhile, late)."
            ) from exc
        self.stderr.write("")
        self.stdout.write(f"Re-armed {done} expiry timers.")
