"""Fault injection: workers killed mid-flight, Redis flushed, Redis down and back.

Each test has its own ``redis-server`` (tests/redis_server.py) on a free port, its own
worker processes pointed at it, and publishes there itself (``publishing_to``), so it
can kill, flush and stop that broker without touching anyone else's. Each ends
checking every order against the same invariants (tests/chaos.py ``violations``):
nothing lost (every unpaid order cancelled, every paid order shipped, every stray
payment refunded), nothing doubled (one history entry per transition), and prints
its counts.
"""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import time
from collections.abc import Iterator
from datetime import datetime

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.models import QuerySet
from django.utils import timezone
from pytest_django import Settings

from orders import get_order_model, heartbeat, services
from orders.models import AbstractOrder, Payment, Status
from tests.chaos import (
    EXPIRED,
    KEPT,
    expired_by,
    histories,
    key_prefix,
    kill,
    lateness,
    outcome_counts,
    passed_over_by_sweeps,
    payments_to_refund,
    reconnected_or_died,
    restart_if_dead,
    unsettled,
    violations,
    wait_for,
    workers,
)
from tests.conftest import WorkerProcess, worker_env
from tests.redis_server import RedisServer, publishing_to, queued, queued_task_args, unacked

Order = get_order_model()

pytestmark = [pytest.mark.chaos, pytest.mark.django_db(transaction=True)]

AMOUNT = "10.00"
GRACE = 1  # SWEEP_GRACE for the sweeps these tests run (beat's is 5 s by default)
SWEEP_EVERY = 0.5  # how often the tests sweep, standing in for beat


def scaled(postgres: int, sqlite: int) -> int:
    return postgres if connection.vendor == "postgresql" else sqlite


@pytest.fixture
def broker(settings: Settings) -> Iterator[tuple[RedisServer, str]]:
    """A private Redis, and this process publishing to it with a key prefix of its own.
    Per-order timers: these tests follow the countdowns a worker holds in memory (the
    batched engine's faults are in test_reliability_batched.py)."""
    settings.ORDERS = settings.ORDERS | {"SWEEP_GRACE": GRACE, "TIMER_MODE": "per_order"}
    prefix = key_prefix("chaos")
    with RedisServer() as server, publishing_to(server.url, prefix):
        yield server, prefix


def env_for(server: RedisServer, prefix: str, **extra: str) -> dict[str, str]:
    return worker_env(REDIS_URL=server.url, CELERY_KEY_PREFIX=prefix, **extra)


def place(count: int, first: float, last: float) -> list[AbstractOrder]:
    """``count`` orders with deadlines spread from ``first`` to ``last`` seconds away."""
    step = (last - first) / max(1, count - 1)
    return [services.place_order(amount=AMOUNT, timeout=first + i * step) for i in range(count)]


def of(orders: list[AbstractOrder]) -> QuerySet[AbstractOrder]:
    return Order.objects.filter(pk__in=[o.pk for o in orders])


def sweep_until_settled(orders: list[AbstractOrder], timeout: float) -> dict[str, int]:
    """Run the sweep every SWEEP_EVERY seconds, as beat would, until nothing is left to
    do for these orders; check that no sweep passed over an overdue order. Returns the
    sweeps' totals."""
    totals = {"sweeps": 0, "expired": 0, "timers armed": 0, "shipments": 0, "refunds": 0}
    queryset = of(orders)
    runs: list[tuple[datetime, datetime, int]] = []

    def settled() -> bool:
        now = timezone.now()
        report = services.sweep(now=now)
        runs.append((now, timezone.now(), report.expired))
        totals["sweeps"] += 1
        totals["expired"] += report.expired
        totals["timers armed"] += report.timers_armed
        totals["shipments"] += report.shipments_retried
        totals["refunds"] += report.refunds_retried
        if unsettled(queryset):
            time.sleep(SWEEP_EVERY)
            return False
        return True

    wait_for(settled, timeout, f"{len(orders)} orders to settle")
    assert passed_over_by_sweeps(queryset, runs) == []
    return totals


def drained(server: RedisServer, prefix: str) -> bool:
    client = server.client()
    return queued(client, prefix) == 0 and unacked(client, prefix) == 0


def report(title: str, orders: list[AbstractOrder], **counts: object) -> list[str]:
    queryset = of(orders)
    found = violations(queryset, late_ok=GRACE + 30)
    print(
        f"\n{title} ({connection.vendor}): {len(orders)} orders, "
        f"outcomes {dict(outcome_counts(queryset))}, "
        f"expired by {dict(expired_by(queryset))}, "
        f"lateness {lateness(queryset)}; "
        + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items())
        + f"; violations: {len(found)}"
    )
    return found


