from typing import Any

from django.apps import AppConfig


class OrdersConfig(AppConfig):
    name = "orders"
    verbose_name = "Orders"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from celery.signals import worker_init

        from orders import (
            checks,  # noqa: F401  (registers the system checks)
            events,  # noqa: F401  (records each transition: the outbox)
            heartbeat,
            waker,
        )

        # In every Celery worker of whichever project installs the app, not in web
        # processes. Celery sets Django up (and so calls this) before it sends worker_init.
        worker_init.connect(_fix_broker_bugs, dispatch_uid="orders.compat", weak=False)
        # The heartbeat that /health/ reads.
        worker_init.connect(heartbeat.add_to_worker, dispatch_uid="orders.heartbeat", weak=False)
        # The thread that turns due timer buckets into tasks.
        worker_init.connect(waker.add_to_worker, dispatch_uid="orders.waker", weak=False)


def _fix_broker_bugs(**kwargs: Any) -> None:
    from orders.compat import finish_redis_channel_close_after_failed_drain

    finish_redis_channel_close_after_failed_drain()
