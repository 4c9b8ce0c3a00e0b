"""Test settings: the host project's, with fixed secrets and this run's own Redis keys.

The key prefix keeps this run's queues apart from anything else on the same Redis; it
is put in the environment so that the worker processes the tests start share it, as is
the secret key (the host project's settings refuse to start without one, DEBUG off).
"""

import os
import uuid

os.environ.setdefault("CELERY_KEY_PREFIX", f"orders-test-{uuid.uuid4().hex[:10]}:")
os.environ.setdefault("SECRET_KEY", "django-insecure-tests-only")

from config.settings import *  # noqa: F403
from config.settings import CELERY_BROKER_TRANSPORT_OPTIONS, ORDERS
from orders.conf import DEFAULTS

ORDERS = ORDERS | {
    "API_TOKEN": "test-api-token",
    # Standard Webhooks secrets: "whsec_" + base64 of 32 bytes, one per provider.
    "PAYMENT_WEBHOOK_SECRET": "whsec_dGVzdC1wYXltZW50LXdlYmhvb2stc2VjcmV0LXh4eHg=",
    "LOGISTICS_WEBHOOK_SECRET": "whsec_dGVzdC1sb2dpc3RpY3Mtd2ViaG9vay1zZWNyZXQteHg=",
    "METRICS_TOKEN": "test-metrics-token",
    # Outbound webhooks go to the HTTP servers the tests start on 127.0.0.1, and fail
    # fast. Here rather than in the environment: the session's worker, started by
    # whichever test comes first, must have them too.
    "WEBHOOK_ALLOW_PRIVATE": True,
    "WEBHOOK_TIMEOUT": 1,
    "WEBHOOK_RETRY_BACKOFF": 1,
}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# Test-only knobs, read from the environment so that the worker and actor processes a
# test starts get them too. Unset, they change nothing.
for _key in ("PAYMENT_GATEWAY", "LOGISTICS_PROVIDER"):
    if os.environ.get(f"ORDERS_{_key}"):
        # "none": no logistics provider, the shop ships orders itself.
        _value = os.environ[f"ORDERS_{_key}"]
        ORDERS = ORDERS | {_key: None if _value == "none" else _value}
for _key in (
    "SHIPPING_RETRY_AFTER",
    "SWEEP_BATCH_SIZE",
    "EXPIRY_BATCH_SIZE",
    "REMIND_BEFORE",
    "EVENT_RETRY_BACKOFF",
):
    if os.environ.get(f"ORDERS_{_key}"):
        ORDERS = ORDERS | {_key: int(os.environ[f"ORDERS_{_key}"])}
# Payment attempts on a real worker in seconds rather than minutes
# (tests/test_payment_attempts_worker.py, the randomized test): a test-only method
# "quick" whose hold is capped at ORDERS_TEST_QUICK_HOLD seconds (4), and a pending
# attempt asked about again every second (ORDERS_PAYMENT_STATUS_RECHECK overrides it).
# Here rather than only in the environment: the session's worker, started by whichever
# test comes first, must have them too. No other test pays with "quick".
ORDERS = ORDERS | {
    "PAYMENT_HOLD": DEFAULTS["PAYMENT_HOLD"]
    | {"quick": int(os.environ.get("ORDERS_TEST_QUICK_HOLD") or 4)},
    "PAYMENT_STATUS_RECHECK": int(os.environ.get("ORDERS_PAYMENT_STATUS_RECHECK") or 1),
}
# How often kombu puts back messages unacknowledged for longer than the visibility
# timeout (default: a scan every 10 x 10 s), for the redelivery tests.
for _option in ("unacked_restore_interval", "unacked_restore_throttle"):
    if os.environ.get(f"CELERY_{_option.upper()}"):
        CELERY_BROKER_TRANSPORT_OPTIONS = CELERY_BROKER_TRANSPORT_OPTIONS | {
            _option: int(os.environ[f"CELERY_{_option.upper()}"])
        }
# Each expiry made slow on purpose (tests/slow_expiry), for tests that need a sweep to
# outlast the sweep interval.
if os.environ.get("ORDERS_TEST_EXPIRY_DELAY"):
    INSTALLED_APPS = [*INSTALLED_APPS, "tests.slow_expiry"]  # noqa: F405
# Receivers that count their effects (tests/effects): the table always, the receivers
# only where ORDERS_TEST_RECEIVERS is set. Before a shop's app, so that in its workers
# the test receivers are connected (and called) before the shop's own.
INSTALLED_APPS = [*INSTALLED_APPS, "tests.effects"]
# The suite once more with a shop's own order model: set ORDERS_ORDER_MODEL in the
# environment (the worker processes get it too) to swapshop.Order (tests/swapshop, the
# least a shop adds) or shop.Order (the example shop, docs/examples/shop).
SHOP_APPS = {"swapshop.Order": "tests.swapshop", "shop.Order": "docs.examples.shop"}
if os.environ.get("ORDERS_ORDER_MODEL"):
    ORDERS_ORDER_MODEL = os.environ["ORDERS_ORDER_MODEL"]
    INSTALLED_APPS = [*INSTALLED_APPS, SHOP_APPS[ORDERS_ORDER_MODEL]]
