"""Where the time of an expiry goes: pyinstrument over the in-process expiry paths.

``python bench/run.py --profile`` writes ``profile-<path>.txt`` beside the results.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.db import connection
from django.utils import timezone
from pyinstrument import Profiler

from bench import data
from orders import services


def _profile(out: Path, name: str, orders: int, run: Callable[[list[Any]], object]) -> Path:
    data.clear_orders()
    ids = data.insert_orders([timezone.now() - timedelta(seconds=2)] * orders, armed=True)
    profiler = Profiler(interval=0.0005)
    profiler.start()
    started = time.perf_counter()
    run(ids)
    took = time.perf_counter() - started
    profiler.stop()
    path = out / f"profile-{name}.txt"
    header = (
        f"{name}: {orders} due orders expired in {took:.3f}s "
        f"({took / orders * 1000:.3f} ms per order), {connection.vendor}\n\n"
    )
    path.write_text(header + profiler.output_text(unicode=True, color=False, show_all=False))
    data.clear_orders()
    return path


def profile_expiry_paths(out: Path, *, orders: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)

    def per_order_like_worker(ids: list[Any]) -> None:
        for pk in ids:
            connection.close()  # as Celery's Django fixup does around every task
            services.expire_order(order_id=pk)

    def bucket(ids: list[Any]) -> None:
        services.expire_bucket(bucket=math.ceil(time.time()))

    return [
        _profile(out, "per-order-task", orders, per_order_like_worker),
        _profile(out, "batched-bucket", orders, bucket),
    ]