# a. A worker killed ------------------------------------------------------------------


def test_worker_killed_mid_flight_each_order_expires_once_via_new_worker_and_sweep(
    broker: tuple[RedisServer, str],
) -> None:
    """SIGKILL the only worker while its timers are firing: some orders expired, some
    maybe half-way through their transaction, most still pending in its memory. The
    broker keeps those unacknowledged for the visibility timeout (an hour), so nobody
    redelivers them; a new worker plus the sweep must cancel every order exactly once."""
    server, prefix = broker
    n = scaled(200, 100)
    env = env_for(server, prefix)
    with workers("kill-a", 1, env) as [first]:
        orders = place(n, 3, 8)
        wait_for(
            lambda: unacked(server.client(), prefix) == n, 30, "the worker to hold every timer"
        )
        # Kill once the first deadlines have fired, while the rest are pending.
        wait_for(
            lambda: of(orders).filter(status=Status.CANCELLED).count() >= n // 5,
            30,
            "a fifth to expire",
        )
        kill(first)
        killed_at = timezone.now()
        expired_before = of(orders).filter(status=Status.CANCELLED).count()
        pending = unacked(server.client(), prefix)
        assert expired_before < n, "the worker was killed too late: every timer had fired"

    with workers("kill-b", 1, env):
        later = place(scaled(50, 25), 1, 3)  # the new worker fires its own timers
        totals = sweep_until_settled(orders + later, 60)
        wait_for(lambda: drained_except(server, prefix, pending), 30, "the new worker to finish")
    assert unacked(server.client(), prefix) == pending, "lost timers came back unexpectedly"

    rescued = of(orders).filter(history__actor="sweep").count()  # type: ignore[misc]  # reverse relation
    found = report(
        "worker SIGKILLed mid-flight",
        orders + later,
        expired_before_the_kill=expired_before,
        timers_left_unacknowledged_by_the_dead_worker=pending,
        rescued_by_the_sweep=rescued,
        sweeps=totals["sweeps"],
    )
    assert found == []
    assert rescued == n - expired_before, "every order the dead worker held is the sweep's"
    assert all(
        o.cancelled_at is not None and o.cancelled_at > killed_at
        for o in of(orders).filter(history__actor="sweep")  # type: ignore[misc]  # reverse relation
    )
    assert set(histories(of(later)).values()) == {EXPIRED}


def drained_except(server: RedisServer, prefix: str, left: int) -> bool:
    client = server.client()
    return queued(client, prefix) == 0 and unacked(client, prefix) == left


def test_worker_killed_its_timers_are_redelivered_after_the_visibility_timeout(
    broker: tuple[RedisServer, str],
) -> None:
    """Same kill, no sweep at all: the next worker, with a 5 s visibility timeout and a
    restore scan every second, takes back the dead worker's unacknowledged timers and
    fires them (and, as the timeout is shorter than the countdowns, redelivers its own
    pending timers too: the duplicate-delivery bug of Redis, which the task's re-check
    under the row lock must absorb). Every order expires once, by its timer."""
    server, prefix = broker
    n = scaled(200, 100)
    with workers("redeliver-a", 1, env_for(server, prefix)) as [first]:
        orders = place(n, 3, 12)
        wait_for(
            lambda: unacked(server.client(), prefix) == n, 30, "the worker to hold every timer"
        )
        wait_for(
            lambda: of(orders).filter(status=Status.CANCELLED).exists(),
            30,
            "the first timer to fire",
        )
        kill(first)
        expired_before = of(orders).filter(status=Status.CANCELLED).count()

    short_visibility = env_for(
        server,
        prefix,
        CELERY_VISIBILITY_TIMEOUT="5",
        CELERY_UNACKED_RESTORE_INTERVAL="1",
        CELERY_UNACKED_RESTORE_THROTTLE="1",
    )
    with workers("redeliver-b", 1, short_visibility) as [second]:
        wait_for(
            lambda: not of(orders).filter(status=Status.CREATED).exists(),
            60,
            "every order to expire",
        )
        wait_for(lambda: drained(server, prefix), 60, "every redelivered copy to run")
        delivered = len(re.findall(r"Task orders\.expire_order\[\S+\] received", second.log()))

    found = report(
        "worker SIGKILLed, timers redelivered",
        orders,
        expired_before_the_kill=expired_before,
        timer_deliveries_to_the_next_worker=delivered,
    )
    assert found == []
    assert expired_by(of(orders)) == {"expiry timer": n}
    assert delivered >= n - expired_before, "the dead worker's timers were not redelivered"


