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

ORDERS = ORDERS | {"API_TOKEN": "test-api-token", "WEBHOOK_SECRET": "test-webhook-secret"}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# Test-only knobs, read from the environment so that the worker and actor processes a
# test starts get them too. Unset, they change nothing.
for _key in ("PAYMENT_GATEWAY", "LOGISTICS_PROVIDER"):
    if os.environ.get(f"ORDERS_{_key}"):
        ORDERS = ORDERS | {_key: os.environ[f"ORDERS_{_key}"]}
if os.environ.get("ORDERS_SHIPPING_RETRY_AFTER"):
    ORDERS = ORDERS | {"SHIPPING_RETRY_AFTER": int(os.environ["ORDERS_SHIPPING_RETRY_AFTER"])}
# How often kombu puts back messages unacknowledged for longer than the visibility
# timeout (default: a scan every 10 x 10 s), for the redelivery tests.
for _option in ("unacked_restore_interval", "unacked_restore_throttle"):
    if os.environ.get(f"CELERY_{_option.upper()}"):
        CELERY_BROKER_TRANSPORT_OPTIONS = CELERY_BROKER_TRANSPORT_OPTIONS | {
            _option: int(os.environ[f"CELERY_{_option.upper()}"])
        }
