"""The experiments. Each returns plain dataclasses; ``bench.report`` turns them into
tables and plots. Nothing here asserts on time: a figure that misses its goal is
reported as missed, and a wait that times out is reported as unexpired orders."""

from __future__ import annotations

import logging
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import DatabaseError, connection, reset_queries, transaction
from django.db.models import F
from django.test.utils import CaptureQueriesContext, override_settings
from django.utils import timezone

from bench import data
from bench.env import VAR_DIR, BenchEnv, bench_keys, redis_client
from bench.loops import poll_once, sweep_once
from bench.procs import (
    MB,
    BenchProcess,
    LoopProcess,
    PeakSampler,
    WorkerProcess,
    cpu_seconds,
    sample_memory,
)
from orders import get_order_model, scheduling, services
from orders.conf import get_settings
from orders.models import Status

if TYPE_CHECKING:
    from bench.events import EventsResults

Order = get_order_model()

log = logging.getLogger("bench")

POLL, SWEEP, PER_ORDER, BATCHED, FLOOR = "poll", "sweep", "per_order", "batched", "floor"
# Not a strategy: strategy 3 as it was before the bench, with a new database connection
# per task (bench/settings_no_db_reuse.py), to show what keeping it changed. Lateness
# and burst only.
PER_ORDER_RECONNECT = "per_order_no_db_reuse"
STRATEGIES = (POLL, SWEEP, PER_ORDER, BATCHED)
EXPERIMENTS = (PER_ORDER_RECONNECT,)
TIMERS = (PER_ORDER, BATCHED, PER_ORDER_RECONNECT)
LABELS = {
    POLL: "1. polling every 1 s (article)",
    SWEEP: "2. sweep only (cron)",
    PER_ORDER: "3. countdown per order",
    BATCHED: "4. batched timers (buckets in a Redis sorted set, the default)",
    FLOOR: "5. floor: one raw UPDATE",
    PER_ORDER_RECONNECT: "3b. countdown per order, new DB connection per task (before the fix)",
}


@dataclass(frozen=True)
class Profile:
    name: str
    sustained_rate: float  # orders placed (and so due) per second
    sustained_seconds: float
    sustained_timeout: float  # each order's time to pay
    burst_size: int
    pending_sizes: tuple[int, ...]  # pending timers, for every strategy
    batched_sizes: tuple[int, ...]  # further sizes for the batched strategy only
    rearm_orders: int  # unpaid orders whose timers orders_rearm arms again (batched)
    sweep_interval: float
    arming_orders: int  # per variant
    query_orders: int
    settle_seconds: float
    events_burst: int  # bench/events.py: the burst with and without a receiver
    dispatch_events: int  # ... and the events queued at once for the dispatcher
    experiments: tuple[str, ...] = ()  # run by default besides the strategies
    batched_bursts: tuple[int, ...] = ()  # further burst sizes for the batched strategy
    concurrency: int = 2
    poll_interval: float = 1.0
    pending_spread: float = 30 * 60  # deadlines of the pending timers, over this window
    pending_start: float = 15 * 60  # ... starting this far ahead (nothing fires meanwhile)


QUICK = Profile(
    name="quick",
    sustained_rate=20,
    sustained_seconds=3,
    sustained_timeout=1.5,
    burst_size=500,
    pending_sizes=(1_000, 5_000),
    batched_sizes=(),
    rearm_orders=5_000,
    sweep_interval=5,
    arming_orders=160,
    query_orders=100,
    settle_seconds=0.5,
    events_burst=200,
    dispatch_events=100,
)
FULL = Profile(
    name="full",
    sustained_rate=100,
    sustained_seconds=120,
    sustained_timeout=5,
    burst_size=10_000,
    pending_sizes=(10_000, 100_000),
    batched_sizes=(1_000_000,),
    rearm_orders=1_000_000,
    sweep_interval=60,
    arming_orders=1_000,
    query_orders=1_000,
    settle_seconds=5.0,
    events_burst=10_000,
    dispatch_events=5_000,
    experiments=EXPERIMENTS,
    batched_bursts=(100_000,),
)
# A mid-sized run, to check the harness end to end before a full one (about 6 minutes).
MEDIUM = Profile(
    name="medium",
    sustained_rate=50,
    sustained_seconds=20,
    sustained_timeout=3,
    burst_size=3_000,
    pending_sizes=(3_000, 20_000),
    batched_sizes=(100_000,),
    rearm_orders=100_000,
    sweep_interval=15,
    arming_orders=600,
    query_orders=300,
    settle_seconds=2.0,
    events_burst=3_000,
    dispatch_events=2_000,
    experiments=EXPERIMENTS,
)