# b. Redis flushed --------------------------------------------------------------------


def flush_with_timers_pending(
    server: RedisServer, prefix: str, worker: WorkerProcess, n: int
) -> tuple[list[AbstractOrder], list[AbstractOrder]]:
    """Place ``n`` orders whose timers the running worker takes and holds, then ``n``
    more while the worker is frozen (SIGSTOP), so that their timers wait in the queue;
    FLUSHALL, and let the worker go on. Returns (orders whose timer the flush deleted,
    the others). A frozen worker may still have one message in its socket buffer: the
    queue's contents at the flush say which were lost.

    The first deadline is 10 s away: every timer of the first batch must still be held
    when the worker is frozen, and on a busy machine (CI runs two passes at once) placing
    75 orders has taken 9 s, so that the first timers fired before the last was placed."""
    held = place(n, 10, 12)
    wait_for(lambda: unacked(server.client(), prefix) == n, 30, "the worker to hold the timers")
    assert worker.proc is not None
    os.killpg(worker.proc.pid, signal.SIGSTOP)
    try:
        waiting = place(n, 10, 12)
        in_queue = {args[0] for _, args in queued_task_args(server.client(), prefix)}
        server.flushall()
        assert queued(server.client(), prefix) == unacked(server.client(), prefix) == 0
    finally:
        os.killpg(worker.proc.pid, signal.SIGCONT)
    lost = [o for o in waiting if str(o.pk) in in_queue]
    assert len(lost) >= n - 1, f"only {len(lost)} of {n} timers were in the queue"
    return lost, [o for o in held + waiting if str(o.pk) not in in_queue]


def test_redis_flushed_orders_rearm_rearms_every_timer_and_they_fire_on_time(
    broker: tuple[RedisServer, str],
) -> None:
    """FLUSHALL with timers both in the queue and in the worker's memory; then
    ``manage.py orders_rearm``. Every order expires by a timer, on time-ish, once: the
    orders whose timer survived in the worker's memory get a second one, a no-op."""
    server, prefix = broker
    n = scaled(150, 75)
    with workers("flush-rearm", 1, env_for(server, prefix)) as [worker]:
        lost, kept = flush_with_timers_pending(server, prefix, worker, n)
        out = io.StringIO()
        call_command("orders_rearm", stdout=out, stderr=io.StringIO())
        rearmed = int(re.findall(r"Re-armed (\d+) expiry timers", out.getvalue())[0])
        orders = lost + kept
        wait_for(
            lambda: not of(orders).filter(status=Status.CREATED).exists(),
            30,
            "every order to expire",
        )
        wait_for(lambda: drained(server, prefix), 30, "every timer to run")

    found = report(
        "Redis FLUSHALL, then orders_rearm",
        orders,
        timers_flushed=len(lost),
        timers_surviving_in_worker_memory=len(kept),
        timers_rearmed=rearmed,
    )
    assert found == []
    assert rearmed == 2 * n, "orders_rearm arms every unpaid order within the horizon"
    assert expired_by(of(orders)) == {"expiry timer": 2 * n}
    for order in of(orders):
        assert order.cancelled_at is not None
        assert (order.cancelled_at - order.expires_at).total_seconds() < 3.0, "on time-ish"


def test_redis_flushed_without_rearm_the_sweep_alone_expires_every_order(
    broker: tuple[RedisServer, str], settings: Settings
) -> None:
    """Same flush, nobody runs orders_rearm: the sweep expires each order whose timer
    was flushed, once its deadline plus the grace has passed; the timers that survived
    in the worker's memory fire as usual."""
    server, prefix = broker
    # A wider grace keeps a slow machine's surviving timers from being overtaken by the
    # sweep, which would blur who did what.
    settings.ORDERS = settings.ORDERS | {"SWEEP_GRACE": 3}
    n = scaled(150, 75)
    with workers("flush-sweep", 1, env_for(server, prefix)) as [worker]:
        lost, kept = flush_with_timers_pending(server, prefix, worker, n)
        totals = sweep_until_settled(lost + kept, 40)
        wait_for(lambda: drained(server, prefix), 30, "every timer to run")

    found = report(
        "Redis FLUSHALL, sweep only",
        lost + kept,
        timers_flushed=len(lost),
        timers_surviving_in_worker_memory=len(kept),
        sweeps=totals["sweeps"],
    )
    assert found == []
    assert expired_by(of(lost)) == {"sweep": len(lost)}
    assert expired_by(of(kept)) == {"expiry timer": len(kept)}


