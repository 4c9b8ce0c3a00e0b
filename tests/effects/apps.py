"""A test-only app: receivers of every order event that leave a row per call (``Effect``),
so that a test sees how often a receiver's database work really happened.

Its table always exists; its receivers are connected only in processes started with
``ORDERS_TEST_RECEIVERS=1`` (the workers of tests/test_events.py) or by a test through
``receivers.connect()``."""

import os

from django.apps import AppConfig


class EffectsConfig(AppConfig):
    name = "tests.effects"
    label = "effects"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        wanted = os.environ.get("ORDERS_TEST_RECEIVERS")  # "1": both; "tally": that one
        if wanted:
            from tests.effects import receivers

            receivers.connect(with_gate=wanted != "tally")
