"""The system checks of the ``ORDERS`` setting: each misconfiguration has its id."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

import pytest
from django.core import checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from pytest_django import Settings

from orders import checks as checks_module
from orders.checks import VISIBILITY_MARGIN, check_order_model, check_orders_settings
from orders.conf import DEFAULTS


def messages_with(settings: Settings, **overrides: Any) -> list[checks.CheckMessage]:
    settings.ORDERS = settings.ORDERS | overrides
    return check_orders_settings()


def ids_with(settings: Settings, **overrides: Any) -> list[str]:
    return [m.id or "" for m in messages_with(settings, **overrides)]


def visibility_timeout(settings: Settings) -> int:
    return int(settings.CELERY_BROKER_TRANSPORT_OPTIONS.get("visibility_timeout", 3600))


def test_test_settings_pass_every_orders_check() -> None:
    assert check_orders_settings() == []


def test_manage_py_check_passes_with_the_test_settings() -> None:
    out = io.StringIO()

    call_command("check", "--fail-level", "WARNING", stdout=out)

    assert "no issues" in out.getvalue()


def test_manage_py_check_fails_on_a_misconfigured_orders_setting(settings: Settings) -> None:
    settings.ORDERS = settings.ORDERS | {"DEFAULT_TIMOUT": 600}

    with pytest.raises(SystemCheckError, match=r"orders\.E001"):
        call_command("check", stdout=io.StringIO(), stderr=io.StringIO())


def test_empty_orders_setting_only_warns_about_the_missing_secrets(settings: Settings) -> None:
    settings.ORDERS = {}

    messages = check_orders_settings()

    assert [m.id for m in messages] == ["orders.W001"] * 3


def test_unknown_key_is_reported_by_name(settings: Settings) -> None:
    [message] = messages_with(settings, DEFAULT_TIMOUT=600)

    assert message.id == "orders.E001"
    assert message.level == checks.ERROR
    assert "DEFAULT_TIMOUT" in message.msg
    assert "DEFAULT_TIMEOUT" in (message.hint or "")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("DEFAULT_TIMEOUT", 1800.0),
        ("DEFAULT_TIMEOUT", None),
        ("MIN_TIMEOUT", 0),
        ("MAX_TIMEOUT", -1),
        ("TIMER_HORIZON", 0),
        ("SWEEP_INTERVAL", True),
        ("SWEEP_GRACE", -1),
        ("SWEEP_BATCH_SIZE", 0),
        ("EXPIRY_BATCH_SIZE", 0),
        ("SHIPPING_RETRY_AFTER", "60"),
        ("BULK_REFUND_LIMIT", 0),
        ("BULK_REFUND_LIMIT", "50"),
    ],
)
def test_value_that_is_not_a_positive_whole_number_is_reported(
    settings: Settings, key: str, value: Any
) -> None:
    [message] = messages_with(settings, **{key: value})

    assert message.id == "orders.E002"
    assert key in message.msg
    assert repr(DEFAULTS[key]) in (message.hint or "")


def test_sweep_grace_of_zero_is_allowed(settings: Settings) -> None:
    assert ids_with(settings, SWEEP_GRACE=0) == []


@pytest.mark.parametrize(
    "overrides",
    [
        {"DEFAULT_TIMEOUT": DEFAULTS["MAX_TIMEOUT"] + 1},
        {"MIN_TIMEOUT": 600, "DEFAULT_TIMEOUT": 599},
        {"MAX_TIMEOUT": 600, "DEFAULT_TIMEOUT": 601},
    ],
)
def test_default_timeout_outside_the_allowed_timeouts_is_reported(
    settings: Settings, overrides: dict[str, int]
) -> None:
    assert ids_with(settings, **overrides) == ["orders.E003"]


def test_default_timeout_at_the_bounds_is_allowed(settings: Settings) -> None:
    assert ids_with(settings, MIN_TIMEOUT=60, DEFAULT_TIMEOUT=60, MAX_TIMEOUT=60) == []


def test_horizon_too_close_to_the_visibility_timeout_is_reported(settings: Settings) -> None:
    horizon = visibility_timeout(settings) - VISIBILITY_MARGIN + 1

    [message] = messages_with(settings, TIMER_HORIZON=horizon)

    assert message.id == "orders.E004"
    assert str(visibility_timeout(settings)) in message.msg


def test_horizon_of_3500s_is_too_long_for_the_default_visibility_timeout(
    settings: Settings,
) -> None:
    if visibility_timeout(settings) != 3600:
        pytest.skip("the environment sets another visibility timeout")

    assert ids_with(settings, TIMER_HORIZON=3500) == ["orders.E004"]


def test_horizon_a_margin_below_the_visibility_timeout_is_allowed(settings: Settings) -> None:
    horizon = visibility_timeout(settings) - VISIBILITY_MARGIN

    assert ids_with(settings, TIMER_HORIZON=horizon) == []


@pytest.mark.parametrize("key", ["PAYMENT_GATEWAY", "LOGISTICS_PROVIDER"])
@pytest.mark.parametrize(
    "path", ["orders.gateways.NoSuchBackend", "no_such_module.Backend", "not-a-dotted-path"]
)
def test_backend_that_cannot_be_imported_is_reported(
    settings: Settings, key: str, path: str
) -> None:
    [message] = messages_with(settings, **{key: path})

    assert message.id == "orders.E005"
    assert key in message.msg
    assert path in message.msg


def test_backend_given_by_a_dotted_path_is_allowed(settings: Settings) -> None:
    assert ids_with(settings, PAYMENT_GATEWAY="orders.gateways.LocalPaymentGateway") == []


@pytest.mark.parametrize("path", [None, 42])
def test_backend_that_is_not_a_string_is_reported(settings: Settings, path: Any) -> None:
    assert ids_with(settings, PAYMENT_GATEWAY=path) == ["orders.E005"]


def test_sweep_interval_longer_than_the_horizon_is_reported(settings: Settings) -> None:
    assert ids_with(settings, TIMER_HORIZON=600, SWEEP_INTERVAL=601) == ["orders.E006"]


def test_sweep_interval_equal_to_the_horizon_is_allowed(settings: Settings) -> None:
    assert ids_with(settings, TIMER_HORIZON=600, SWEEP_INTERVAL=600) == []


@pytest.mark.parametrize("mode", ["batch", "", None, "PER_ORDER"])
def test_unknown_timer_mode_is_reported(settings: Settings, mode: Any) -> None:
    assert ids_with(settings, TIMER_MODE=mode) == ["orders.E007"]


@pytest.mark.parametrize("mode", ["per_order", "batched"])
def test_known_timer_modes_are_allowed(settings: Settings, mode: str) -> None:
    assert ids_with(settings, TIMER_MODE=mode) == []


@pytest.mark.parametrize("resolution", [0, 0.0005, 0.0015, 61, -1, "0.1", None, float("nan")])
def test_a_timer_resolution_that_is_not_whole_milliseconds_up_to_a_minute_is_reported(
    settings: Settings, resolution: Any
) -> None:
    assert ids_with(settings, TIMER_RESOLUTION=resolution) == ["orders.E015"]


@pytest.mark.parametrize("resolution", [0.001, 0.1, 1, 60])
def test_a_timer_resolution_in_whole_milliseconds_is_allowed(
    settings: Settings, resolution: float
) -> None:
    assert ids_with(settings, TIMER_RESOLUTION=resolution) == []


@pytest.mark.parametrize("key", ["API_TOKEN", "PAYMENT_WEBHOOK_SECRET", "LOGISTICS_WEBHOOK_SECRET"])
def test_empty_secret_is_a_warning(settings: Settings, key: str) -> None:
    [message] = messages_with(settings, **{key: ""})

    assert message.id == "orders.W001"
    assert message.level == checks.WARNING
    assert not message.is_serious()
    assert key in message.msg


@pytest.mark.parametrize(
    "secret",
    [
        "test-webhook-secret",  # the old scheme's kind of secret
        "whsec_",
        "whsec_not base64!",
        "whsec_" + base64.b64encode(b"short").decode(),
        "whsec_" + base64.b64encode(b"x" * 65).decode(),
        base64.b64encode(b"x" * 32).decode(),  # without the prefix
    ],
    ids=["plain", "empty-key", "not-base64", "too-short", "too-long", "no-prefix"],
)
@pytest.mark.parametrize("key", ["PAYMENT_WEBHOOK_SECRET", "LOGISTICS_WEBHOOK_SECRET"])
def test_a_webhook_secret_that_is_not_a_standard_webhooks_secret_is_an_error(
    settings: Settings, key: str, secret: str
) -> None:
    [message] = messages_with(settings, **{key: secret})

    assert message.id == "orders.E009"
    assert key in message.msg
    assert "whsec_" in (message.hint or "")


def test_one_secret_for_both_providers_is_an_error(settings: Settings) -> None:
    """A message signed for one endpoint would be accepted at the other."""
    secret = settings.ORDERS["PAYMENT_WEBHOOK_SECRET"]

    assert ids_with(settings, LOGISTICS_WEBHOOK_SECRET=secret) == ["orders.E010"]


def test_the_old_single_webhook_secret_is_an_unknown_setting(settings: Settings) -> None:
    assert ids_with(settings, WEBHOOK_SECRET="whatever") == ["orders.E001"]


def test_several_problems_are_reported_together(settings: Settings) -> None:
    ids = ids_with(
        settings,
        DEFAULT_TIMEOUT=DEFAULTS["MAX_TIMEOUT"] + 1,
        PAYMENT_GATEWAY="no_such_module.Backend",
        TIMER_HORIZON=600,
        SWEEP_INTERVAL=601,
        API_TOKEN="",
    )

    assert sorted(ids) == ["orders.E003", "orders.E005", "orders.E006", "orders.W001"]


@pytest.mark.parametrize("currency", ["cny", "EURO", ""])
def test_currency_that_is_not_an_iso_code_is_reported(settings: Settings, currency: str) -> None:
    assert ids_with(settings, CURRENCY=currency) == ["orders.E008"]


def test_metrics_token_equal_to_the_api_token_is_reported(settings: Settings) -> None:
    [message] = messages_with(settings, API_TOKEN="one-token", METRICS_TOKEN="one-token")

    assert message.id == "orders.E011"
    assert message.is_serious()
    assert "METRICS_TOKEN" in message.msg


def test_empty_metrics_token_is_allowed(settings: Settings) -> None:
    """Without it, only staff logins read /metrics: a choice, not a mistake."""
    assert ids_with(settings, METRICS_TOKEN="") == []


def test_the_default_order_model_passes_its_check() -> None:
    assert check_order_model() == []


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ("auth.User", "'auth.User' does not derive from orders.models.AbstractOrder"),
        ("nowhere.Order", "'nowhere.Order', which is not installed"),
        ("Order", "must be of the form 'app_label.ModelName'"),
    ],
)
def test_an_order_model_that_is_not_an_installed_abstract_order_is_an_error(
    settings: Settings, model: str, says: str
) -> None:
    settings.ORDERS_ORDER_MODEL = model

    [message] = check_order_model()

    assert (message.id, message.level) == ("orders.E012", checks.ERROR)
    assert says in message.msg
    assert "AbstractOrder" in (message.hint or "")


def test_no_logistics_provider_is_allowed(settings: Settings) -> None:
    # None: the shop ships orders itself.
    assert ids_with(settings, LOGISTICS_PROVIDER=None) == []


def test_a_logistics_provider_that_is_not_a_string_is_reported(settings: Settings) -> None:
    assert ids_with(settings, LOGISTICS_PROVIDER=42) == ["orders.E005"]


def test_default_timeout_may_name_a_function(settings: Settings) -> None:
    path = "tests.test_services.timeout_by_channel"
    assert ids_with(settings, DEFAULT_TIMEOUT=path) == []


@pytest.mark.parametrize(
    ("path", "says"),
    [
        # Before 0.2.0 a string was refused as "not a whole number" (E002); now it is a path.
        ("1800", "cannot be imported"),
        ("tests.test_services.no_such_function", "cannot be imported"),
        ("tests.test_services.T0", "is not callable"),
    ],
)
def test_default_timeout_naming_no_function_is_reported(
    settings: Settings, path: str, says: str
) -> None:
    [message] = messages_with(settings, DEFAULT_TIMEOUT=path)

    assert message.id == "orders.E013"
    assert says in message.msg


@pytest.mark.parametrize(
    "hold",
    [
        {"card": 900},  # no "default"
        [("default", 900)],
        {"default": 0},
        {"default": 900, "card": True},
        {"default": 900, "card": "15m"},
        {"default": 900, "Card": 900},
        {"default": 900, "": 900},
    ],
)
def test_a_payment_hold_that_is_not_methods_to_seconds_is_reported(
    settings: Settings, hold: Any
) -> None:
    assert ids_with(settings, PAYMENT_HOLD=hold) == ["orders.E014"]


def test_payment_holds_of_methods_to_seconds_are_allowed(settings: Settings) -> None:
    assert (
        ids_with(settings, PAYMENT_HOLD={"default": 60, "wechat_qr": 7200, "sepa.debit": 1}) == []
    )


def test_the_readme_lists_every_setting_and_every_check_id() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("| key | default | |")
    table = readme[start : readme.index("\n\n", start)]

    assert [key for key in DEFAULTS if f"`{key}`" not in table] == []
    ids = re.findall(r'id="orders\.(E\d+)"', Path(checks_module.__file__).read_text())
    # "`orders.E001`-`E014`", with an en dash as README writes ranges.
    assert f"`orders.E001`\N{EN DASH}`{max(ids)}`" in readme


class FakeFeatures:
    def __init__(self, skip_locked: bool) -> None:
        self.has_select_for_update_skip_locked = skip_locked


class FakeConnection:
    def __init__(self, vendor: str, *, skip_locked: bool = True, level: str | None = None):
        self.vendor = vendor
        self.display_name = "MariaDB"
        self.features = FakeFeatures(skip_locked)
        self.settings_dict = {"OPTIONS": {"isolation_level": level} if level else {}}


@pytest.mark.parametrize(
    ("connection", "ids"),
    [
        (FakeConnection("mysql"), []),
        (FakeConnection("mysql", level="read committed"), []),
        (FakeConnection("mysql", skip_locked=False), ["orders.W003"]),
        (FakeConnection("mysql", level="REPEATABLE READ"), ["orders.W004"]),
        (
            FakeConnection("mysql", skip_locked=False, level="serializable"),
            ["orders.W003", "orders.W004"],
        ),
        (FakeConnection("postgresql", skip_locked=False, level="serializable"), []),
    ],
)
def test_a_mysql_database_without_skip_locked_or_at_a_snapshot_isolation_level_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, connection: FakeConnection, ids: list[str]
) -> None:
    monkeypatch.setattr(checks_module, "connections", {"default": connection})

    assert [m.id for m in checks_module.check_database(databases=["default"])] == ids
    assert checks_module.check_database(databases=None) == [], "database checks only when asked"
