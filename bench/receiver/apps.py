from django.apps import AppConfig


class ReceiverConfig(AppConfig):
    name = "bench.receiver"
    label = "bench_receiver"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from bench.receiver import receivers  # noqa: F401  (connects it)
