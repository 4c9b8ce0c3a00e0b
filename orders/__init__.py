"""Orders that cancel themselves on time, exactly once."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from orders.models import AbstractOrder

#: The setting that names the order model, as ``AUTH_USER_MODEL`` names the user model.
ORDER_MODEL_SETTING = "ORDERS_ORDER_MODEL"
DEFAULT_ORDER_MODEL = "orders.Order"


def get_order_model_string() -> str:
    """The order model as ``"app_label.ModelName"``, for foreign keys and migrations
    (which must not import models). Django has no default for a setting of ours."""
    from django.conf import settings

    return str(getattr(settings, ORDER_MODEL_SETTING, DEFAULT_ORDER_MODEL))


def get_order_model() -> type[AbstractOrder]:
    """The order model of this project: ``orders.Order`` unless ``ORDERS_ORDER_MODEL``
    names a shop's own subclass of ``orders.models.AbstractOrder``."""
    from django.apps import apps
    from django.core.exceptions import ImproperlyConfigured

    name = get_order_model_string()
    try:
        model = apps.get_model(name, require_ready=False)
    except ValueError:
        raise ImproperlyConfigured(
            f"{ORDER_MODEL_SETTING} must be of the form 'app_label.ModelName', got {name!r}."
        ) from None
    except LookupError:
        raise ImproperlyConfigured(
            f"{ORDER_MODEL_SETTING} refers to model {name!r}, which is not installed: add "
            "its app to INSTALLED_APPS."
        ) from None
    return cast("type[AbstractOrder]", model)