# Results ------------------------------------------------------------------------------


@dataclass
class Summary:
    n: int
    p50: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        if not values:
            nan = float("nan")
            return cls(n=0, p50=nan, p99=nan, max=nan, mean=nan)
        return cls(
            n=len(values),
            p50=data.percentile(values, 50),
            p99=data.percentile(values, 99),
            max=max(values),
            mean=statistics.fmean(values),
        )


@dataclass
class LatenessResult:
    strategy: str
    orders: int
    target_rate: float
    placed_rate: float
    recorded: Summary
    written: Summary
    unexpired: int
    samples: list[float] = field(default_factory=list)  # written lateness, for the plot


@dataclass
class BurstResult:
    strategy: str
    orders: int
    lead: float  # seconds from the start of arming to the shared deadline
    armed_in: float
    intake_in: float | None  # until the worker had taken every timer message
    done_after: float | None  # from the deadline until no order of the burst was unpaid
    processing_rate: float | None  # orders / (all committed - first batch began)
    end_to_end_rate: float | None  # orders / done_after
    unexpired: int
    written: Summary
    cpu_ms_per_order: float | None = None  # the worker's (or loop's) CPU, all processes
    recorded: Summary | None = None  # cancelled_at - expires_at, as the app stamps it


@dataclass
class FloorResult:
    orders: int
    seconds: float
    rate: float
    with_history_seconds: float | None
    with_history_rate: float | None


@dataclass
class RearmResult:
    orders: int
    buckets: int  # distinct timer buckets (deadlines and reminders) added
    seconds: float  # services.rearm_timers (orders_rearm), batched mode
    floor_seconds: float  # one raw UPDATE marking the same rows armed


@dataclass
class MemoryPoint:
    strategy: str
    pending: int
    main_rss: float
    tree_rss: float
    tree_pss: float | None
    peak_main_rss: float
    peak_tree_rss: float
    redis_used: float  # INFO memory used_memory, whole server
    redis_keys: float  # MEMORY USAGE of the bench's own keys
    cpu_percent: float  # of one core, while holding
    arm_seconds: float = 0.0
    intake_seconds: float | None = 0.0


@dataclass
class ArmingResult:
    variant: str
    orders: int
    mean_ms: float
    median_ms: float


@dataclass
class QueriesResult:
    path: str
    expired: int
    queries: int  # every statement Django ran, BEGIN and COMMIT included
    statements: int  # without transaction control (BEGIN, COMMIT, SAVEPOINT, RELEASE)
    ms_per_order: float

    @property
    def per_order(self) -> float:
        return self.queries / self.expired if self.expired else float("nan")


@dataclass
class Results:
    profile: Profile
    stack: dict[str, str]
    started: str
    machine: dict[str, str] = field(default_factory=dict)
    arming: list[ArmingResult] = field(default_factory=list)
    queries: list[QueriesResult] = field(default_factory=list)
    floor: FloorResult | None = None
    rearm: RearmResult | None = None
    lateness: list[LatenessResult] = field(default_factory=list)
    bursts: list[BurstResult] = field(default_factory=list)
    memory: list[MemoryPoint] = field(default_factory=list)
    events: EventsResults | None = None  # bench/events.py; written to events.md
    notes: list[str] = field(default_factory=list)
    durations: dict[str, float] = field(default_factory=dict)
    loads: dict[str, tuple[float, float]] = field(default_factory=dict)  # 1-min load avg


# The bench ----------------------------------------------------------------------------


