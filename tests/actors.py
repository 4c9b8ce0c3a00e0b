"""A process that acts on orders at a given moment, for the race tests.

    python -m tests.actors pay|expire <unix time to start> <order id> ...

Each runs in its own process with its own database connection, like a web worker
taking a payment webhook or a Celery worker firing a timer.
"""

from __future__ import annotations

import os
import sys
import time


def main(action: str, start_at: float, order_ids: list[str]) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django

    django.setup()
    from orders import services

    time.sleep(max(0.0, start_at - time.time()))
    for order_id in order_ids:
        if action == "pay":
            services.record_payment(
                order_id=order_id, payment_ref=f"race-{order_id}-{os.getpid()}", amount="10.00"
            )
        else:
            services.expire_order(order_id=order_id, by="racing expirer")


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), sys.argv[3:])
