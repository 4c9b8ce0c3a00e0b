"""Fault injection for the default, batched timers (buckets in one Redis sorted set, a
waker in each worker): a worker SIGKILLed mid-flight, Redis flushed (with and without
``orders_rearm``, which may run twice), Redis down and back. As test_reliability.py,
each test has its own ``redis-server`` and workers, and checks every order against the
same invariants: nothing lost, nothing doubled."""

from __future__ import annotations

import io
import logging
import re
import time
from collections.abc import Iterator

import pytest
from django.core.management import call_command
from pytest_django import Settings

from orders import scheduling, services
from orders.models import Status
from tests.chaos import expired_by, key_prefix, kill, reconnected_or_died, restart_if_dead, wait_for
from tests.chaos import workers as started_workers
from tests.redis_server import RedisServer, publishing_to
from tests.test_reliability import (
    AMOUNT,
    GRACE,
    drained,
    env_for,
    of,
    place,
    report,
    scaled,
    sweep_until_settled,
)

pytestmark = [pytest.mark.chaos, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def broker(settings: Settings) -> Iterator[tuple[RedisServer, str]]:
    settings.ORDERS = settings.ORDERS | {"SWEEP_GRACE": GRACE, "TIMER_MODE": "batched"}
    prefix = key_prefix("chaos-batched")
    with RedisServer() as server, publishing_to(server.url, prefix):
        yield server, prefix


def buckets_pending(server: RedisServer) -> int:
    return int(server.client().zcard(scheduling.timers_key()))


def test_worker_killed_mid_flight_each_order_expires_once_via_new_worker_and_sweep(
    broker: tuple[RedisServer, str],
) -> None:
    """SIGKILL the only worker while buckets are firing: its waker may have claimed a
    bucket (the lease keeps it from others for 10 s), its pool may hold a bucket's task
    unacknowledged (kept for the visibility timeout, an hour) or be half-way through a
    batch. The next worker's waker takes the rest of the set, and the claimed ones after
    their lease; the sweep the unacknowledged. Every order is cancelled exactly once."""
    server, prefix = broker
    n = scaled(300, 150)
    env = env_for(server, prefix)
    with started_workers("bkill-a", 1, env) as [first]:
        orders = place(n, 3, 10)
        wait_for(
            lambda: of(orders).filter(status=Status.CANCELLED).count() >= n // 5,
            30,
            "a fifth to expire",
        )
        kill(first)
        expired_before = of(orders).filter(status=Status.CANCELLED).count()
        assert expired_before < n, "the worker was killed too late: every bucket had fired"
        assert buckets_pending(server) > 0

    with started_workers("bkill-b", 1, env):
        later = place(scaled(60, 30), 1, 3)  # the new worker's waker fires these
        totals = sweep_until_settled(orders + later, 60)

    found = report(
        "batched: worker SIGKILLed mid-flight",
        orders + later,
        expired_before_the_kill=expired_before,
        by=dict(expired_by(of(orders))),
        sweeps=totals["sweeps"],
    )
    assert found == []
    # The new worker's waker fires the later orders' buckets; on a loaded machine, while
    # it also takes the dead one's leftovers, the sweep (1 s of grace here) may get a few.
    later_by = expired_by(of(later))
    assert later_by["expiry timer"] >= len(later) // 2, later_by
    assert expired_by(of(orders))["expiry timer"] > expired_before, (
        "the next worker's waker fired the buckets the dead one left"
    )


def test_redis_flushed_orders_rearm_twice_every_order_expires_on_time_by_its_timer(
    broker: tuple[RedisServer, str],
) -> None:
    """FLUSHALL takes the sorted set: no bucket is left to fire. ``orders_rearm`` (run
    twice, as an operator unsure it ran would) adds each bucket once; the worker's waker
    fires them, and every order expires by its timer, once, on time-ish."""
    server, prefix = broker
    n = scaled(200, 100)
    with started_workers("bflush-rearm", 1, env_for(server, prefix)):
        orders = place(n, 8, 10)
        buckets = len({scheduling.bucket_of(o.expires_at) for o in orders})
        assert buckets_pending(server) == buckets
        server.flushall()  # checks INFO server process_id first
        assert buckets_pending(server) == 0
        outputs = []
        for _ in range(2):
            out = io.StringIO()
            call_command("orders_rearm", stdout=out, stderr=io.StringIO())
            outputs.append(out.getvalue())
        assert buckets_pending(server) == buckets, "one member per bucket, however many runs"
        wait_for(
            lambda: not of(orders).filter(status=Status.CREATED).exists(),
            30,
            "every order to expire",
        )
        wait_for(lambda: drained(server, prefix), 30, "every bucket's task to run")

    found = report("batched: Redis FLUSHALL, then orders_rearm twice", orders, buckets=buckets)
    assert found == []
    assert all(f"Re-armed {n} expiry timers" in output for output in outputs)
    assert expired_by(of(orders)) == {"expiry timer": n}
    for order in of(orders):
        assert order.cancelled_at is not None
        assert (order.cancelled_at - order.expires_at).total_seconds() < 3.0, "on time-ish"


def test_redis_flushed_without_rearm_the_sweep_alone_expires_every_order(
    broker: tuple[RedisServer, str],
) -> None:
    server, prefix = broker
    n = scaled(150, 75)
    with started_workers("bflush-sweep", 1, env_for(server, prefix)):
        orders = place(n, 4, 6)
        server.flushall()
        totals = sweep_until_settled(orders, 40)

    found = report("batched: Redis FLUSHALL, sweep only", orders, sweeps=totals["sweeps"])
    assert found == []
    assert expired_by(of(orders)) == {"sweep": n}


def test_redis_down_orders_are_placed_the_waker_waits_and_every_order_expires_once(
    broker: tuple[RedisServer, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stops for some seconds and comes back empty. Orders placed meanwhile are
    saved, each failure logged once; the waker carries on when Redis is back (or its
    consumer restarts it); the sweep expires the overdue orders and arms the buckets of
    those still due, which the waker fires."""
    server, prefix = broker
    n = scaled(100, 50)
    with started_workers("boutage", 1, env_for(server, prefix)) as [worker]:
        before = place(n, 4, 6)  # their buckets go with Redis's data
        server.stop()
        caplog.set_level(logging.ERROR, logger="orders.timers")
        caplog.clear()
        overdue = [services.place_order(amount=AMOUNT, timeout=1) for _ in range(n // 2)]
        due = [services.place_order(amount=AMOUNT, timeout=15) for _ in range(n // 2)]
        failures = [r.getMessage() for r in caplog.records if "NOT armed" in r.getMessage()]
        assert len(failures) == len(overdue + due), "one error logged per order, no more"
        assert not of(overdue + due).exclude(timer_armed_for=None).exists()
        time.sleep(1 + GRACE + 0.5)  # the overdue ones are past their grace
        server.start()
        wait_for(lambda: reconnected_or_died(worker), 60, "the worker to reconnect or exit")
        crash = restart_if_dead(worker)
        totals = sweep_until_settled(before + overdue + due, 60)
        log = worker.log()

    found = report(
        "batched: Redis down and back",
        before + overdue + due,
        timers_armed_by_sweeps=totals["timers armed"],
        worker_restarted=crash or "no",
    )
    assert found == []
    assert len(re.findall("cannot reach Redis", log)) <= 2, "said once per outage"
    assert expired_by(of(due)) == {"expiry timer": len(due)}, "buckets armed by the sweep fire"
    assert expired_by(of(overdue)) == {"sweep": len(overdue)}
