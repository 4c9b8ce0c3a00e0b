"""Results to Markdown, JSON and PNG. Every figure comes with a ratio against a baseline
measured in the same run, because the machine is shared and noisy."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from bench.measure import (
    BATCHED,
    FLOOR,
    LABELS,
    PER_ORDER,
    PER_ORDER_RECONNECT,
    POLL,
    STRATEGIES,
    SWEEP,
    BurstResult,
    LatenessResult,
    Results,
)
from bench.procs import MB

MET, MISSED, NOT_MEASURED = "met", "**missed**", "not measured"


def _f(value: float | None, digits: int = 2, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}{unit}"


def _x(value: float | None, base: float | None, digits: int = 1) -> str:
    """A ratio, written ``1.8x``; small ratios keep two significant digits."""
    if value is None or base is None or base == 0 or math.isnan(value) or math.isnan(base):
        return "n/a"
    ratio = value / base
    if 0 < abs(ratio) < 1:
        digits = max(digits, 1 - math.floor(math.log10(abs(ratio))))
    return f"{ratio:,.{digits}f}x"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---" if i == 0 else "---:" for i in range(len(header))]
    return [_row(header), _row(align), *(_row(r) for r in rows), ""]


def _by(items: list[Any], strategy: str) -> Any:
    return next((i for i in items if i.strategy == strategy), None)


# Goals --------------------------------------------------------------------------------


def goals(results: Results) -> list[list[str]]:
    full = results.profile.name == "full"
    on_pg = results.stack["database"].startswith("PostgreSQL")
    rows: list[list[str]] = []

    def verdict(ok: bool | None, applicable: bool = True, why: str = "") -> str:
        if not applicable:
            return f"{NOT_MEASURED} ({why})" if why else NOT_MEASURED
        if ok is None:
            return NOT_MEASURED
        return MET if ok else MISSED

    per: LatenessResult | None = _by(results.lateness, PER_ORDER)
    if per is not None:
        ok = per.written.p99 <= 1.0 and per.unexpired == 0 and per.placed_rate >= 0.95 * 100
        before: LatenessResult | None = _by(results.lateness, PER_ORDER_RECONNECT)
        rows.append(
            [
                "countdown per order: p99 lateness at 100 expiries/s for 2 min",
                "<= 1 s",
                f"p99 {_f(per.written.p99, 3, ' s')} at {_f(per.placed_rate, 0)}/s "
                f"for {per.orders / per.target_rate:.0f} s"
                + (f", {per.unexpired} unexpired at the end" if per.unexpired else "")
                + (
                    f" (before the connection fix, 3b: p99 {_f(before.written.p99, 3, ' s')})"
                    if before
                    else ""
                ),
                verdict(ok, full, "full run only"),
            ]
        )
    batched_mem = [m for m in results.memory if m.strategy == BATCHED]
    if batched_mem:
        top = max(batched_mem, key=lambda m: m.pending)
        idle = min(batched_mem, key=lambda m: m.pending)
        big = top.pending >= 1_000_000
        redis_delta = top.redis_keys - idle.redis_keys
        rows.append(
            [
                f"batched: worker RSS with {top.pending:,} pending deadlines over 30 min",
                "<= 100 MB, flat in N",
                f"main process {_f(top.peak_main_rss / MB, 0, ' MB')} peak, idle "
                f"{_f(idle.main_rss / MB, 0, ' MB')} "
                f"(whole tree {_f(top.peak_tree_rss / MB, 0, ' MB')} RSS, "
                f"{_f((top.tree_pss or 0) / MB, 0, ' MB')} PSS)",
                verdict(
                    top.peak_main_rss <= 100 * MB and top.peak_main_rss <= 1.1 * idle.main_rss,
                    big,
                    "needs 1,000,000; full run only",
                ),
            ]
        )
        rows.append(
            [
                f"batched: Redis memory with {top.pending:,} pending deadlines",
                "<= 100 MB",
                f"bench keys {_f(redis_delta / MB, 2, ' MB')}, used_memory delta "
                f"{_f((top.redis_used - idle.redis_used) / MB, 2, ' MB')}",
                verdict(redis_delta <= 100 * MB, big, "needs 1,000,000; full run only"),
            ]
        )
    for burst in (b for b in results.bursts if b.strategy == BATCHED):
        small = burst.orders < 100_000
        limit = 0.5 if small else 5.0
        applicable = burst.orders >= 10_000 and on_pg
        why = "needs 10,000 orders on PostgreSQL" if not on_pg else "full run only"
        rows.append(
            [
                f"batched: burst of {burst.orders:,} orders sharing one deadline",
                f"all expired within {limit:g} s (PostgreSQL)",
                f"{_f(burst.done_after, 2, ' s')} after the deadline",
                verdict(
                    burst.done_after is not None and burst.done_after <= limit, applicable, why
                ),
            ]
        )
    bl: LatenessResult | None = _by(results.lateness, BATCHED)
    if bl is not None:
        rows.append(
            [
                "batched: p99 lateness at 100 expiries/s",
                "<= 0.15 s",
                f"p99 {_f(bl.written.p99, 3, ' s')} at {_f(bl.placed_rate, 0)}/s",
                verdict(bl.written.p99 <= 0.15 and bl.unexpired == 0, full, "full run only"),
            ]
        )
    if results.rearm is not None:
        r = results.rearm
        rows.append(
            [
                f"batched: orders_rearm of {r.orders:,} unpaid orders",
                "<= 60 s for 1,000,000",
                f"{_f(r.seconds, 1, ' s')} for {r.buckets:,} buckets, "
                f"{_x(r.seconds, r.floor_seconds)} one raw UPDATE marking them "
                f"({_f(r.floor_seconds, 1, ' s')})",
                verdict(r.seconds <= 60, r.orders >= 1_000_000, "full run only"),
            ]
        )
    base = _arming_base(results)
    for variant, mode in (
        ("place_order + countdown per order", "countdown per order"),
        ("place_order + batched timer", "batched"),
    ):
        arm = next((a for a in results.arming if a.variant == variant), None)
        if arm is not None and base is not None:
            ratio = arm.mean_ms / base
            rows.append(
                [
                    f"{mode}: time arming adds to placing an order",
                    "<= 25 % (the default mode)",
                    f"+{(ratio - 1) * 100:.0f} % ({_f(arm.mean_ms, 2)} vs {_f(base, 2)} ms)",
                    verdict(ratio <= 1.25, mode == "batched", "not the default mode"),
                ]
            )
    if results.floor is not None:
        for strategy in (PER_ORDER, BATCHED):
            b: BurstResult | None = _by(results.bursts, strategy)
            if b is None or b.processing_rate is None:
                continue
            slower = results.floor.rate / b.processing_rate
            old: BurstResult | None = _by(results.bursts, PER_ORDER_RECONNECT)
            rows.append(
                [
                    f"{LABELS[strategy][3:]}: expiries/s in a burst against the floor",
                    "within 3x",
                    f"{slower:,.1f}x slower ({_f(b.processing_rate, 0)}/s vs "
                    f"{_f(results.floor.rate, 0)}/s)"
                    + (
                        f" (before the connection fix, 3b: {_f(old.processing_rate, 0)}/s)"
                        if strategy == PER_ORDER and old is not None
                        else ""
                    ),
                    verdict(slower <= 3),
                ]
            )
    return rows


def _arming_base(results: Results) -> float | None:
    base = next((a for a in results.arming if a.variant == "place_order, timer not armed"), None)
    return base.mean_ms if base else None


# Markdown -----------------------------------------------------------------------------


def markdown(results: Results) -> str:
    p = results.profile
    lines = [
        "# Benchmark results",
        "",
        f"Run `python bench/run.py{'' if p.name == 'full' else ' --' + p.name}` "
        f"({p.name}), started {results.started}.",
        "",
        f"- **Database:** {results.stack['database']}",
        f"- **Broker:** {results.stack['redis']} (keys prefixed `{results.stack['key prefix']}`)",
        *(f"- **{k}:** {v}" for k, v in results.machine.items()),
        f"- **Worker:** `celery -A config worker --pool prefork --concurrency {p.concurrency} "
        "-l info`, production settings (`config.settings`); one fresh process per strategy.",
        f"- **Sweep interval** for strategy 2: {p.sweep_interval:g} s"
        + (" (quick run; the real cron would run every 60 s)" if p.name == "quick" else "")
        + ".",
        "",
        "The machine is shared and noisy: read the ratios (against a baseline measured in "
        "the same run) before the absolute figures. Lateness is `updated_at - expires_at`, "
        "when the row was written; `cancelled_at - expires_at` (what the app records) is "
        "shown beside it. Nothing here is asserted: a goal that is missed says so.",
        "",
    ]
    if p.name == "quick":
        lines += [
            "> Quick run: small N and short windows, a smoke test of the harness. The goals "
            "need the full run; see `bench/results/RESULTS.md`.",
            "",
        ]

    lines += ["## Goals", ""]
    lines += _table(["goal", "target", "measured", "verdict"], goals(results))

    base = _by(results.lateness, PER_ORDER)
    base_p99 = base.written.p99 if base else None
    lines += [
        "## Lateness under sustained load",
        "",
        f"`place_order` at {p.sustained_rate:g} orders/s for {p.sustained_seconds:g} s, each "
        f"due {p.sustained_timeout:g} s later: expiries arrive at the same rate. Seconds "
        "after the deadline; ratio of p99 against the countdown-per-order strategy.",
        "",
    ]
    rows = []
    for r in results.lateness:
        rows.append(
            [
                LABELS[r.strategy],
                f"{r.orders:,}",
                _f(r.placed_rate, 0),
                _f(r.written.p50, 3),
                _f(r.written.p99, 3),
                _f(r.written.max, 3),
                f"{_f(r.recorded.p99, 3)} / {_f(r.recorded.max, 3)}",
                _x(r.written.p99, base_p99),
                str(r.unexpired),
            ]
        )
    lines += _table(
        [
            "strategy",
            "orders",
            "placed/s",
            "p50 s",
            "p99 s",
            "max s",
            "recorded p99 / max s",
            "p99 vs countdown",
            "unexpired",
        ],
        rows,
    )

    fl = results.floor
    lines += [
        "## Burst: many orders sharing one deadline",
        "",
        f"{p.burst_size:,} orders due at the same instant, timers armed beforehand. "
        "'all expired after': from the deadline until no order of the burst is unpaid, as "
        "seen by the bench. 'expiries/s': orders over the time from the first batch's "
        "start until all were seen committed (batches side by side share it). 'worker "
        "CPU': CPU time of the worker's (or loop's) processes over the burst, per order, "
        "which the machine's noise moves less than wall time (PostgreSQL's own CPU is not "
        "in it). The "
        "floor is one raw `UPDATE orders_order SET status='cancelled' ... WHERE "
        "status='created' AND expires_at <= now` over the same number of rows (best of 3).",
        "",
    ]
    rows = []
    for b in results.bursts:
        rows.append(
            [
                LABELS[b.strategy],
                f"{b.orders:,}",
                _f(b.done_after, 2),
                _f(b.processing_rate, 0),
                _x(fl.rate if fl else None, b.processing_rate) + " slower",
                _f(b.written.p99, 2),
                _f(b.written.max, 2)
                + (f" (app records {_f(b.recorded.max, 2)})" if b.recorded else ""),
                _f(b.cpu_ms_per_order, 2),
                str(b.unexpired),
            ]
        )
    if fl is not None:
        rows.append(
            [LABELS[FLOOR], f"{fl.orders:,}", _f(fl.seconds, 3), _f(fl.rate, 0), "1.0x", *[""] * 4]
        )
        if fl.with_history_rate is not None:
            rows.append(
                [
                    "5b. floor + transition log (one INSERT ... SELECT)",
                    f"{fl.orders:,}",
                    _f(fl.with_history_seconds, 3),
                    _f(fl.with_history_rate, 0),
                    _x(fl.rate, fl.with_history_rate) + " slower",
                    *[""] * 4,
                ]
            )
    lines += _table(
        [
            "strategy",
            "orders",
            "all expired after s",
            "expiries/s",
            "vs floor",
            "p99 lateness s",
            "max lateness s",
            "worker CPU ms per order",
            "unexpired",
        ],
        rows,
    )

    lines += [
        "## Memory with pending timers",
        "",
        f"N unpaid orders whose deadlines are spread over {p.pending_spread / 60:g} minutes, "
        f"starting {p.pending_start / 60:g} minutes ahead (nothing fires while measured). "
        "Timers armed by the scheduling module's own publish functions on directly inserted "
        "rows (batched: once per bucket). Worker = the Celery worker (strategies 3, 4) or "
        "the loop process (1, 2). RSS of the main process (where pending timers live) and "
        "of the whole tree; PSS counts pages shared by the prefork children once. Redis: "
        "`MEMORY USAGE` of the bench's own keys (the server's `used_memory` delta beside "
        "it also moves with other users of a shared server). CPU: % of one core while "
        "holding. 'idle' is the same process after the lateness and burst runs, so its "
        "heap is warm; 'KB per added pending' is the slope from the row above.",
        "",
    ]
    rows = []
    for strategy in STRATEGIES:
        points = [m for m in results.memory if m.strategy == strategy]
        if not points:
            continue
        idle = points[0]
        for prev, m in zip([None, *points], points, strict=False):
            per_timer = (
                (m.main_rss - prev.main_rss) / (m.pending - prev.pending) / 1024
                if prev is not None
                else float("nan")
            )
            rows.append(
                [
                    LABELS[strategy],
                    f"{m.pending:,}" if m.pending else "0 (idle)",
                    _f(m.main_rss / MB, 0),
                    _f(m.peak_main_rss / MB, 0),
                    _x(m.main_rss, idle.main_rss, 2),
                    _f(per_timer, 2),
                    _f(m.tree_rss / MB, 0),
                    _f((m.tree_pss or float("nan")) / MB, 0),
                    _f((m.redis_keys - idle.redis_keys) / MB, 2),
                    _f((m.redis_used - idle.redis_used) / MB, 1),
                    _f(m.cpu_percent, 0),
                    _f(m.arm_seconds, 1) if m.pending else "",
                ]
            )
    lines += _table(
        [
            "strategy",
            "pending",
            "main RSS MB",
            "peak MB",
            "vs idle",
            "KB per added pending",
            "tree RSS MB",
            "tree PSS MB",
            "Redis keys +MB",
            "used_memory +MB",
            "CPU %",
            "armed in s",
        ],
        rows,
    )

    base_ms = _arming_base(results)
    lines += [
        "## What arming adds to placing an order",
        "",
        "The real `place_order` (default 30-minute timeout, so the timer is armed on "
        "commit), interleaved in rounds with the same call when nothing is armed (timer "
        "horizon of 1 s) and with a bare `Order.objects.create`.",
        "",
    ]
    rows = [
        [
            a.variant,
            f"{a.orders:,}",
            _f(a.mean_ms, 3),
            _f(a.median_ms, 3),
            _x(a.mean_ms, base_ms, 2),
        ]
        for a in results.arming
    ]
    lines += _table(
        ["variant", "orders", "mean ms", "median ms", "vs place_order without timer"], rows
    )

    floor_q = next((q for q in results.queries if q.path == FLOOR), None)
    lines += [
        "## SQL per expired order",
        "",
        f"Each strategy's expiry path run in the bench process over {p.query_orders:,} due "
        "orders, inside Django's `CaptureQueriesContext`: SQL statements, and all queries "
        "with BEGIN and COMMIT. Time is in-process, without a worker.",
        "",
    ]
    rows = [
        [
            LABELS.get(q.path, q.path),
            f"{q.expired:,}",
            _f(q.statements / q.expired if q.expired else None, 2),
            _f(q.per_order, 2),
            _f(q.ms_per_order, 3),
            _x(q.ms_per_order, floor_q.ms_per_order if floor_q else None, 0),
        ]
        for q in results.queries
    ]
    lines += _table(
        [
            "path",
            "expired",
            "statements per order",
            "with BEGIN/COMMIT",
            "ms per order",
            "time vs floor",
        ],
        rows,
    )

    lines += [
        "## Plots",
        "",
        "![Lateness distribution per strategy](lateness.png)",
        "",
        "![Memory against pending timers](memory.png)",
        "",
    ]
    if results.notes:
        lines += ["## Notes", "", *(f"- {n}" for n in results.notes), ""]
    loads = results.loads
    lines += [
        "## Run time",
        "",
        "Seconds per step, with the machine's 1-minute load average at its start and end "
        f"({results.machine.get('Machine', '').split(',')[0]}; above the number of CPUs, "
        "other work on the machine competed with the bench):",
        "",
        ", ".join(
            f"{k} {v:.0f} s"
            + (f" (load {loads[k][0]:.1f} to {loads[k][1]:.1f})" if k in loads else "")
            for k, v in results.durations.items()
        ),
        "",
    ]
    return "\n".join(lines)


# Events (bench/events.py) -------------------------------------------------------------


def events_markdown(results: Results) -> str:
    from bench.events import LABELS as EVENT_LABELS
    from bench.events import NOBODY
    from orders.conf import get_settings

    ev = results.events
    assert ev is not None
    p = results.profile
    batch = get_settings().SWEEP_BATCH_SIZE
    command = "python bench/run.py" + ("" if p.name == "full" else f" --{p.name}")
    lines = [
        "# Benchmark results: what events cost",
        "",
        f"The events scenario of `{command}` (also alone: `{command} --only-events`), "
        f"{p.name} run, started {results.started}.",
        "",
        f"- **Database:** {results.stack['database']}",
        f"- **Broker:** {results.stack['redis']} (keys prefixed `{results.stack['key prefix']}`)",
        *(f"- **{k}:** {v}" for k, v in results.machine.items()),
        f"- **Worker:** `celery -A config worker --pool prefork --concurrency {p.concurrency} "
        "-l info`, batched timers (`ORDERS_TIMER_MODE=batched`), one fresh process per "
        "variant: (a) with the production settings (`config.settings`), (b) with "
        "`bench.settings_receiver`, the same plus the app `bench.receiver`, whose one "
        "receiver of `order_expired` inserts one row.",
        "",
        "The machine is shared and noisy: read the ratios (against a baseline measured in "
        "the same run) before the absolute figures. Nothing here is asserted.",
        "",
    ]
    base = next((b for b in ev.bursts if b.variant == NOBODY), None)
    base_rate = base.orders / base.expired_after if base and base.expired_after else None
    lines += [
        "## 1. What events add to a burst of expiries",
        "",
        f"{p.events_burst:,} orders due at the same whole second, their batched timer armed "
        "beforehand, expired by it (`expire_bucket`, that is `services.expire_due_orders`: "
        f"batches of {batch}, each one UPDATE and one INSERT of history rows) in the "
        "worker. In (b) each batch also queues one `orders.dispatch_events` task on "
        "commit, which the same worker runs: for each event, the receiver and its "
        "delivery record in one transaction. 'expired after': from the deadline until no "
        "order of the burst is unpaid, as the bench saw it; 'delivered after': until "
        "every event has its delivery record. 'worker CPU': CPU time of the worker's "
        "processes from the deadline until done, per order (the database server's CPU is "
        "not in it). Ratios against (a).",
        "",
    ]
    rows = [
        [
            EVENT_LABELS[b.variant],
            f"{b.orders:,}",
            _f(b.expired_after, 2),
            _x(b.expired_after, base.expired_after if base else None, 2),
            _f(b.delivered_after, 2),
            _x(b.delivered_after, base.expired_after if base else None, 2),
            _f(b.cpu_ms_per_order, 2),
            _x(b.cpu_ms_per_order, base.cpu_ms_per_order if base else None, 2),
            f"{b.dispatch_tasks:,}",
            f"{b.history_rows:,}",
            f"{b.owed:,}",
            f"{b.delivered:,} / {b.receiver_rows:,}",
            f"{b.unexpired:,}",
        ]
        for b in ev.bursts
    ]
    lines += _table(
        [
            "variant",
            "orders",
            "expired after s",
            "vs (a)",
            "delivered after s",
            "vs (a) expired",
            "worker CPU ms per order",
            "vs (a)",
            "dispatch tasks",
            "history rows",
            "owed at end",
            "delivered / receiver rows",
            "unexpired",
        ],
        rows,
    )
    lines += [
        "## 2. Events delivered per second by the dispatcher",
        "",
        f"{p.dispatch_events:,} expired orders, each owing its `order.expired` event to the "
        "receiver of (b), their dispatch queued through `orders.events.announce` (the "
        "app's own path): one order per task, as a payment or a per-order timer queues "
        f"it, or {batch} per task, as a batch of expiries does. On the worker of (b), "
        f"{p.concurrency} processes. 'delivered after': from the first task queued until "
        "every event has its delivery record; 'vs expiries/s': events delivered per "
        "second over orders expired per second in (a).",
        "",
    ]
    rows = [
        [
            f"{r.orders_per_task:,}",
            f"{r.events:,}",
            f"{r.tasks:,}",
            _f(r.queued_in, 2),
            _f(r.delivered_after, 2),
            _f(r.rate, 0),
            _x(r.rate, base_rate, 2),
            _f(r.cpu_ms_per_event, 2),
            f"{r.delivered:,} / {r.receiver_rows:,}",
        ]
        for r in ev.rates
    ]
    lines += _table(
        [
            "orders per task",
            "events",
            "tasks",
            "queued in s",
            "delivered after s",
            "events/s",
            "vs expiries/s in (a)",
            "worker CPU ms per event",
            "delivered / receiver rows",
        ],
        rows,
    )
    lines += [
        "## 3. SQL per event delivered",
        "",
        "`orders.events.dispatch` in the bench's own process (no worker), with the same "
        "receiver connected for that step only, over the same owed events, inside Django's "
        "`CaptureQueriesContext`: SQL statements, all queries with BEGIN and COMMIT, and "
        "commits (each one a WAL flush on PostgreSQL; a write outside a transaction "
        "commits on its own).",
        "",
    ]
    rows = [
        [
            f"{q.orders_per_call:,}",
            f"{q.delivered:,} of {q.events:,}",
            _f(q.statements / q.delivered if q.delivered else None, 2),
            _f(q.queries / q.delivered if q.delivered else None, 2),
            _f(q.commits / q.delivered if q.delivered else None, 2),
            _f(q.ms_per_event, 2),
        ]
        for q in ev.queries
    ]
    lines += _table(
        [
            "orders per call",
            "delivered",
            "statements per event",
            "with BEGIN/COMMIT",
            "commits per event",
            "ms per event",
        ],
        rows,
    )
    if ev.notes:
        lines += ["## Notes", "", *(f"- {n}" for n in ev.notes), ""]
    lines += [
        "## Run time",
        "",
        f"{ev.durations.get('events', 0):.0f} s in all; the machine's 1-minute load "
        "average at the start and end of each worker: "
        + ", ".join(
            f"{EVENT_LABELS[k][:2]} {start:.1f} to {end:.1f}"
            for k, (start, end) in ev.loads.items()
        )
        + f" ({results.machine.get('Machine', '').split(',')[0]}).",
        "",
    ]
    return "\n".join(lines)


def write_events(results: Results, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "events.md").write_text(events_markdown(results))
    return [out / "events.md"]


# Plots --------------------------------------------------------------------------------


COLOURS = {
    POLL: "#d62728",
    SWEEP: "#ff7f0e",
    PER_ORDER: "#1f77b4",
    BATCHED: "#2ca02c",
    PER_ORDER_RECONNECT: "#9467bd",
}


def plots(results: Results, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=110)
    for r in results.lateness:
        values = sorted(max(v, 1e-3) for v in r.samples)
        if not values:
            continue
        ys = [(i + 1) / len(values) for i in range(len(values))]
        ax.step(values, ys, where="post", label=LABELS[r.strategy], color=COLOURS[r.strategy])
    ax.set_xscale("log")
    ax.set_xlabel("lateness: seconds from deadline to cancellation (log)")
    ax.set_ylabel("share of orders expired")
    ax.set_title(
        f"Lateness at {results.profile.sustained_rate:g} expiries/s for "
        f"{results.profile.sustained_seconds:g} s ({results.stack['database'].split(',')[0]})"
    )
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lateness.png")
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5), dpi=110)
    for strategy in STRATEGIES:
        points = [m for m in results.memory if m.strategy == strategy]
        if len(points) < 2:
            continue
        idle = points[0]
        xs = [m.pending for m in points[1:]]
        uses_redis = strategy in (PER_ORDER, BATCHED)
        left.plot(
            xs,
            [m.peak_main_rss / MB for m in points[1:]],
            marker="o",
            label=LABELS[strategy],
            color=COLOURS[strategy],
        )
        if uses_redis:
            right.plot(
                xs,
                [max(m.redis_keys - idle.redis_keys, 1024) / MB for m in points[1:]],
                marker="o",
                label=LABELS[strategy],
                color=COLOURS[strategy],
            )
    for axis, title in (
        (left, "worker (or loop) main process, peak RSS, MB"),
        (right, "Redis: the bench's keys above idle, MB (1, 2: none)"),
    ):
        axis.set_xscale("log")
        axis.set_xlabel("pending deadlines (log)")
        axis.set_title(title, fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
    left.set_ylim(bottom=0)
    right.set_yscale("log")
    left.axhline(150, color="grey", linestyle=":", linewidth=1, label="goal for batched")
    right.axhline(100, color="grey", linestyle=":", linewidth=1, label="goal for batched")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "memory.png")
    plt.close(fig)


def write(results: Results, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "RESULTS.md").write_text(markdown(results))
    raw = dataclasses.asdict(results)
    for item in raw["lateness"]:
        del item["samples"]  # in the plot; thousands of numbers are no use in a diff
    (out / "results.json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
    if not (results.lateness or results.memory):  # --bursts-only: nothing to plot
        return [out / "RESULTS.md", out / "results.json"]
    plots(results, out)
    return [out / n for n in ("RESULTS.md", "results.json", "lateness.png", "memory.png")]
