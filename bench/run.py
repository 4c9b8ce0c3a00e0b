"""The benchmark: ``python bench/run.py [--quick]``.

Runs the five expiry strategies side by side on the real stack (PostgreSQL and Redis
when DATABASE_URL / REDIS_URL are set, else SQLite and the embedded Redis), in the
bench's own database and under its own Redis key prefix, then the events scenario
(``bench/events.py``; alone with ``--only-events``), and writes ``RESULTS.md``,
``results.json``, ``lateness.png``, ``memory.png`` and ``events.md`` to
``bench/results/`` (``bench/results/quick/`` for ``--quick``). See bench/README.md.
``--quick`` asserts nothing and exits 0 whenever the harness itself works.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import sqlite3
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

BASE_DIR = Path(__file__).resolve().parent.parent
# Run as a script, Python puts bench/ first on the path; the project root belongs there.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BASE_DIR / "bench"]
sys.path.insert(0, str(BASE_DIR))

if TYPE_CHECKING:  # imported at run time only once Django is set up
    from bench.measure import Bench


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small N and short windows (under 2 minutes); what CI runs",
    )
    parser.add_argument(
        "--medium",
        action="store_true",
        help="mid-sized N and windows (about 6 minutes), to check the harness",
    )
    parser.add_argument(
        "--strategies",
        help="comma-separated subset of poll,sweep,per_order,batched,per_order_no_db_reuse "
        "(default: the four strategies, plus the per_order_no_db_reuse experiment in full runs)",
    )
    parser.add_argument(
        "--only-events",
        action="store_true",
        help="run only the events scenario (bench/events.py) and write only events.md",
    )
    parser.add_argument(
        "--bursts-only",
        action="store_true",
        help="only the floor and the strategies' bursts (no sustained load, memory or "
        "events): a database's column beside another's, each against its own floor",
    )
    parser.add_argument("--out", type=Path, help="where to write the results")
    parser.add_argument(
        "--note",
        help="a sentence for the results files, e.g. that other jobs shared the machine",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile the in-process expiry paths with pyinstrument",
    )
    return parser.parse_args(argv)


def _exit_on_signal(signum: int, frame: object) -> None:
    # Unwind through the finally blocks: they end the worker processes the bench started
    # (each in its own session, so a signal to this process alone does not reach them),
    # drop the bench database and delete the bench's Redis keys.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench import env as bench_env

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    began = time.monotonic()
    env = bench_env.prepare()
    try:
        run(env, args)
    finally:
        from django.db import connections

        connections.close_all()
        bench_env.teardown(env)
    print(f"Done in {time.monotonic() - began:.0f}s.", flush=True)
    return 0


def _quiet_logging() -> None:
    """The app logs every order at INFO, as in production; in this process the lines go
    to var/bench-harness.log instead of the terminal."""
    from bench.env import VAR_DIR

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.FileHandler(VAR_DIR / "bench-harness.log", mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root.addHandler(handler)


def _machine() -> dict[str, str]:
    import celery
    import django
    import psutil  # type: ignore[import-untyped]
    from django.db import connection

    from bench.env import redis_client

    connection.ensure_connection()
    redis_version = redis_client(os.environ["REDIS_URL"]).info("server")["redis_version"]
    return {
        "Machine": f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"{platform.system()} {platform.release()}",
        "Versions": f"Python {platform.python_version()}, Django {django.get_version()}, "
        f"Celery {celery.__version__}, Redis {redis_version}, {_database_version()}",
        "Load at start": "1-minute load average {:.1f}, 5-minute {:.1f}".format(
            *os.getloadavg()[:2]
        ),
    }


def _database_version() -> str:
    from django.db import connection

    if connection.vendor == "postgresql":
        version = connection.pg_version  # type: ignore[attr-defined]
        return f"PostgreSQL {version // 10000}.{version % 10000}"
    if connection.vendor == "mysql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT VERSION()")
            return f"MySQL/MariaDB {cursor.fetchone()[0]}"
    return f"SQLite {sqlite3.sqlite_version}"


def run(env: object, args: argparse.Namespace) -> None:
    import django

    from bench.env import BenchEnv

    assert isinstance(env, BenchEnv)
    django.setup()
    _quiet_logging()
    from django.core.management import call_command

    from bench import measure, report

    profile = measure.QUICK if args.quick else measure.MEDIUM if args.medium else measure.FULL
    default = [*measure.STRATEGIES, *profile.experiments]
    strategies = [s.strip() for s in (args.strategies or ",".join(default)).split(",")]
    strategies = [s for s in strategies if s]
    unknown = set(strategies) - {*measure.STRATEGIES, *measure.EXPERIMENTS}
    if unknown:
        raise SystemExit(f"Unknown strategies: {', '.join(sorted(unknown))}.")
    sub = "" if profile.name == "full" else profile.name
    out = args.out or (BASE_DIR / "bench" / "results" / sub)

    stack = env.describe()
    print(f"Benchmark ({profile.name}) on {stack['database']}", flush=True)
    print(f"  broker {stack['redis']}, keys prefixed {stack['key prefix']}", flush=True)
    call_command("migrate", interactive=False, verbosity=0)

    results = measure.Results(
        profile=profile,
        stack=stack,
        started=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=_machine(),
    )
    if args.note:
        results.machine["Note"] = args.note
    bench = measure.Bench(env, profile, results, out)
    if not args.only_events:
        run_strategies(bench, strategies, out, args.profile, bursts_only=args.bursts_only)
    if not args.bursts_only:
        from bench import events

        print("events: what they add to a burst, and the dispatcher's rate", flush=True)
        results.events = events.EventCost(bench).run()
        results.durations["events"] = results.events.durations["events"]
    results.machine["Load at end"] = "1-minute load average {:.1f}, 5-minute {:.1f}".format(
        *os.getloadavg()[:2]
    )

    written = [] if args.only_events else report.write(results, out)
    if not args.only_events:
        print(report.markdown(results).split("## Lateness")[0].split("## Goals")[1], flush=True)
    if not args.bursts_only:
        written += report.write_events(results, out)
        events_md = report.events_markdown(results).split("## 1.", 1)[1].split("## Run time")[0]
        print("\n## 1." + "\n".join(ln for ln in events_md.splitlines() if ln[:1] in "#|-"))
    shown = [p.relative_to(BASE_DIR) if p.is_relative_to(BASE_DIR) else p for p in written]
    print("Wrote " + ", ".join(str(p) for p in shown), flush=True)


def run_strategies(
    bench: Bench, strategies: list[str], out: Path, profile: bool, *, bursts_only: bool = False
) -> None:
    """The steps of RESULTS.md: the in-process measurements, then each strategy; with
    ``bursts_only``, the floor and each strategy's bursts alone."""
    from bench import measure

    results = bench.results
    steps = [
        ("arming cost", bench.arming_cost),
        ("SQL per expired order", bench.queries_per_order),
        ("floor", bench.floor),
        ("re-arm", bench.rearm),
    ]
    if bursts_only:
        steps, profile = [("floor", bench.floor)], False
    for name, step in steps:
        t = time.monotonic()
        step()
        results.durations[name] = time.monotonic() - t
        print(f"{name}: {results.durations[name]:.0f}s", flush=True)
    for strategy in strategies:
        print(f"strategy {measure.LABELS[strategy]}", flush=True)
        bench.run_strategy(strategy, bursts_only=bursts_only)
    if profile:
        from bench import profiling

        t = time.monotonic()
        profiling.profile_expiry_paths(out, orders=bench.profile.query_orders)
        results.durations["profiling"] = time.monotonic() - t


if __name__ == "__main__":
    sys.exit(main())
