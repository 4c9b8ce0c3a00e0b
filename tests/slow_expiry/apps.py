import os
import time
from typing import Any

from django.apps import AppConfig


class SlowExpiryConfig(AppConfig):
    """Each expiry made slow on purpose (``ORDERS_TEST_EXPIRY_DELAY`` seconds per order),
    inside the batch's transaction, for the tests that need sweeps to overlap: the bulk
    expiry writes a batch in one statement, far too fast for that."""

    name = "tests.slow_expiry"
    label = "slow_expiry"

    def ready(self) -> None:
        from orders import services

        delay = float(os.environ["ORDERS_TEST_EXPIRY_DELAY"])
        expire_batch = services._expire_batch

        def slow_batch(*args: Any, **kwargs: Any) -> Any:
            batch = expire_batch(*args, **kwargs)
            time.sleep(delay * len(batch))  # the batch's rows stay locked meanwhile
            return batch

        services._expire_batch = slow_batch
