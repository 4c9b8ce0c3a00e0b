"""``manage.py orders_demo``: a guided run of the lifecycle against the running worker."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from orders import broker, get_order_model, heartbeat, services
from orders.conf import DEFAULTS, get_settings
from orders.models import AbstractOrder, CancelReason, OrderTransition, Payment, Status

Order = get_order_model()

ACTOR = "demo"
POLL_INTERVAL = 0.1
#: How long a late payment arrives after its order's deadline (seconds).
LATE_BY = 1.0


@dataclass
class DemoOrder:
    label: str
    timeout: float
    story: str
    paid_at_once: bool = False
    refunded_when_delivered: bool = False
    paid_late: bool = False
    order: AbstractOrder | None = None
    seen_transitions: set[int] = field(default_factory=set)
    seen_payments: set[tuple[int, bool]] = field(default_factory=set)

    @property
    def pk(self) -> uuid.UUID:
        assert self.order is not None
        return self.order.pk


def demo_orders() -> list[DemoOrder]:
    return [
        DemoOrder("A", 3, "not paid: its timer cancels it at its deadline"),
        DemoOrder(
            "B",
            4,
            "paid at once: it ships, then staff refund it and it closes",
            paid_at_once=True,
            refunded_when_delivered=True,
        ),
        DemoOrder("C", 5, "not paid: its timer cancels it at its deadline"),
        DemoOrder("D", 6, "paid at once: it ships and stays delivered", paid_at_once=True),
        DemoOrder(
            "E",
            8,
            f"not paid in time: cancelled, and a payment {LATE_BY:g}s after the deadline "
            "is recorded as late and refunded",
            paid_late=True,
        ),
    ]


class Command(BaseCommand):
    help = (
        "A guided run of the order lifecycle, for a first look or a demonstration. "
        "Places five real orders with 3 to 8 second deadlines, pays two of them (they "
        "ship), refunds one as staff would, pays one too late (it is refunded), and "
        "prints every transition as the worker makes it, with how late after its "
        "deadline each expiry landed. Needs a running Celery worker on the same database "
        "and broker (start one with `.ci/up`), and the built-in local payment gateway "
        "and logistics provider, so that it never moves real money. Takes about ten "
        "seconds; exits with an error if something did not happen in time."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--wait",
            type=float,
            default=20.0,
            metavar="SECONDS",
            help="How long after the last deadline to wait for the worker (default 20).",
        )

    def handle(self, *args: Any, wait: float, **options: Any) -> None:
        self._refuse_real_backends()
        self._require_a_worker()
        demo = demo_orders()
        self.started = timezone.now()
        self._say(
            f"Placing {len(demo)} orders; each line below is a transition, as it lands "
            "in the database.\n"
        )
        for item in demo:
            item.order = services.place_order(amount="9.90", timeout=item.timeout)
            self._say(f"  {item.label}  {item.timeout:g}s to pay, {item.story}")
            self._say(f"     order {item.pk}")
        self._say("")
        for item in demo:
            if item.paid_at_once:
                self._pay(item)

        give_up_at = max(i.timeout for i in demo) + LATE_BY + wait
        while not all(self._done(item) for item in demo):
            for item in demo:
                self._print_new_events(item)
                self._act(item)
            if self._elapsed() > give_up_at:
                self._fail([item for item in demo if not self._done(item)])
            time.sleep(POLL_INTERVAL)
        for item in demo:
            self._print_new_events(item)
        self._summary(demo)

    # Before anything is written ---------------------------------------------------------

    def _refuse_real_backends(self) -> None:
        conf = get_settings()
        for key in ("PAYMENT_GATEWAY", "LOGISTICS_PROVIDER"):
            value = getattr(conf, key)
            if value != DEFAULTS[key]:
                raise CommandError(
                    f"ORDERS[{key!r}] is {value!r}, not the built-in {DEFAULTS[key]!r}. "
                    "The demo pays, ships and refunds orders, so it runs only against the "
                    "local backends, never a real gateway. Run it on a development setup "
                    "(`.ci/up`)."
                )

    def _require_a_worker(self) -> None:
        hint = (
            "The demo needs a running Celery worker on the same database and broker: the "
            "expiry timers, shipping and refunds run there. Start web, worker and beat in "
            "another terminal with `.ci/up` (or only a worker with "
            "`.venv/bin/celery -A config worker -l info`), then run `manage.py orders_demo` "
            "again."
        )
        # The workers' heartbeats, not a ping: one read, and nothing waits on a worker.
        client = broker.redis_client()
        try:
            workers = heartbeat.live_workers(client)
        except heartbeat.REDIS_ERRORS as exc:
            raise CommandError(f"The broker is unreachable ({exc}). {hint}") from exc
        finally:
            client.close()
        if not workers:
            raise CommandError(
                f"No Celery worker has written a heartbeat within {heartbeat.TTL}s. {hint}"
            )

    # Acting as customer and staff ---------------------------------------------------------

    def _pay(self, item: DemoOrder) -> None:
        assert item.order is not None
        services.record_payment(
            order_id=item.pk,
            payment_ref=f"demo-{item.pk.hex[:12]}-{item.label}",
            amount=item.order.amount,
            by=f"{ACTOR} customer",
        )

    def _act(self, item: DemoOrder) -> None:
        order = Order.objects.get(pk=item.pk)
        if item.refunded_when_delivered and order.status == Status.DELIVERED:
            services.refund_order(
                order_id=item.pk, by=f"{ACTOR} staff", reason="the customer changed their mind"
            )
        if (
            item.paid_late
            and not order.payments.exists()
            and timezone.now() >= order.expires_at + timedelta(seconds=LATE_BY)
        ):
            self._pay(item)

    def _done(self, item: DemoOrder) -> bool:
        order = Order.objects.get(pk=item.pk)
        if item.paid_at_once and not item.refunded_when_delivered:
            return order.status == Status.DELIVERED
        if order.status != Status.CANCELLED:
            return False
        if item.paid_late:
            return order.payments.filter(refunded_at__isnull=False).exists()
        return True

    # Telling what happened ---------------------------------------------------------------

    def _print_new_events(self, item: DemoOrder) -> None:
        order = Order.objects.get(pk=item.pk)
        for step in OrderTransition.objects.filter(order_id=order.pk).exclude(
            pk__in=item.seen_transitions
        ):
            item.seen_transitions.add(step.pk)
            line = f"{step.transition:<7} {step.source} -> {step.target}, by {step.actor}"
            if step.transition == "expire":
                lateness = (step.at - order.expires_at).total_seconds()
                line += f", {lateness:.3f}s after its deadline"
            elif step.transition == "ship":
                line += f", tracking number {order.tracking_number}"
            elif step.reason and step.transition in ("refund", "cancel"):
                line += f": {step.reason}"
            self._event(step.at, item.label, line)
        for payment in order.payments.all():
            if (payment.pk, False) not in item.seen_payments:
                item.seen_payments.add((payment.pk, False))
                note = "" if payment.outcome == Payment.Outcome.ACCEPTED else ", to be refunded"
                self._event(
                    payment.received_at,
                    item.label,
                    f"payment {payment.reference} received: "
                    f"{payment.get_outcome_display().lower()}{note}",
                )
            if payment.refunded_at and (payment.pk, True) not in item.seen_payments:
                item.seen_payments.add((payment.pk, True))
                self._event(
                    payment.refunded_at,
                    item.label,
                    f"payment {payment.reference} refunded ({payment.refund_ref})",
                )

    def _event(self, at: datetime, label: str, line: str) -> None:
        offset = f"+{(at - self.started).total_seconds():.2f}s"
        self._say(f"  {offset:>8}  {label}  {line}")

    def _summary(self, demo: list[DemoOrder]) -> None:
        self._say("\nWhere each order ended:")
        lateness: list[float] = []
        for item in demo:
            order = Order.objects.get(pk=item.pk)
            if order.cancel_reason == CancelReason.TIMEOUT and order.cancelled_at:
                lateness.append((order.cancelled_at - order.expires_at).total_seconds())
            reason = (
                f" ({order.get_cancel_reason_display().lower()})" if order.cancel_reason else ""
            )
            self._say(f"  {item.label}  {order.status}{reason}")
        if lateness:
            self._say(
                f"\n{len(lateness)} orders expired, at most {max(lateness):.3f}s after their "
                "deadline. `manage.py orders_status` shows the whole shop; the admin shows "
                "each order's history."
            )
        self._say(self.style.SUCCESS("Demo complete."))

    def _fail(self, missing: list[DemoOrder]) -> None:
        lines = []
        for item in missing:
            order = Order.objects.get(pk=item.pk)
            lines.append(f"  {item.label} ({order.pk}) is {order.status}; expected: {item.story}")
        raise CommandError(
            "Not everything happened in time:\n"
            + "\n".join(lines)
            + "\nIs the worker consuming this broker and this database? Its log says which."
        )

    def _elapsed(self) -> float:
        return (timezone.now() - self.started).total_seconds()

    def _say(self, line: str) -> None:
        self.stdout.write(line)
        self.stdout.flush()