# c. Redis down, and back -------------------------------------------------------------


def test_redis_down_orders_are_still_placed_and_recovered_when_it_is_back(
    broker: tuple[RedisServer, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stops, and comes back empty on the same port. Orders placed meanwhile are
    saved at once, each failure logged once. When Redis is back, the sweep expires the
    overdue ones, including those whose timers the worker held when the connection
    broke, and arms the timers of those still due, which a worker fires.

    The worker holding timers lives through the outage (orders/compat.py, see
    ``test_worker_holding_timers_survives_a_redis_restart_and_fires_the_timers_armed_after_it``);
    were it to die, it is started again here as a supervisor would, and the test says so."""
    server, prefix = broker
    n = scaled(100, 50)
    with workers("outage", 1, env_for(server, prefix)) as [worker]:
        before = place(n, 6, 8)  # timers held by the worker when Redis goes
        wait_for(lambda: unacked(server.client(), prefix) == n, 30, "the worker to hold the timers")

        server.stop()
        outage = time.monotonic()
        caplog.set_level(logging.ERROR, logger="orders.timers")
        caplog.clear()
        slowest = 0.0
        overdue, due = [], []
        for i in range(n):
            started = time.monotonic()
            overdue.append(services.place_order(amount=AMOUNT, timeout=1 + i / n))
            due.append(services.place_order(amount=AMOUNT, timeout=12 + 3 * i / n))
            slowest = max(slowest, (time.monotonic() - started) / 2)
        during = overdue + due
        failures = [r.getMessage() for r in caplog.records if "NOT armed" in r.getMessage()]
        named = {re.findall(r"order (\S+) NOT armed", message)[0] for message in failures}
        assert len(failures) == len(during), "one error logged per order, no more"
        assert named == {str(o.pk) for o in during}
        assert not of(during).exclude(timer_armed_for=None).exists()
        # Long enough for the first ones to be overdue (deadline + grace) before it ends.
        last_overdue = max(o.expires_at for o in overdue).timestamp() + GRACE + 0.5
        wait_for(
            lambda: time.monotonic() - outage > 3 and time.time() > last_overdue,
            30,
            "the outage to last",
        )
        server.start()
        outage_seconds = time.monotonic() - outage

        wait_for(lambda: reconnected_or_died(worker), 60, "the worker to reconnect or exit")
        crash = restart_if_dead(worker)
        totals = sweep_until_settled(before + during, 60)
        wait_for(lambda: drained(server, prefix), 30, "every timer to run")

    found = report(
        "Redis down and back",
        before + during,
        outage_seconds=f"{outage_seconds:.1f}",
        placed_during_the_outage=len(during),
        slowest_placement=f"{slowest * 1000:.0f} ms",
        timers_armed_by_sweeps=totals["timers armed"],
        expired_by_sweeps=totals["expired"],
        worker_restarted=crash or "no",
    )
    assert found == []
    assert expired_by(of(due)) == {"expiry timer": n}, "timers armed by the sweep fire"
    assert expired_by(of(overdue)) == {"sweep": n}


def test_worker_holding_timers_survives_a_redis_restart_and_fires_the_timers_armed_after_it(
    broker: tuple[RedisServer, str],
) -> None:
    """Redis stops for a second and comes back empty while the only worker holds timers.
    With celery/kombu 5.7.0 this worker used to exit ("Unrecoverable error:
    AttributeError: 'NoneType' object has no attribute 'hostname'", docs/RELIABILITY.md);
    orders/compat.py finishes the channel close that kills it. The same process (same
    pid) reconnects and fires a timer armed after the restart; the timers it held are gone
    with Redis's data, and ``orders_rearm`` arms them again, for the same worker to fire."""
    server, prefix = broker
    with workers("reconnect", 1, env_for(server, prefix)) as [worker]:
        pid = worker.pid
        held = place(5, 8, 8)
        wait_for(lambda: unacked(server.client(), prefix) == 5, 30, "the worker to hold the timers")
        server.stop()
        time.sleep(1)  # an outage of a second: a restart, a failover
        server.start()
        wait_for(lambda: reconnected_or_died(worker), 60, "the worker to reconnect or exit")
        assert worker.proc is not None
        assert worker.proc.poll() is None, "the worker died: " + restart_if_dead(worker)
        assert "finishing the close" in worker.log(), "the fix in orders/compat.py did not run"
        assert unacked(server.client(), prefix) == queued(server.client(), prefix) == 0
        # The restarted consumer writes its heartbeat into the emptied Redis again.
        wait_for(
            lambda: len(heartbeat.live_workers(server.client())) == 1,
            15,
            "the worker's heartbeat to come back",
        )

        after = place(1, 2, 2)
        assert of(after).exclude(timer_armed_for=None).count() == 1, "armed after the restart"
        wait_for(
            lambda: of(after).filter(status=Status.CANCELLED).exists(), 30, "its timer to fire"
        )
        assert of(held).filter(status=Status.CREATED).count() == len(held)
        out = io.StringIO()
        call_command("orders_rearm", stdout=out, stderr=io.StringIO())
        wait_for(
            lambda: not of(held).filter(status=Status.CREATED).exists(),
            30,
            "the rearmed timers to fire",
        )
        wait_for(lambda: drained(server, prefix), 30, "every timer to run")
        assert worker.proc.poll() is None
        assert worker.pid == pid, "the timers fired in the worker that lived through the restart"
        assert "Unrecoverable error" not in worker.log()

    found = report(
        "Redis restarted under a worker holding timers",
        held + after,
        timers_held_and_lost=len(held),
        rearmed=re.findall(r"Re-armed (\d+)", out.getvalue()),
    )
    assert found == []
    assert expired_by(of(held + after)) == {"expiry timer": len(held) + len(after)}


# d. Paid while Redis is down ---------------------------------------------------------


def test_orders_paid_while_redis_is_down_still_ship_and_stray_payments_are_refunded(
    broker: tuple[RedisServer, str], settings: Settings
) -> None:
    """Payments arrive while Redis is down: the shipping and refund tasks cannot be
    queued. Once it is back, the sweep ships every paid order (older than
    SHIPPING_RETRY_AFTER) and refunds every late or surplus payment, once; the unpaid
    orders, whose timers were lost with the connection, expire by the sweep."""
    server, prefix = broker
    settings.ORDERS = settings.ORDERS | {"SHIPPING_RETRY_AFTER": 1}
    n = scaled(100, 50)
    with workers("paid-outage", 1, env_for(server, prefix)) as [worker]:
        expired_first = place(n // 5, 1, 1.5)
        wait_for(
            lambda: not of(expired_first).filter(status=Status.CREATED).exists(),
            30,
            "the first orders to expire",
        )
        orders = place(n, 6, 7)
        wait_for(lambda: drained_except(server, prefix, n), 30, "the worker to hold the timers")

        server.stop()
        paid, unpaid = orders[: n // 2], orders[n // 2 :]
        for order in paid:
            services.record_payment(order_id=order.pk, payment_ref=f"p-{order.pk}", amount=AMOUNT)
        twice = paid[: n // 10]
        for order in twice:  # paid twice
            services.record_payment(order_id=order.pk, payment_ref=f"s-{order.pk}", amount=AMOUNT)
        for order in expired_first:  # paid too late
            services.record_payment(order_id=order.pk, payment_ref=f"l-{order.pk}", amount=AMOUNT)
        assert of(paid).filter(status=Status.PAID).count() == len(paid)
        ids = [str(o.pk) for o in orders + expired_first]
        stray = payments_to_refund(ids).count()
        time.sleep(1)  # an outage of a few seconds in all
        server.start()

        wait_for(lambda: reconnected_or_died(worker), 60, "the worker to reconnect or exit")
        crash = restart_if_dead(worker)
        totals = sweep_until_settled(orders + expired_first, 60)
        wait_for(lambda: drained(server, prefix), 30, "every task to run")

    found = report(
        "paid while Redis is down",
        orders + expired_first,
        paid_during_the_outage=len(paid) + len(twice) + len(expired_first),
        stray_payments=stray,
        shipments_retried_by_sweeps=totals["shipments"],
        refunds_retried_by_sweeps=totals["refunds"],
        worker_restarted=crash or "no",
    )
    assert found == []
    assert set(histories(of(paid)).values()) == {KEPT}
    assert set(histories(of(unpaid)).values()) == {EXPIRED}
    assert stray == len(twice) + len(expired_first)
    assert not payments_to_refund(ids).exists()
    assert Payment.objects.filter(order__in=ids).exclude(refunded_at=None).count() == stray
