"""The events scenario: what the outbox and its dispatcher cost (``bench/results/events.md``).

1. **A burst with events.** The same burst as the main bench (N orders sharing one
   deadline, on a whole second), expired by the batched timer (``expire_bucket``, that is
   ``services.expire_due_orders``) in a fresh worker, twice:
   (a) nothing listens: history rows only, nothing owed, no dispatch queued;
   (b) one receiver of ``order_expired`` that writes one row (``bench.receiver``,
   installed in that worker only, by ``bench/settings_receiver.py``): the same expiries,
   plus a dispatch task per batch, which the same worker runs.
   Measured: from the deadline until no order of the burst is unpaid, and, for (b),
   until every event is delivered (an ``EventDelivery`` row with ``delivered_at``).
2. **The dispatcher's rate.** N expired orders whose events are owed to that receiver,
   their ``orders.dispatch_events`` tasks queued through ``orders.events.announce`` (the
   app's own path) one order per task (what a payment or a per-order timer queues) or a
   whole expiry batch per task (what the batched path queues), and the time until all
   are delivered, on worker (b).
3. **SQL per event delivered**: ``events.dispatch`` in the harness's own process, with
   the receiver connected for that moment only, inside ``CaptureQueriesContext``.

Elsewhere the harness's process has no receiver connected, so the orders it expires
while preparing step 2 owe nothing until the bench marks their events owed. Nothing is
asserted: a wait that times out leaves its figure empty and the counts say what is
missing.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import connection, reset_queries
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from bench import data
from bench.measure import BATCHED, Bench, _direct_arm
from bench.procs import BenchProcess, WorkerProcess, cpu_seconds
from bench.receiver import RECEIVER, TABLE
from orders import events, get_order_model, services
from orders.conf import get_settings
from orders.models import EventDelivery, OrderTransition
from orders.signals import order_expired

NOBODY, ONE_RECEIVER = "nobody", "receiver"
LABELS = {
    NOBODY: "a. nothing listens (history rows only)",
    ONE_RECEIVER: "b. one receiver of order_expired, one INSERT",
}
RECEIVER_SETTINGS = "bench.settings_receiver"


@dataclass
class EventsBurst:
    variant: str
    orders: int
    lead: float  # seconds from the start of inserting to the shared deadline
    expired_after: float | None  # from the deadline until no order of the burst was unpaid
    delivered_after: float | None  # ... until every event was delivered ((b) only)
    unexpired: int
    history_rows: int  # order.expired rows written
    owed: int  # history rows still owed a delivery at the end
    delivered: int  # the receiver's delivery records, delivered
    receiver_rows: int  # rows the receiver wrote
    dispatch_tasks: int  # orders.dispatch_events tasks the worker ran
    cpu_ms_per_order: float | None  # the worker's CPU, all processes, deadline to done


@dataclass
class DispatchRate:
    orders_per_task: int
    events: int
    tasks: int
    queued_in: float  # seconds the harness took to queue every task
    delivered_after: float | None  # from the first task queued until all delivered
    rate: float | None  # events delivered per second
    delivered: int
    receiver_rows: int
    cpu_ms_per_event: float | None


@dataclass
class DispatchQueries:
    orders_per_call: int
    events: int
    delivered: int
    queries: int  # every statement Django ran, BEGIN and COMMIT included
    statements: int  # without transaction control
    commits: int  # COMMITs, and writes outside a transaction (each its own commit)
    ms_per_event: float  # in the harness's process, no worker


@dataclass
class EventsResults:
    bursts: list[EventsBurst] = field(default_factory=list)
    rates: list[DispatchRate] = field(default_factory=list)
    queries: list[DispatchQueries] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    loads: dict[str, tuple[float, float]] = field(default_factory=dict)  # 1-min load avg
    durations: dict[str, float] = field(default_factory=dict)


def delivered_count() -> int:
    return EventDelivery.objects.filter(receiver=RECEIVER, delivered_at__isnull=False).count()


def receiver_rows() -> int:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM {connection.ops.quote_name(TABLE)}")
        return int(cursor.fetchone()[0])


def dispatch_tasks_taken(worker: BenchProcess) -> int:
    """The dispatch tasks the worker received, from its log (Celery logs each at INFO)."""
    return sum(
        "orders.dispatch_events[" in line and line.endswith(" received")
        for line in worker.log().splitlines()
    )


class EventCost:
    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.profile = bench.profile
        self.results = EventsResults()

    def run(self) -> EventsResults:
        started = time.monotonic()
        from bench.receiver.models import StockReleased

        with connection.schema_editor() as editor:
            editor.create_model(StockReleased)
        self.clear()
        self.step(NOBODY, lambda worker: self.burst(NOBODY, worker))

        def burst_then_rates(worker: BenchProcess) -> None:
            self.burst(ONE_RECEIVER, worker)
            for per_task in self.shapes():
                self.dispatch_rate(worker, per_task)

        self.step(ONE_RECEIVER, burst_then_rates)
        for per_call in self.shapes():
            self.dispatch_queries(per_call)
        self.clear()
        self.results.durations["events"] = time.monotonic() - started
        return self.results

    @staticmethod
    def shapes() -> tuple[int, int]:
        """Orders per dispatch task: one (a payment, a per-order timer), or a batch."""
        return 1, get_settings().SWEEP_BATCH_SIZE

    # Set-up -----------------------------------------------------------------------------

    def clear(self) -> None:
        data.clear_orders()
        with connection.cursor() as cursor:
            cursor.execute(f"DELETE FROM {connection.ops.quote_name(TABLE)}")
        self.bench.purge_queues()

    def step(self, variant: str, body: Callable[[BenchProcess], None]) -> None:
        """A fresh worker (batched timers; with the receiver for (b)) around ``body``."""
        extra = {"ORDERS_TIMER_MODE": BATCHED}
        if variant == ONE_RECEIVER:
            extra["DJANGO_SETTINGS_MODULE"] = RECEIVER_SETTINGS
        load = os.getloadavg()[0]
        worker = WorkerProcess(
            name=f"worker-events-{variant}",
            env=self.bench.env.child_env(**extra),
            concurrency=self.profile.concurrency,
        ).start()
        try:
            body(worker)
        finally:
            worker.stop()
            self.clear()
        self.results.loads[variant] = (load, os.getloadavg()[0])

    # 1. The burst -----------------------------------------------------------------------

    def burst(self, variant: str, worker: BenchProcess) -> None:
        t = time.monotonic()
        n = self.profile.events_burst
        self.clear()
        # On a whole second, the batched timer's bucket: it fires at the deadline itself.
        at = math.ceil(time.time() + 1.0 + n * 0.0002)
        lead = at - time.time()
        deadline = datetime.fromtimestamp(at, UTC)
        ids = data.insert_orders([deadline] * n, armed=True)
        _direct_arm(BATCHED, ids, [deadline] * n)
        if time.time() > at:
            self.results.notes.append(
                f"Burst {variant}: arming ran past the deadline ({lead:.1f}s ahead); "
                "its figures include that."
            )
        listens = variant == ONE_RECEIVER
        timeout = lead + self.bench.drain_timeout() + n / 50 + (n / 20 if listens else 0)
        limit = time.monotonic() + timeout
        time.sleep(max(0.0, at - time.time()))
        cpu_before = cpu_seconds(worker.pid)
        # When the bench saw each: every order expired, then every event delivered.
        expired_at: float | None = None
        delivered_at: float | None = None
        while time.monotonic() < limit:
            if expired_at is None and data.unpaid_count() == 0:
                expired_at = time.time()
            if expired_at is not None and not listens:
                break
            if expired_at is not None and delivered_count() >= n:
                delivered_at = time.time()
                break
            time.sleep(0.05)
        cpu = cpu_seconds(worker.pid) - cpu_before
        done = delivered_at if listens else expired_at
        history = OrderTransition.objects.filter(event_type=order_expired.event_type)
        self.results.bursts.append(
            EventsBurst(
                variant=variant,
                orders=n,
                lead=lead,
                expired_after=expired_at - at if expired_at else None,
                delivered_after=delivered_at - at if delivered_at else None,
                unexpired=data.unpaid_count(),
                history_rows=history.count(),
                owed=history.filter(next_dispatch_at__isnull=False).count(),
                delivered=delivered_count(),
                receiver_rows=receiver_rows(),
                dispatch_tasks=dispatch_tasks_taken(worker),
                cpu_ms_per_order=cpu / n * 1000 if done else None,
            )
        )
        self.bench.say(f"  events, burst {variant}: done ({time.monotonic() - t:.0f}s)")

    # 2. The dispatcher's rate -----------------------------------------------------------

    def owed_events(self, n: int) -> list[Any]:
        """``n`` expired orders whose ``order.expired`` events are owed to the receiver.
        Expired here, where nothing listens: real history rows, owed to nobody until
        marked (an event is owed to the receivers connected where it was written)."""
        self.clear()
        ids = data.insert_orders([timezone.now() - timedelta(seconds=1)] * n, armed=False)
        services.expire_due_orders(due_by=timezone.now(), by=services.SWEEP)
        OrderTransition.objects.filter(event_type=order_expired.event_type).update(
            next_dispatch_at=timezone.now(), owed_to=[RECEIVER]
        )
        return ids

    def dispatch_rate(self, worker: BenchProcess, per_task: int) -> None:
        t = time.monotonic()
        n = self.profile.dispatch_events
        tasks_before = dispatch_tasks_taken(worker)
        ids = self.owed_events(n)
        cpu_before = cpu_seconds(worker.pid)
        started = time.monotonic()
        for start in range(0, n, per_task):
            events.announce(ids[start : start + per_task])
        queued_in = time.monotonic() - started
        done = data.wait_until(
            lambda: delivered_count() >= n,
            timeout=self.bench.drain_timeout() + n / 20,
            every=0.05,
        )
        took = time.monotonic() - started
        cpu = cpu_seconds(worker.pid) - cpu_before
        self.results.rates.append(
            DispatchRate(
                orders_per_task=per_task,
                events=n,
                tasks=dispatch_tasks_taken(worker) - tasks_before,
                queued_in=queued_in,
                delivered_after=took if done else None,
                rate=n / took if done else None,
                delivered=delivered_count(),
                receiver_rows=receiver_rows(),
                cpu_ms_per_event=cpu / n * 1000 if done else None,
            )
        )
        self.bench.say(
            f"  events, dispatch {per_task} per task: done ({time.monotonic() - t:.0f}s)"
        )

    # 3. SQL per event delivered ---------------------------------------------------------

    def dispatch_queries(self, per_call: int) -> None:
        n = min(self.profile.dispatch_events, 50)  # the count per event is what varies
        ids = self.owed_events(n)
        control = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")
        queries = statements = commits = 0
        took = 0.0
        with receiver_connected_here():
            for start in range(0, n, per_call):
                reset_queries()  # Django keeps the last 9,000 queries, across contexts
                with CaptureQueriesContext(connection) as captured:
                    began = time.perf_counter()
                    events.dispatch(ids[start : start + per_call])
                    took += time.perf_counter() - began
                sqls = [q["sql"].lstrip().upper() for q in captured.captured_queries]
                queries += len(sqls)
                statements += sum(not sql.startswith(control) for sql in sqls)
                commits += count_commits(sqls)
        delivered = delivered_count()
        self.results.queries.append(
            DispatchQueries(
                orders_per_call=per_call,
                events=n,
                delivered=delivered,
                queries=queries,
                statements=statements,
                commits=commits,
                ms_per_event=took / max(1, delivered) * 1000,
            )
        )
        self.clear()


def count_commits(sqls: list[str]) -> int:
    """Commits in a query log: each COMMIT, and each write in autocommit mode."""
    commits, in_transaction = 0, False
    for sql in sqls:
        if sql.startswith("BEGIN"):
            in_transaction = True
        elif sql.startswith(("COMMIT", "ROLLBACK")):
            commits += sql.startswith("COMMIT")
            in_transaction = False
        elif not in_transaction and sql.startswith(("INSERT", "UPDATE", "DELETE")):
            commits += 1
    return commits


@contextmanager
def receiver_connected_here() -> Iterator[None]:
    """The bench's receiver, connected in this process for the block only."""
    from bench.receiver.receivers import release_stock  # connects it, the first time

    order = get_order_model()
    order_expired.connect(release_stock, sender=order, dispatch_uid=RECEIVER)
    try:
        yield
    finally:
        order_expired.disconnect(sender=order, dispatch_uid=RECEIVER)
