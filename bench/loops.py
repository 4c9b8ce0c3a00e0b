"""The two strategies without timers, as processes of their own.

``poll``: the source article's loop. Every second it reads every unpaid order and
cancels those whose deadline has passed, one by one, through ``services.expire_order``
(so it takes the row lock and re-checks, unlike the article's loop, which also
cancelled paid orders).

``sweep``: a cron on the indexed ``(status, expires_at)`` query, through
``services.expire_due_orders``, the same batched, skip-locked path the real sweep and
the batched timers use.

Run as ``python -m bench.loops poll|sweep --interval SECONDS --status FILE``; the
status file (JSON) tells the harness how many cycles ran and how long they took.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime
from pathlib import Path

POLLER = "poller"


def poll_once(now: datetime | None = None) -> int:
    """One turn of the article's loop: read every unpaid order, expire each one due."""
    from django.utils import timezone

    from orders import get_order_model, services
    from orders.models import Status

    Order = get_order_model()

    now = now or timezone.now()
    unpaid = list(Order.objects.filter(status=Status.CREATED).values_list("pk", "expires_at"))
    expired = 0
    for pk, expires_at in unpaid:
        if expires_at <= now:
            outcome = services.expire_order(order_id=pk, by=POLLER)
            expired += outcome == services.ExpiryOutcome.EXPIRED
    return expired


def sweep_once(now: datetime | None = None) -> int:
    """One run of the cron: expire every unpaid order already due, by the index."""
    from django.utils import timezone

    from orders import services

    now = now or timezone.now()
    expired, _ = services.expire_due_orders(due_by=now, by=services.SWEEP, now=now)
    return expired


def _write_status(path: Path, status: dict[str, float]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status))
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["poll", "sweep"])
    parser.add_argument("--interval", type=float, required=True)
    parser.add_argument("--status", type=Path, required=True)
    args = parser.parse_args()

    import django

    django.setup()
    from django.db import connection

    connection.ensure_connection()
    once = poll_once if args.mode == "poll" else sweep_once
    status = {"cycles": 0.0, "expired": 0.0, "last_cycle": 0.0, "max_cycle": 0.0}
    _write_status(args.status, status)
    print(f"{args.mode} loop ready, every {args.interval:g}s", flush=True)

    next_tick = time.monotonic()
    while True:
        # A fixed-rate schedule, like the article's setInterval; a turn that overruns
        # its slot delays the next one instead of queueing up turns.
        next_tick = max(next_tick + args.interval, time.monotonic())
        started = time.monotonic()
        status["expired"] += once()
        took = time.monotonic() - started
        status["cycles"] += 1
        status["last_cycle"] = took
        status["max_cycle"] = max(status["max_cycle"], took)
        _write_status(args.status, status)
        time.sleep(max(0.0, next_tick - time.monotonic()))


if __name__ == "__main__":
    main()
