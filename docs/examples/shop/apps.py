from django.apps import AppConfig


class ShopConfig(AppConfig):
    name = "docs.examples.shop"
    label = "shop"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from docs.examples.shop import receivers  # noqa: F401  (connects them)
