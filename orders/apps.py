from django.apps import AppConfig


class OrdersConfig(AppConfig):
    name = "orders"
    verbose_name = "Orders"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from celery.signals import worker_init

        from orders import checks  # noqa: F401  (registers the system checks)
        from orders.heartbeat import add_to_worker

        # Every worker of the host project, whatever its Celery app, writes the heartbeat
        # that /health/ reads. Celery sets Django up (and so calls this) before it sends
        # worker_init.
        worker_init.connect(add_to_worker, dispatch_uid="orders.heartbeat", weak=False)
