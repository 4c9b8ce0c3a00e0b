"""``manage.py orders_status``: the shop at a glance, from the database, and which
workers are alive from their heartbeats."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.utils import timezone

from orders import broker, get_order_model, heartbeat
from orders.conf import get_settings
from orders.models import Status
from orders.selectors import Snapshot, format_duration, read_snapshot, sweep_is_overdue


class Command(BaseCommand):
    help = (
        "Show the orders at a glance, read from the database: how many are in each "
        "status, the next payment deadlines and whether their timers are armed, the "
        "oldest unpaid order past its deadline (there should be none: its timer was "
        "lost and the sweep has not caught it yet), the orders a customer is paying "
        "(held by a payment attempt), what the last sweep found, and the "
        "shipments and refunds still waiting, and which Celery workers are alive (their "
        "heartbeats in Redis; no worker is asked anything). Changes nothing."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--next",
            dest="upcoming",
            type=int,
            default=5,
            metavar="N",
            help="How many upcoming deadlines to list (default 5).",
        )

    def handle(self, *args: Any, upcoming: int, **options: Any) -> None:
        now = timezone.now()
        snap = read_snapshot(now)
        write = self.stdout.write
        write(f"Orders at {now:%Y-%m-%d %H:%M:%S} UTC")
        labels = dict(Status.choices)
        for status, n in snap.by_status.items():
            write(f"  {labels[status]:<26} {status:<10} {n:>8}")
        write(f"  {'total':<37} {sum(snap.by_status.values()):>8}")

        write("")
        unpaid = snap.by_status[Status.CREATED]
        write(f"Timers: {snap.timers_pending} of {unpaid} unpaid orders have one armed.")
        write(
            f"Payments in progress: {snap.held} unpaid orders held by an open payment "
            f"attempt; {snap.payment_closes_pending} ended attempts still to be closed at "
            "the provider."
        )
        self._next_deadlines(now, upcoming)

        write("")
        self._overdue(now, snap)
        self._last_sweep(now, snap)
        stale = f"{snap.stale_after.total_seconds():g}s"
        write(
            f"Shipments: {snap.shipments_pending} waiting, {snap.shipments_stuck} of them "
            f"for more than {stale}."
        )
        write(
            f"Refunds of payments that did not pay their order: {snap.refunds_pending} "
            f"waiting, {snap.refunds_failing} of them for more than {stale}."
        )
        backlog = snap.events
        write(
            f"Events: {backlog.owed} owed to a receiver ({backlog.late} late), "
            f"{backlog.retrying} deliveries retrying, {backlog.parked} parked; webhooks: "
            f"{backlog.webhooks_retrying} retrying, {backlog.webhooks_given_up} given up."
        )
        if backlog.parked:
            write(
                self.style.WARNING(
                    "  A receiver failed too often: fix it, then retry its parked deliveries "
                    "in the admin (Event deliveries)."
                )
            )
        self._workers()

    def _next_deadlines(self, now: datetime, limit: int) -> None:
        upcoming = (
            get_order_model()
            .objects.filter(status=Status.CREATED, expires_at__gte=now)
            .order_by("expires_at")[: max(0, limit)]
        )
        if not upcoming:
            self.stdout.write("Next deadlines: none.")
            return
        self.stdout.write("Next deadlines:")
        horizon = get_settings().TIMER_HORIZON
        for order in upcoming:
            left = (order.expires_at - now).total_seconds()
            if order.timer_armed_for == order.expires_at:
                timer = "timer armed"
            elif left > horizon:
                timer = "timer armed by the sweep later (beyond the horizon)"
            else:
                timer = "NO TIMER: the sweep will arm it or expire the order"
            self.stdout.write(
                f"  in {format_duration(left):>8}  {order.expires_at:%H:%M:%S}  {order.pk}  "
                f"{order.amount} {order.currency}  {timer}"
            )

    def _overdue(self, now: datetime, snap: Snapshot) -> None:
        oldest = (
            get_order_model()
            .objects.filter(status=Status.CREATED, expires_at__lt=now)
            .order_by("expires_at")
            .first()
        )
        if oldest is None:
            self.stdout.write("Overdue: none; every unpaid order is within its deadline.")
            return
        late = (now - oldest.expires_at).total_seconds()
        conf = get_settings()
        self.stdout.write(
            f"Overdue: {snap.overdue} unpaid orders past their deadline; the oldest, "
            f"{oldest.pk}, by {format_duration(late)}."
        )
        if late > conf.SWEEP_INTERVAL + conf.SWEEP_GRACE:
            self.stdout.write(
                self.style.WARNING(
                    "  Neither its timer nor the sweep has expired it: check that a worker "
                    "and beat are running, or run `manage.py orders_sweep`."
                )
            )

    def _last_sweep(self, now: datetime, snap: Snapshot) -> None:
        sweep = snap.last_sweep
        if sweep is None:
            self.stdout.write(
                self.style.WARNING(
                    "Last sweep: never. Is celery beat running (`celery -A <project> beat`)?"
                )
            )
            return
        age = now - sweep.at
        line = (
            f"Last sweep: {format_duration(age.total_seconds())} ago, expired "
            f"{sweep.expired} overdue orders "
            f"(up to {sweep.max_lateness:.1f}s late), armed {sweep.timers_armed} timers, "
            f"retried {sweep.shipments_retried} shipments and {sweep.refunds_retried} "
            f"refunds, {sweep.errors} errors."
        )
        stale = sweep_is_overdue(age)
        self.stdout.write(self.style.WARNING(line) if stale or sweep.expired else line)
        if stale:
            self.stdout.write(
                self.style.WARNING("  That is more than two sweep intervals: is beat running?")
            )
        elif sweep.expired:
            self.stdout.write(
                self.style.WARNING(
                    "  The sweep had to expire orders: their timers were lost (a worker "
                    "crashed, or Redis lost its data)."
                )
            )

    def _workers(self) -> None:
        client = broker.redis_client()
        try:
            workers = heartbeat.live_workers(client)
        except heartbeat.REDIS_ERRORS as exc:
            self.stdout.write(
                self.style.WARNING(
                    f"Workers: unknown, the broker is unreachable ({type(exc).__name__})."
                )
            )
            return
        finally:
            client.close()
        if not workers:
            self.stdout.write(
                self.style.WARNING(
                    f"Workers: none has written a heartbeat within {heartbeat.TTL}s. Is a "
                    "celery worker running (`celery -A <project> worker`)?"
                )
            )
            return
        alive = ", ".join(
            f"{worker.name} ({format_duration(worker.age)} ago)" for worker in workers
        )
        self.stdout.write(f"Workers: {len(workers)} alive, last heartbeat: {alive}.")
