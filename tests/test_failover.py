"""Redis under Sentinel fails over: the primary is SIGKILLed with timers pending, a
sentinel promotes the replica, and the app carries on.

Each test starts its own primary, replica and two sentinels (tests/redis_server.py
``SentinelGroup``) on free ports, a real worker process whose REDIS_URL is the
``sentinel://`` URL of both sentinels, and publishes there itself. Countdown messages the
worker held when its connection broke are lost with it (the worker drops its in-memory
timers on a broken connection; what the replica got of the ``unacked`` hash only comes
back after the visibility timeout): the sweep must cover them. Every order must end with
one history row per transition, whatever did it; orders placed once the replica has
taken over must expire on time by their own timers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from django.db import connection
from pytest_django import Settings

from orders import broker, health, services
from orders.models import Status
from tests.chaos import (
    EXPIRED,
    KEPT,
    expired_by,
    histories,
    key_prefix,
    restart_if_dead,
    wait_for,
    workers,
)
from tests.conftest import WorkerProcess, worker_env
from tests.redis_server import SentinelGroup, publishing_to, queued, unacked
from tests.test_beat import BeatProcess
from tests.test_reliability import AMOUNT, GRACE, of, place, report, sweep_until_settled

pytestmark = [
    pytest.mark.integration,
    pytest.mark.chaos,
    pytest.mark.django_db(transaction=True),
]

MASTER = "orders-test"


@pytest.fixture
def sentinel_broker(settings: Settings) -> Iterator[tuple[SentinelGroup, str]]:
    """A primary, a replica and two sentinels; this process publishing through them."""
    settings.ORDERS = settings.ORDERS | {"SWEEP_GRACE": GRACE, "SHIPPING_RETRY_AFTER": 1}
    prefix = key_prefix("failover")
    with (
        SentinelGroup(MASTER) as group,
        publishing_to(group.url, prefix, master_name=MASTER),
    ):
        yield group, prefix


def reconnected_or_died(worker: WorkerProcess) -> bool:
    assert worker.proc is not None
    return worker.proc.poll() is not None or worker.log().count("Connected to sentinel://") >= 2


def test_the_apps_own_client_follows_the_master_through_a_failover(
    sentinel_broker: tuple[SentinelGroup, str],
) -> None:
    """broker.redis_client() (the batched timers' SET NX, the health check) asks the
    sentinels where the master is: the primary first, the promoted replica after."""
    group, _ = sentinel_broker
    client = broker.redis_client(timeout=2)
    assert client.info("server")["tcp_port"] == group.primary.port
    assert redis_is_healthy()

    group.primary.kill()
    wait_for(group.promoted, 30, "the replica to be promoted")

    # The same client object, as scheduling's cached one: it reconnects to the new master.
    wait_for(lambda: _answers(client), 10, "the client to reach the new master")
    assert client.info("server")["tcp_port"] == group.replica.port
    assert redis_is_healthy()
    assert client.set("orders-failover-probe", "1", ex=10)


def redis_is_healthy() -> bool:
    """What /health/ says of Redis (it builds its client from the broker URL)."""
    return next(c for c in health.run_checks() if c.name == "redis").ok


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


@pytest.mark.parametrize("mode", ["per_order", "batched"])
def test_primary_killed_the_replica_takes_over_and_every_order_expires_once(
    sentinel_broker: tuple[SentinelGroup, str], settings: Settings, mode: str
) -> None:
    group, prefix = sentinel_broker
    settings.ORDERS = settings.ORDERS | {"TIMER_MODE": mode}
    n = 100 if connection.vendor == "postgresql" else 50
    env = worker_env(REDIS_URL=group.url, REDIS_SENTINEL_MASTER=MASTER, CELERY_KEY_PREFIX=prefix)
    with workers(f"failover-{mode}-", 1, env) as [worker]:
        assert broker.redis_client().info("server")["tcp_port"] == group.primary.port
        before = place(n, 5, 8)  # timers pending when the primary dies
        if mode == "per_order":  # held by the worker; batched: buckets in the sorted set
            wait_for(
                lambda: unacked(group.primary.client(), prefix) == n,
                30,
                "the worker to hold the timers",
            )
        paid = before[: n // 10]

        group.primary.kill()  # checks INFO server process_id first
        killed = time.monotonic()
        # While no master answers: orders are still placed and paid (their timers and
        # shipments are left to the sweep), nothing raises.
        during = place(n // 5, 1, 2)
        for order in paid:
            services.record_payment(order_id=order.pk, payment_ref=f"p-{order.pk}", amount=AMOUNT)
        mean_write = (time.monotonic() - killed) / (len(during) + len(paid))
        wait_for(group.promoted, 30, "the replica to be promoted")
        failover_seconds = time.monotonic() - killed

        wait_for(lambda: reconnected_or_died(worker), 60, "the worker to reconnect or exit")
        crash = restart_if_dead(worker)
        assert broker.redis_client().info("server")["tcp_port"] == group.replica.port

        # On the new master, due after every timer pending at the kill: their own timers
        # fire on time.
        last = max(o.expires_at for o in before).timestamp()
        first = max(2.0, last + 1 - time.time())
        after = place(n // 2, first, first + 2)
        wait_for(
            lambda: not of(after).filter(status=Status.CREATED).exists(),
            30,
            "the orders placed after the failover to expire",
        )
        totals = sweep_until_settled(before + during + after, 90)

    everything = before + during + after
    found = report(
        f"Sentinel failover, {mode}",
        everything,
        failover_seconds=f"{failover_seconds:.1f}",
        timers_unacked_on_the_new_master=unacked(group.replica.client(), prefix),
        placed_during_the_failover=len(during),
        mean_write_during_the_failover=f"{mean_write * 1000:.0f} ms",
        expired_by_sweeps=totals["expired"],
        timers_armed_by_sweeps=totals["timers armed"],
        shipments_retried_by_sweeps=totals["shipments"],
        worker_restarted=crash or "no",
    )
    if crash:
        print(f"the worker died when the primary went and was restarted: {crash}")
    assert found == []
    assert set(histories(of(paid)).values()) == {KEPT}
    assert set(histories(of(everything[len(paid) :])).values()) == {EXPIRED}
    assert expired_by(of(after)) == {"expiry timer": len(after)}
    for order in of(after):
        assert order.cancelled_at is not None
        assert (order.cancelled_at - order.expires_at).total_seconds() < 2.0, "on time"


def test_a_beat_keeps_sending_the_sweep_through_a_failover(
    sentinel_broker: tuple[SentinelGroup, str],
) -> None:
    """The default beat scheduler keeps nothing in Redis and survives the failover: its
    sweeps reach the promoted replica (why README recommends two plain beats, not a
    scheduler that locks in Redis)."""
    group, prefix = sentinel_broker
    env = worker_env(
        REDIS_URL=group.url,
        REDIS_SENTINEL_MASTER=MASTER,
        CELERY_KEY_PREFIX=prefix,
        ORDERS_SWEEP_INTERVAL="1",
    )
    beat = BeatProcess(name="failover", env=env).start()
    try:
        wait_for(lambda: queued(group.primary.client(), prefix) >= 2, 30, "sweeps on the primary")
        group.primary.kill()
        wait_for(group.promoted, 30, "the replica to be promoted")
        before = queued(group.replica.client(), prefix)
        wait_for(
            lambda: queued(group.replica.client(), prefix) >= before + 3,
            30,
            "the beat's sweeps to reach the new master",
        )
        assert beat.proc is not None
        assert beat.proc.poll() is None, "the beat died in the failover"
    finally:
        beat.stop()
