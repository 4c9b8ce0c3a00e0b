"""Two beats at once: each sends the sweep, so two sweeps run at the same time over the
same overdue orders. Safe, because a sweep locks the rows it expires with
``skip_locked`` and re-checks each under the lock: every order is expired once.

Real processes: two ``celery -A config beat`` with a one-second SWEEP_INTERVAL (each
with its own schedule file, as on two machines) and a worker that runs two sweeps at a
time, all on this test's own Redis keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from config import embedded_redis, processes
from orders import get_order_model, services
from orders.conf import get_settings
from orders.models import AbstractOrder, Status, SweepRun
from tests.chaos import EXPIRED, expired_by, histories, key_prefix, wait_for, workers
from tests.conftest import worker_env

Order = get_order_model()

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


class BeatProcess(processes.BeatProcess):
    """A beat of this suite, logging to var/test-beat-<name>.log (or under VAR_DIR)."""

    def __init__(self, *, name: str, env: dict[str, str]) -> None:
        var = embedded_redis.VAR_DIR
        super().__init__(
            name=name,
            env=env,
            log_path=var / f"test-beat-{name}.log",
            schedule=var / f"test-beat-{name}-schedule",
        )


@contextmanager
def beats(names: list[str], env: dict[str, str]) -> Iterator[list[BeatProcess]]:
    with ExitStack() as stack:
        started = []
        for name in names:
            beat = BeatProcess(name=name, env=env)
            stack.callback(beat.stop)
            started.append(beat.start())
        yield started


def place_overdue(n: int) -> list[AbstractOrder]:
    """``n`` unpaid orders past their deadline whose timers were never armed (placed an
    hour ago with a deadline beyond the horizon, as if the broker had been down), all
    committed at once so that the next sweeps find them together."""
    an_hour_ago = timezone.now() - timedelta(hours=1)
    beyond_the_horizon = get_settings().TIMER_HORIZON + 60
    with transaction.atomic():
        return [
            services.place_order(amount="10.00", timeout=beyond_the_horizon, now=an_hour_ago)
            for _ in range(n)
        ]


SWEEP_DONE = re.compile(
    r"^(\S+ \S+) INFO \S+ Task orders\.sweep\[\S+\] succeeded in ([\d.]+)s: "
    r"\{'expired': (\d+)",
    re.MULTILINE,
)


@dataclass(frozen=True)
class SweepRan:
    started: datetime
    ended: datetime
    expired: int


def sweeps_run(log: str) -> list[SweepRan]:
    """The sweeps the worker ran, from its "succeeded" lines: when, and how many orders
    each expired."""
    found = []
    for stamp, runtime, expired in SWEEP_DONE.findall(log):
        ended = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=UTC)
        found.append(SweepRan(ended - timedelta(seconds=float(runtime)), ended, int(expired)))
    return found


SWEEP_RECEIVED = re.compile(r"Task orders\.sweep\[(\S+)\] received")
SWEEP_ENDED = re.compile(r"Task orders\.sweep\[(\S+)\] (?:succeeded|raised|failed)")


def sweeps_unfinished(log: str) -> set[str]:
    """The sweeps the worker received and has not finished: a long one, in one process,
    ends after many short ones in the other."""
    return set(SWEEP_RECEIVED.findall(log)) - set(SWEEP_ENDED.findall(log))


def overlapping(sweeps: list[SweepRan]) -> list[tuple[SweepRan, SweepRan]]:
    return [
        (a, b)
        for i, a in enumerate(sweeps)
        for b in sweeps[i + 1 :]
        if a.started < b.ended and b.started < a.ended
    ]


def test_two_beats_sweep_at_once_and_every_overdue_order_expires_once() -> None:
    # Each expiry slowed to 2 ms in the worker: a sweep of them lasts about 4 s (6 s on
    # SQLite), several sweep intervals, however fast the machine.
    n = 2000 if connection.vendor == "postgresql" else 3000
    env = worker_env(
        CELERY_KEY_PREFIX=key_prefix("beats"),
        ORDERS_SWEEP_INTERVAL="1",
        ORDERS_EXPIRY_BATCH_SIZE="50",
        ORDERS_TEST_EXPIRY_DELAY="0.002",
    )
    with workers("beats", 1, env, concurrency=2) as [worker], beats(["a", "b"], env) as both:
        wait_for(lambda: all(b.sent() for b in both), 30, "both beats to send a sweep")
        orders = place_overdue(n)
        committed = timezone.now()
        ids = [o.pk for o in orders]
        wait_for(
            lambda: not Order.objects.filter(pk__in=ids, status=Status.CREATED).exists(),
            120,
            "every overdue order to expire",
        )
        sent = {b.name: b.sent() for b in both}
        wait_for(
            lambda: (
                len(sweeps_run(worker.log())) >= sum(sent.values()) - 2
                and not sweeps_unfinished(worker.log())
            ),
            30,
            "the sweeps sent to finish",
        )
        sweeps = [s for s in sweeps_run(worker.log()) if s.ended > committed]

    queryset = Order.objects.filter(pk__in=ids)
    expired_per_sweep = [s.expired for s in sweeps if s.expired]
    print(
        f"\ntwo beats ({connection.vendor}): {n} overdue orders, sweeps sent {sent}, "
        f"orders expired by each sweep that found some {expired_per_sweep}, "
        f"sweeps running at the same time {len(overlapping(sweeps))} pairs, "
        f"expired by {dict(expired_by(queryset))}"
    )
    assert set(histories(queryset).values()) == {EXPIRED}, "one expiry, one history row each"
    assert sum(expired_by(queryset).values()) == n
    assert sum(SweepRun.objects.values_list("expired", flat=True)) == expired_by(queryset)["sweep"]
    if connection.vendor == "postgresql":
        assert overlapping(sweeps), "the two beats' sweeps never ran at the same time"
        # A sweep goes on batch after batch until no overdue order is left: two that
        # both found some of the orders committed together shared the work row by row.
        assert len(expired_per_sweep) >= 2, "the sweeps did not share the work"
    # (SQLite lets one writer in at a time: a second sweep waits for the first one's
    # write lock, or finds nothing left; either way each order expired once, above.)