def _direct_arm(strategy: str, ids: list[Any], deadlines: list[datetime]) -> None:
    """Arm timers for rows inserted directly, through the scheduling module's own
    publish functions (what ``place_order`` runs on commit). Batched: one call per
    bucket not yet armed, since the rest of a bucket's orders only find it in the set."""
    if strategy in (PER_ORDER, PER_ORDER_RECONNECT):
        for pk, deadline in zip(ids, deadlines, strict=True):
            scheduling.publish_expiry_timer(str(pk), deadline)
    elif strategy == BATCHED:
        seen: set[int] = set()
        for pk, deadline in zip(ids, deadlines, strict=True):
            bucket = scheduling.bucket_of(deadline)
            if bucket not in seen:
                seen.add(bucket)
                scheduling.publish_bucket_timer(str(pk), deadline)


class Bench:
    def __init__(self, env: BenchEnv, profile: Profile, results: Results, out: Path) -> None:
        self.env = env
        self.profile = profile
        self.results = results
        self.out = out
        self.redis = redis_client(env.redis_url)
        self.prefix = env.key_prefix
        self.rng = random.Random(20261125)  # the same data for every strategy

    # Helpers ------------------------------------------------------------------------

    def say(self, message: str) -> None:
        print(message, flush=True)

    @contextmanager
    def producer(self, strategy: str) -> Iterator[None]:
        """This process's ORDERS while it places orders for ``strategy``: its timer
        mode, or, for the strategies without timers, a horizon so short that
        ``place_order`` arms nothing."""
        orders = dict(settings.ORDERS)
        orders["TIMER_MODE"] = self.timer_mode(strategy)
        if strategy not in TIMERS:
            orders["TIMER_HORIZON"] = 1
        with override_settings(ORDERS=orders):
            yield

    @staticmethod
    def timer_mode(strategy: str) -> str:
        return BATCHED if strategy == BATCHED else PER_ORDER

    def purge_queues(self) -> None:
        """Delete the bench's queue, unacked and bucket keys, keeping kombu's bindings
        (a producer that declared them once does not declare them again)."""
        keys = [k for k in bench_keys(self.redis, self.prefix) if b"_kombu.binding" not in k]
        for start in range(0, len(keys), 1000):
            self.redis.delete(*keys[start : start + 1000])

    def queue_length(self) -> int:
        return int(self.redis.llen(f"{self.prefix}celery"))

    def redis_memory(self) -> tuple[float, float]:
        used = float(self.redis.info("memory")["used_memory"])
        ours = 0.0
        for key in bench_keys(self.redis, self.prefix):
            ours += float(self.redis.memory_usage(key, samples=0) or 0)
        return used, ours

    def start(self, strategy: str) -> BenchProcess:
        if strategy in TIMERS:
            extra = {"ORDERS_TIMER_MODE": self.timer_mode(strategy)}
            if strategy == PER_ORDER_RECONNECT:
                extra["DJANGO_SETTINGS_MODULE"] = "bench.settings_no_db_reuse"
            worker = WorkerProcess(
                name=f"worker-{strategy}",
                env=self.env.child_env(**extra),
                concurrency=self.profile.concurrency,
            )
            return worker.start()
        interval = self.profile.poll_interval if strategy == POLL else self.profile.sweep_interval
        return LoopProcess(
            name=f"loop-{strategy}",
            env=self.env.child_env(),
            mode=strategy,
            interval=interval,
            status=self.status_path(strategy),
        ).start()

    def status_path(self, strategy: str) -> Path:
        return VAR_DIR / f"bench-loop-{strategy}.json"

    def loop_cycles(self, strategy: str) -> float:
        import json

        try:
            return float(json.loads(self.status_path(strategy).read_text())["cycles"])
        except (OSError, ValueError, KeyError):
            return 0.0

    def drain_timeout(self) -> float:
        """How long to wait, past a deadline, before calling orders unexpired."""
        return max(30.0, 2 * self.profile.sweep_interval + 10)

    # Experiments without a strategy process ----------------------------------------

    def arming_cost(self) -> None:
        """What arming adds to ``place_order``: the same call with timers in either mode,
        with none (deadline beyond a tiny horizon), and a bare ``Order.objects.create``.
        Interleaved in rounds so that the machine's noise falls on every variant."""
        variants: dict[str, Callable[[], object]] = {
            "Order.objects.create (no service, no timer)": lambda: Order.objects.create(
                amount="10.00", currency="CNY", expires_at=timezone.now() + timedelta(minutes=30)
            ),
            "place_order, timer not armed": lambda: services.place_order(amount="10.00"),
            "place_order + countdown per order": lambda: services.place_order(amount="10.00"),
            "place_order + batched timer": lambda: services.place_order(amount="10.00"),
        }
        modes = [POLL, POLL, PER_ORDER, BATCHED]  # POLL: place_order arms nothing
        timings: dict[str, list[float]] = {name: [] for name in variants}
        rounds = 10 if self.profile.name == "full" else 4
        per_round = max(1, self.profile.arming_orders // rounds)
        for name, mode in zip(variants, modes, strict=True):  # warm up every path
            with self.producer(mode):
                for _ in range(20):
                    variants[name]()
        for r in range(rounds):
            order = list(zip(variants, modes, strict=True))
            order = order[r % len(order) :] + order[: r % len(order)]
            for name, mode in order:
                call = variants[name]
                with self.producer(mode):
                    for _ in range(per_round):
                        started = time.perf_counter()
                        call()
                        timings[name].append(time.perf_counter() - started)
        for name, values in timings.items():
            self.results.arming.append(
                ArmingResult(
                    variant=name,
                    orders=len(values),
                    mean_ms=statistics.fmean(values) * 1000,
                    median_ms=statistics.median(values) * 1000,
                )
            )
        data.clear_orders()
        self.purge_queues()

    def queries_per_order(self) -> None:
        """SQL statements per expired order on each strategy's expiry path, in this
        process (Django's CaptureQueriesContext)."""
        k = self.profile.query_orders

        def per_order(ids: list[Any]) -> None:
            for pk in ids:
                services.expire_order(order_id=pk)

        def per_order_reconnect(ids: list[Any]) -> None:
            # What a Celery worker does: its Django fixup closes the connection before
            # and after every task unless CELERY_DB_REUSE_MAX is set.
            for pk in ids:
                connection.close()
                services.expire_order(order_id=pk)

        def bucket(ids: list[Any]) -> None:
            # The rows' own bucket (they share ``due``, set below before each path runs).
            services.expire_bucket(bucket=scheduling.bucket_of(due))

        def floor(ids: list[Any]) -> None:
            self._raw_update(timezone.now())

        # (name, run, per order): a per-order path is run in chunks, each in its own
        # CaptureQueriesContext, since Django keeps only the last 9,000 queries.
        paths: list[tuple[str, Callable[[list[Any]], object], bool]] = [
            (POLL, lambda ids: poll_once(), False),
            (SWEEP, lambda ids: sweep_once(), False),
            (PER_ORDER, per_order, True),
            (
                f"{PER_ORDER}, new DB connection per task (as in the worker)",
                per_order_reconnect,
                True,
            ),
            (BATCHED, bucket, False),
            (FLOOR, floor, False),
        ]
        control = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")
        for name, run, per_order_path in paths:
            data.clear_orders()
            due = timezone.now() - timedelta(seconds=2)
            ids = data.insert_orders([due] * k, armed=True)
            chunks = [ids[i : i + 200] for i in range(0, k, 200)] if per_order_path else [ids]
            queries = statements = 0
            took = 0.0
            for chunk in chunks:
                reset_queries()  # the log is one deque of 9,000 across contexts
                with CaptureQueriesContext(connection) as captured:
                    started = time.perf_counter()
                    run(chunk)
                    took += time.perf_counter() - started
                queries += len(captured.captured_queries)
                statements += sum(
                    not q["sql"].lstrip().upper().startswith(control)
                    for q in captured.captured_queries
                )
            expired = Order.objects.filter(status=Status.CANCELLED).count()
            self.results.queries.append(
                QueriesResult(
                    path=name,
                    expired=expired,
                    queries=queries,
                    statements=statements,
                    ms_per_order=took / max(1, expired) * 1000,
                )
            )
        data.clear_orders()

    def _raw_update(self, now: datetime) -> int:
        at = connection.ops.adapt_datetimefield_value(now)
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {Order._meta.db_table} SET status = %s, cancel_reason = %s, "
                "cancelled_at = %s, updated_at = %s WHERE status = %s AND expires_at <= %s",
                ["cancelled", "timeout", at, at, "created", at],
            )
            return int(cursor.rowcount)

    def _raw_history(self, now: datetime) -> None:
        at = connection.ops.adapt_datetimefield_value(now)
        # A new event id per row, in the column type each database gives a UUIDField.
        new_uuid = {
            "postgresql": "gen_random_uuid()",
            "mysql": "REPLACE(UUID(), '-', '')",
        }.get(connection.vendor, "lower(hex(randomblob(16)))")
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO orders_ordertransition (event_id, event_type, order_id, "
                "transition, source, target, actor, reason, at, owed_to) "
                f"SELECT {new_uuid}, 'order.expired', id, 'expire', 'created', 'cancelled', "
                "'floor', 'not paid in time', %s, '[]' "
                f"FROM {Order._meta.db_table} WHERE status = 'created' AND expires_at <= %s",
                [at, at],
            )

    def floor(self) -> None:
        """The database's own limit: one conditional UPDATE over a burst of due orders
        (best of three), and the same with the transition log written by one INSERT."""
        n = self.profile.burst_size
        plain: list[float] = []
        history: list[float] = []
        for with_history in (False, True) * 3:
            data.clear_orders()
            data.insert_orders([timezone.now() - timedelta(seconds=1)] * n, armed=False)
            started = time.perf_counter()
            try:
                with transaction.atomic():
                    now = timezone.now()
                    if with_history:
                        self._raw_history(now)
                    rows = self._raw_update(now)
            except DatabaseError as exc:  # the schema moved on; say so, keep going
                self.results.notes.append(f"Floor with history not measured: {exc}")
                continue
            took = time.perf_counter() - started
            if rows != n:
                self.results.notes.append(f"Floor updated {rows} rows of {n}.")
            (history if with_history else plain).append(took)
        data.clear_orders()
        if not plain:
            return
        best = min(plain)
        best_history = min(history) if history else None
        self.results.floor = FloorResult(
            orders=n,
            seconds=best,
            rate=n / best,
            with_history_seconds=best_history,
            with_history_rate=n / best_history if best_history else None,
        )

    def rearm(self) -> None:
        """``orders_rearm`` after Redis lost the timers: ``rearm_orders`` unpaid orders,
        deadlines spread over the horizon, none marked armed; then the floor, one raw
        UPDATE marking the same rows armed."""
        n = self.profile.rearm_orders
        data.clear_orders()
        self.purge_queues()
        start = timezone.now() + timedelta(minutes=5)
        spread = get_settings().TIMER_HORIZON - 600
        data.insert_orders(
            [start + timedelta(seconds=self.rng.uniform(0, spread)) for _ in range(n)], armed=False
        )
        orders = dict(settings.ORDERS) | {"TIMER_MODE": BATCHED}
        with override_settings(ORDERS=orders):
            started = time.perf_counter()
            for _ in services.rearm_timers():
                pass
            took = time.perf_counter() - started
        buckets = int(self.redis.zcard(scheduling.timers_key()))
        Order.objects.update(timer_armed_for=None)
        started = time.perf_counter()
        Order.objects.filter(status=Status.CREATED).update(timer_armed_for=F("expires_at"))
        floor = time.perf_counter() - started
        self.results.rearm = RearmResult(
            orders=n, buckets=buckets, seconds=took, floor_seconds=floor
        )
        data.clear_orders()
        self.purge_queues()

    # Experiments with a strategy process --------------------------------------------

    def run_strategy(self, strategy: str, *, bursts_only: bool = False) -> None:
        data.clear_orders()
        self.purge_queues()
        started = time.monotonic()
        load = os.getloadavg()[0]
        proc = self.start(strategy)
        self.say(f"  {strategy}: process started in {time.monotonic() - started:.1f}s")
        try:
            with PeakSampler(proc.pid) as sampler:
                t = time.monotonic()
                if not bursts_only:
                    self.sustained(strategy)
                    self.say(f"  {strategy}: sustained load done ({time.monotonic() - t:.0f}s)")
                t = time.monotonic()
                bursts: tuple[int, ...] = (self.profile.burst_size,)
                if strategy == BATCHED:
                    bursts += self.profile.batched_bursts
                for size in bursts:
                    self.burst(strategy, proc, size)
                self.say(f"  {strategy}: burst done ({time.monotonic() - t:.0f}s)")
                if strategy in STRATEGIES and not bursts_only:
                    t = time.monotonic()
                    sizes = self.profile.pending_sizes
                    if strategy == BATCHED:
                        sizes += self.profile.batched_sizes
                    self.memory(strategy, proc, sampler, sizes)
                    self.say(f"  {strategy}: pending timers done ({time.monotonic() - t:.0f}s)")
        finally:
            proc.stop()
            self.purge_queues()
            data.clear_orders()
        self.results.durations[strategy] = time.monotonic() - started
        self.results.loads[strategy] = (load, os.getloadavg()[0])

    def sustained(self, strategy: str) -> None:
        """Orders placed with ``place_order`` at a steady rate, each due ``timeout``
        later, so that expiries arrive at the same steady rate."""
        p = self.profile
        n = round(p.sustained_rate * p.sustained_seconds)
        data.clear_orders()
        with self.producer(strategy):
            started = time.monotonic()
            for i in range(n):
                delay = started + i / p.sustained_rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                services.place_order(amount="10.00", timeout=p.sustained_timeout)
            placing = time.monotonic() - started
        data.wait_until(
            lambda: data.unpaid_count() == 0,
            timeout=p.sustained_timeout + self.drain_timeout(),
            every=0.2,
        )
        lateness = data.Lateness.of_cancelled_orders()
        self.results.lateness.append(
            LatenessResult(
                strategy=strategy,
                orders=n,
                target_rate=p.sustained_rate,
                placed_rate=n / placing if placing else float("nan"),
                recorded=Summary.of(lateness.recorded),
                written=Summary.of(lateness.written),
                unexpired=data.unpaid_count(),
                samples=lateness.written,
            )
        )
        data.clear_orders()

    def burst(self, strategy: str, proc: BenchProcess, n: int) -> None:
        """``n`` orders sharing one deadline, their timers armed beforehand."""
        data.clear_orders()
        # Time to insert and arm the orders before their deadline (a ZADD round trip each
        # for batched: 0.2 to 0.4 ms here), so that the measurement starts at the deadline.
        per_timer = {PER_ORDER: 0.0015, PER_ORDER_RECONNECT: 0.0015, BATCHED: 0.0005}.get(
            strategy, 0.0
        )
        lead = 3.0 + n * (per_timer + 0.0001)
        started = time.monotonic()
        deadline = timezone.now() + timedelta(seconds=lead)
        deadlines = [deadline] * n
        ids = data.insert_orders(deadlines, armed=strategy in TIMERS)
        if strategy == BATCHED:
            # place_order's real path for every order: one ZADD each.
            for pk in ids:
                scheduling.publish_bucket_timer(str(pk), deadline)
        else:
            _direct_arm(strategy, ids, deadlines)
        armed_in = time.monotonic() - started
        intake: float | None = None
        if strategy in TIMERS:
            ok = data.wait_until(lambda: self.queue_length() == 0, timeout=lead + 60)
            intake = time.monotonic() - started if ok else None
        if armed_in > lead or (strategy in TIMERS and (intake is None or intake > lead)):
            self.results.notes.append(
                f"Burst {strategy}: arming ({armed_in:.1f}s) or the worker's intake "
                f"({intake if intake is None else round(intake, 1)}s) ran past the deadline "
                f"({lead:.1f}s ahead); its figures include that."
            )
        timeout = lead + self.drain_timeout() + n / 50
        cpu_before = cpu_seconds(proc.pid)
        done = data.wait_until(lambda: data.unpaid_count() == 0, timeout=timeout, every=0.02)
        finished = time.time()
        cpu = cpu_seconds(proc.pid) - cpu_before
        lateness = data.Lateness.of_cancelled_orders()
        first_last = Order.objects.filter(status=Status.CANCELLED).values_list(
            "updated_at", flat=True
        )
        writes = sorted(first_last)
        done_after = finished - deadline.timestamp() if done else None
        # From the first batch's start (its rows' stamp) until the bench saw every row
        # committed: batches that ran side by side share the span, as they share the rows.
        span = done_after - (writes[0] - deadline).total_seconds() if writes and done_after else 0
        self.results.bursts.append(
            BurstResult(
                strategy=strategy,
                orders=n,
                lead=lead,
                armed_in=armed_in,
                intake_in=intake,
                done_after=done_after,
                processing_rate=len(writes) / span if span > 0 else None,
                end_to_end_rate=n / done_after if done_after and done_after > 0 else None,
                unexpired=data.unpaid_count(),
                written=Summary.of(lateness.written),
                cpu_ms_per_order=cpu / len(writes) * 1000 if writes else None,
                recorded=Summary.of(lateness.recorded),
            )
        )
        data.clear_orders()

    def memory(
        self, strategy: str, proc: BenchProcess, sampler: PeakSampler, sizes: tuple[int, ...]
    ) -> None:
        """Worker (or loop) memory and Redis memory with N pending deadlines spread
        over 30 minutes that start well after the measurement ends."""
        p = self.profile
        data.clear_orders()
        data.wait_until(lambda: self.queue_length() == 0, timeout=30)
        self.purge_queues()
        time.sleep(p.settle_seconds)
        self.results.memory.append(self._hold(strategy, proc, sampler, 0, 0.0, 0.0))
        start = datetime.now(UTC) + timedelta(seconds=p.pending_start)
        pending = 0
        armed_buckets: set[int] = set()
        for size in sizes:
            add = size - pending
            offsets = sorted(self.rng.uniform(0, p.pending_spread) for _ in range(add))
            deadlines = [start + timedelta(seconds=s) for s in offsets]
            sampler.reset()
            t = time.monotonic()
            ids = data.insert_orders(deadlines, armed=strategy in TIMERS)
            if strategy == BATCHED:
                new = [
                    (pk, d)
                    for pk, d in zip(ids, deadlines, strict=True)
                    if scheduling.bucket_of(d) not in armed_buckets
                ]
                armed_buckets.update(scheduling.bucket_of(d) for _, d in new)
                _direct_arm(strategy, [pk for pk, _ in new], [d for _, d in new])
            else:
                _direct_arm(strategy, ids, deadlines)
            arm_seconds = time.monotonic() - t
            pending = size
            intake: float | None = 0.0
            if strategy in TIMERS:
                ok = data.wait_until(lambda: self.queue_length() == 0, timeout=300 + size / 200)
                intake = time.monotonic() - t if ok else None
            elif strategy == POLL:
                target = self.loop_cycles(POLL) + 2
                data.wait_until(lambda: self.loop_cycles(POLL) >= target, timeout=120)  # noqa: B023
            self.results.memory.append(
                self._hold(strategy, proc, sampler, size, arm_seconds, intake)
            )
            self.say(
                f"    {size:>9,} pending: main RSS "
                f"{self.results.memory[-1].main_rss / MB:.0f} MB (armed in {arm_seconds:.1f}s)"
            )

    def _hold(
        self,
        strategy: str,
        proc: BenchProcess,
        sampler: PeakSampler,
        pending: int,
        arm_seconds: float,
        intake: float | None,
    ) -> MemoryPoint:
        cpu_before, t = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(self.profile.settle_seconds)
        cpu = (cpu_seconds(proc.pid) - cpu_before) / (time.monotonic() - t) * 100
        peak_main, peak_tree = sampler.peak()
        now = sample_memory(proc.pid, pss=True)
        used, ours = self.redis_memory()
        return MemoryPoint(
            strategy=strategy,
            pending=pending,
            main_rss=now.main_rss,
            tree_rss=now.tree_rss,
            tree_pss=now.tree_pss,
            peak_main_rss=max(peak_main, now.main_rss),
            peak_tree_rss=max(peak_tree, now.tree_rss),
            redis_used=used,
            redis_keys=ours,
            cpu_percent=cpu,
            arm_seconds=arm_seconds,
            intake_seconds=intake,
        )
