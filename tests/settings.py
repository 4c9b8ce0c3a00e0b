"""Test settings: the host project's, with fixed secrets and this run's own Redis keys.

The key prefix keeps this run's queues apart from anything else on the same Redis; it
is put in the environment so that the worker processes the tests start share it.
"""

import os
import uuid

os.environ.setdefault("CELERY_KEY_PREFIX", f"orders-test-{uuid.uuid4().hex[:10]}:")

from config.settings import *  # noqa: F403
from config.settings import ORDERS

ORDERS = ORDERS | {"API_TOKEN": "test-api-token", "WEBHOOK_SECRET": "test-webhook-secret"}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
