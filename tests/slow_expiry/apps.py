import os
import time
from typing import Any

from django.apps import AppConfig


class SlowExpiryConfig(AppConfig):
    name = "tests.slow_expiry"
    label = "slow_expiry"

    def ready(self) -> None:
        from django_fsm.signals import post_transition

        delay = float(os.environ["ORDERS_TEST_EXPIRY_DELAY"])

        def slow_down(sender: Any, name: str, **kwargs: Any) -> None:
            if name == "expire":
                time.sleep(delay)

        post_transition.connect(slow_down, weak=False, dispatch_uid="tests.slow_expiry")
