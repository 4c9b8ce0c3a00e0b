"""The test receivers: ``tally`` writes an ``Effect``; ``gate`` does too, after waiting
while the file named by ``ORDERS_TEST_GATE`` exists (it writes ``<file>.entered`` first,
so that a test knows a worker is inside it and may kill that worker there). Both sleep
``ORDERS_TEST_RECEIVER_DELAY`` seconds inside their transaction, if set, and ``tally``
raises, after writing its row, for a share ``ORDERS_TEST_RECEIVER_FAILURE_RATE`` of its
calls (the row must then be rolled back with the failed delivery)."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

from orders.models import OrderTransition
from orders.signals import SIGNALS
from tests.effects.models import Effect

GATE, TALLY = "tests.effects.gate", "tests.effects.tally"


def _effect(name: str, order: Any, event: OrderTransition) -> None:
    delay = float(os.environ.get("ORDERS_TEST_RECEIVER_DELAY") or 0)
    Effect.objects.create(
        event_id=event.event_id, event_type=event.event_type, receiver=name, order_id=order.pk
    )
    time.sleep(delay)


def gate(sender: Any, order: Any, event: OrderTransition, **kwargs: Any) -> None:
    path = os.environ.get("ORDERS_TEST_GATE")
    if path and os.path.exists(path):
        Path(f"{path}.entered").write_text(str(event.event_id))
        while os.path.exists(path):
            time.sleep(0.05)
    _effect("gate", order, event)


class ReceiverFailure(Exception):
    pass


def tally(sender: Any, order: Any, event: OrderTransition, **kwargs: Any) -> None:
    _effect("tally", order, event)
    if random.random() < float(os.environ.get("ORDERS_TEST_RECEIVER_FAILURE_RATE") or 0):
        raise ReceiverFailure(f"tally failed on purpose for {event.event_id}")


def connect(*, with_gate: bool = True) -> None:
    for signal in SIGNALS.values():
        if with_gate:
            signal.connect(gate, dispatch_uid=GATE)
        signal.connect(tally, dispatch_uid=TALLY)


def disconnect() -> None:
    for signal in SIGNALS.values():
        signal.disconnect(dispatch_uid=GATE)
        signal.disconnect(dispatch_uid=TALLY)
