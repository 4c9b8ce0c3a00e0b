"""System checks for the ``ORDERS`` setting: misconfiguration is reported at start-up,
with an id and a hint, not at three in the morning by a task."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from celery import current_app
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.utils.module_loading import import_string

from orders.conf import DEFAULTS, INTEGER_SETTINGS, PAYMENT_METHOD_PATTERN, user_settings

#: Integer settings for which 0 means something (no grace; no reminder; no helpers).
ZERO_ALLOWED = ("SWEEP_GRACE", "REMIND_BEFORE", "EXPIRY_HELPERS")

TIMER_MODES = ("per_order", "batched")
# Time kept between the horizon and the visibility timeout, so that a timer is always
# acknowledged before Redis would hand it to a second worker.
VISIBILITY_MARGIN = 5 * 60


@register("orders")
def check_orders_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    given = user_settings()
    errors: list[CheckMessage] = []
    for key in sorted(set(given) - set(DEFAULTS)):
        errors.append(
            Error(
                f"ORDERS[{key!r}] is not a known setting.",
                hint=f"Known settings: {', '.join(sorted(DEFAULTS))}.",
                id="orders.E001",
            )
        )
    merged = DEFAULTS | given
    for key in INTEGER_SETTINGS:
        value = merged[key]
        unit = (
            "orders"
            if "BATCH" in key or "LIMIT" in key
            else "attempts"
            if "ATTEMPTS" in key
            else "tasks"
            if "HELPERS" in key
            else "seconds"
        )
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < (0 if key in ZERO_ALLOWED else 1)
        ):
            errors.append(
                Error(
                    f"ORDERS[{key!r}] must be a positive whole number of {unit}, got {value!r}.",
                    hint=f"The default is {DEFAULTS[key]!r}.",
                    id="orders.E002",
                )
            )
    timeout = merged["DEFAULT_TIMEOUT"]
    if isinstance(timeout, str):
        errors += _check_timeout_function(timeout)
    elif isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 1:
        errors.append(
            Error(
                "ORDERS['DEFAULT_TIMEOUT'] must be a positive whole number of seconds or the "
                f"dotted path of a function (order) -> seconds, got {timeout!r}.",
                hint=f"The default is {DEFAULTS['DEFAULT_TIMEOUT']!r}.",
                id="orders.E002",
            )
        )
    if errors:
        return errors

    if isinstance(timeout, int) and not merged["MIN_TIMEOUT"] <= timeout <= merged["MAX_TIMEOUT"]:
        errors.append(
            Error(
                "ORDERS['DEFAULT_TIMEOUT'] must lie between MIN_TIMEOUT and MAX_TIMEOUT "
                f"({merged['MIN_TIMEOUT']}..{merged['MAX_TIMEOUT']}), "
                f"got {merged['DEFAULT_TIMEOUT']}.",
                hint="Raise MAX_TIMEOUT or lower DEFAULT_TIMEOUT.",
                id="orders.E003",
            )
        )
    visibility = _visibility_timeout()
    if merged["TIMER_HORIZON"] > visibility - VISIBILITY_MARGIN:
        errors.append(
            Error(
                f"ORDERS['TIMER_HORIZON'] ({merged['TIMER_HORIZON']}s) must stay at least "
                f"{VISIBILITY_MARGIN}s below the broker's visibility_timeout ({visibility}s).",
                hint="Redis redelivers a countdown task that is still pending after the "
                "visibility timeout, so a longer timer would run twice. Lower TIMER_HORIZON "
                "or raise the broker transport option visibility_timeout.",
                id="orders.E004",
            )
        )
    for key in ("PAYMENT_GATEWAY", "LOGISTICS_PROVIDER"):
        if key == "LOGISTICS_PROVIDER" and merged[key] is None:
            continue  # the shop ships orders itself
        try:
            import_string(str(merged[key]))
        except ImportError as exc:
            errors.append(
                Error(
                    f"ORDERS[{key!r}] = {merged[key]!r} cannot be imported: {exc}.",
                    hint=f"Give the dotted path of a class, e.g. {DEFAULTS[key]!r}.",
                    id="orders.E005",
                )
            )
    currency = merged["CURRENCY"]
    if not isinstance(currency, str) or not re.fullmatch("[A-Z]{3}", currency):
        errors.append(
            Error(
                f"ORDERS['CURRENCY'] must be a 3-letter ISO 4217 code in capitals, "
                f"got {currency!r}.",
                hint='For example "CNY" or "EUR". Payments state their currency in capitals.',
                id="orders.E008",
            )
        )
    errors += _check_payment_hold(merged["PAYMENT_HOLD"])
    if merged["TIMER_MODE"] not in TIMER_MODES:
        errors.append(
            Error(
                f"ORDERS['TIMER_MODE'] must be one of {', '.join(TIMER_MODES)}, "
                f"got {merged['TIMER_MODE']!r}.",
                hint="'batched' (the default) keeps timers in Redis, in buckets "
                "TIMER_RESOLUTION wide; 'per_order' sends one Celery countdown task per order.",
                id="orders.E007",
            )
        )
    resolution = merged["TIMER_RESOLUTION"]
    if (
        not isinstance(resolution, int | float)
        or not 0.001 <= resolution <= 60
        or abs(resolution * 1000 - round(resolution * 1000)) > 1e-9
    ):
        errors.append(
            Error(
                f"ORDERS['TIMER_RESOLUTION'] must be a number of seconds from 0.001 to 60 in "
                f"whole milliseconds, got {resolution!r}.",
                hint="0.1 (the default) expires an order within about 0.1 s of its deadline.",
                id="orders.E015",
            )
        )
    if merged["SWEEP_INTERVAL"] > merged["TIMER_HORIZON"]:
        errors.append(
            Error(
                "ORDERS['SWEEP_INTERVAL'] must not exceed TIMER_HORIZON, or deadlines beyond "
                "the horizon could pass before the sweep arms them.",
                hint="Lower SWEEP_INTERVAL.",
                id="orders.E006",
            )
        )
    for key, what in (
        ("API_TOKEN", "JSON API"),
        ("PAYMENT_WEBHOOK_SECRET", "payment webhook"),
        ("LOGISTICS_WEBHOOK_SECRET", "logistics webhook"),
    ):
        if not merged[key]:
            errors.append(
                Warning(
                    f"ORDERS[{key!r}] is empty: the {what} will refuse every request.",
                    hint=f"Set it, e.g. from the environment variable ORDERS_{key}.",
                    id="orders.W001",
                )
            )
    errors += _check_webhook_secrets(merged)
    if merged["METRICS_TOKEN"] and merged["METRICS_TOKEN"] == merged["API_TOKEN"]:
        errors.append(
            Error(
                "ORDERS['METRICS_TOKEN'] is the same as ORDERS['API_TOKEN'].",
                hint="The metrics token is read-only and sits in the scraper's configuration; "
                "the API token places and cancels orders. Give the metrics token its own "
                "random value (e.g. python -c 'import secrets; print(secrets.token_urlsafe())').",
                id="orders.E011",
            )
        )
    return errors


@register("orders", "models")
def check_order_model(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """ORDERS_ORDER_MODEL names an installed subclass of AbstractOrder: the services
    rely on its fields and transitions."""
    from orders import ORDER_MODEL_SETTING, get_order_model, get_order_model_string
    from orders.models import AbstractOrder

    hint = (
        "Name a model of yours that derives from orders.models.AbstractOrder, e.g. "
        "'shop.Order' for `class Order(AbstractOrder)` in shop/models.py, or remove the "
        "setting to use orders.Order."
    )
    try:
        model = get_order_model()
    except ImproperlyConfigured as exc:
        return [Error(str(exc), hint=hint, id="orders.E012")]
    if not issubclass(model, AbstractOrder):
        return [
            Error(
                f"{ORDER_MODEL_SETTING} = {get_order_model_string()!r} does not derive from "
                "orders.models.AbstractOrder.",
                hint=hint,
                id="orders.E012",
            )
        ]
    return []


def _check_timeout_function(path: str) -> list[CheckMessage]:
    hint = (
        "Give seconds, or the dotted path of a function that takes the order (unsaved, "
        "with the fields place_order was given) and returns seconds, e.g. "
        "'shop.timeouts.by_channel'."
    )
    try:
        function = import_string(path)
    except ImportError as exc:
        problem = f"cannot be imported: {exc}"
    else:
        if callable(function):
            return []
        problem = "is not callable"
    return [Error(f"ORDERS['DEFAULT_TIMEOUT'] = {path!r} {problem}.", hint=hint, id="orders.E013")]


WEBHOOK_SECRETS = ("PAYMENT_WEBHOOK_SECRET", "LOGISTICS_WEBHOOK_SECRET")
MAKE_A_SECRET = (
    'Make one with: python -c "import base64, secrets; '
    "print('whsec_' + base64.b64encode(secrets.token_bytes(32)).decode())\""
)


def _check_webhook_secrets(merged: dict[str, Any]) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    for key in WEBHOOK_SECRETS:
        secret = merged[key]
        if secret and not is_webhook_secret(secret):
            errors.append(
                Error(
                    f"ORDERS[{key!r}] is not a Standard Webhooks secret.",
                    hint="It must be 'whsec_' followed by the base64 of 24 to 64 random "
                    f"bytes. {MAKE_A_SECRET}",
                    id="orders.E009",
                )
            )
    if merged[WEBHOOK_SECRETS[0]] and merged[WEBHOOK_SECRETS[0]] == merged[WEBHOOK_SECRETS[1]]:
        errors.append(
            Error(
                "ORDERS['PAYMENT_WEBHOOK_SECRET'] and ORDERS['LOGISTICS_WEBHOOK_SECRET'] are "
                "the same secret.",
                hint="Give each provider its own secret, so that a message signed for one "
                f"endpoint is refused at the other. {MAKE_A_SECRET}",
                id="orders.E010",
            )
        )
    return errors


def is_webhook_secret(value: Any) -> bool:
    """Is ``value`` 'whsec_' + base64 of 24 to 64 bytes, as Standard Webhooks asks?"""
    if not isinstance(value, str) or not value.startswith("whsec_"):
        return False
    try:
        key = base64.b64decode(value.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        return False
    return 24 <= len(key) <= 64


def _visibility_timeout() -> int:
    # Read from the Celery app the host project configured, whatever its namespace.
    options = current_app.conf.broker_transport_options or {}
    return int(options.get("visibility_timeout", 3600))


@register("orders")
def check_receivers(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """A receiver's name keys its delivery records (orders.events): one that changes
    between deploys (a lambda, a function defined inside another) would get every event
    still owed to it again, under its new name."""
    from orders.signals import SIGNALS

    return [
        Warning(
            f"The receiver {name!r} of {signal.event_type} has no stable name.",
            hint="Connect a module-level function, or give it a dispatch_uid: its name keys "
            "the records that make each event reach it once.",
            id="orders.W002",
        )
        for signal in SIGNALS.values()
        for name in signal.connected
        if "<" in name
    ]


def _check_payment_hold(hold: Any) -> list[CheckMessage]:
    """PAYMENT_HOLD: payment methods (as start_payment takes them) to whole seconds, with
    a "default". (Not bound by MAX_TIMEOUT, which bounds the timeouts orders are placed
    with: a bank transfer may hold an order for days where no order is placed for so long.)"""
    problem = None
    if not isinstance(hold, dict) or "default" not in hold:
        problem = f'must be a dict of payment methods to seconds with a "default", got {hold!r}'
    else:
        for method, seconds in hold.items():
            if not isinstance(method, str) or not re.fullmatch(PAYMENT_METHOD_PATTERN, method):
                problem = f"has a method name {method!r} that is not {PAYMENT_METHOD_PATTERN}"
            elif isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 1:
                problem = (
                    f"holds {method!r} for {seconds!r}, not a positive whole number of seconds"
                )
    if problem is None:
        return []
    return [
        Error(
            f"ORDERS['PAYMENT_HOLD'] {problem}.",
            hint=f"The default is {DEFAULTS['PAYMENT_HOLD']!r}.",
            id="orders.E014",
        )
    ]


#: Isolation levels under which the expiry's locking reads and its re-checks disagree on
#: MySQL/MariaDB (a plain read sees the transaction's first snapshot, not the locked row).
SNAPSHOT_LEVELS = ("repeatable read", "serializable")


@register(Tags.database)
def check_database(
    app_configs: Any = None, databases: Any = None, **kwargs: Any
) -> list[CheckMessage]:
    """MySQL and MariaDB: the expiry locks due rows with ``SKIP LOCKED`` (MySQL 8.0.1+,
    MariaDB 10.6+), and expects READ COMMITTED, Django's default there."""
    messages: list[CheckMessage] = []
    for alias in databases or ():
        connection = connections[alias]
        if connection.vendor != "mysql":
            continue
        if not connection.features.has_select_for_update_skip_locked:
            messages.append(
                Warning(
                    f"Database {alias!r} ({connection.display_name}) has no SELECT ... FOR "
                    "UPDATE SKIP LOCKED: concurrent sweeps and bucket tasks wait for each "
                    "other's rows instead of taking the next ones.",
                    hint="Use MariaDB 10.6 or newer, or MySQL 8.0.1 or newer.",
                    id="orders.W003",
                )
            )
        level = str((connection.settings_dict.get("OPTIONS") or {}).get("isolation_level") or "")
        if level.lower() in SNAPSHOT_LEVELS:
            messages.append(
                Warning(
                    f"Database {alias!r} runs at {level.upper()}: a plain read inside a "
                    "transaction sees its first snapshot, so a re-check after a lock may "
                    "read an order as it was before another process changed it.",
                    hint='Remove OPTIONS["isolation_level"] (Django uses READ COMMITTED on '
                    'MySQL and MariaDB) or set it to "read committed".',
                    id="orders.W004",
                )
            )
    return messages
