"""A process that acts on orders at a given moment, for the race tests.

    python -m tests.actors pay|expire <unix time to start> <order id> ...
    python -m tests.actors script <plan.json> <results.json>

Each runs in its own process with its own database connection, like a web worker
taking a payment webhook or a Celery worker firing a timer.

A script is a JSON list of ``[unix time, action, arguments]`` sorted by time, with the
actions ``pay`` (a payment webhook: ``order_id``, ``payment_ref``, ``amount``, maybe
the ``attempt_ref`` it ends), ``return`` (the logistics webhook saying the parcel came
back: ``order_id``), ``start`` (the storefront's "Pay" button: ``start_payment`` with
``order_id``, ``attempt_ref``, ``method``, ``hold_for``) and ``tell`` (what the payment
provider answers from then on about an attempt: the local gateway's ``simulate``, with
``order_id``, ``attempt_ref``, ``status`` and, when paid, ``payment_ref``, ``amount``,
``currency``). Each
step waits for its moment, calls the service as the webhook view would, and retries a
``GatewayError`` as the sender of a webhook retries on an error response. The results
file gets one ``[planned, started, action, order id, outcome, attempts]`` per step.

A carrier reports only parcels it was given: ``return`` waits (without holding up the
steps after it) until the order is shipped and sends its tracking number; for an order
that ends without being shipped it sends nothing and says so.
"""

from __future__ import annotations

import heapq
import json
import os
import sys
import time
from typing import Any


def main(action: str, start_at: float, order_ids: list[str]) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django

    django.setup()
    from orders import services

    time.sleep(max(0.0, start_at - time.time()))
    for order_id in order_ids:
        if action == "pay":
            services.record_payment(
                order_id=order_id, payment_ref=f"race-{order_id}-{os.getpid()}", amount="10.00"
            )
        else:
            services.expire_order(order_id=order_id, by="racing expirer")


def run_script(plan_path: str, results_path: str) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django

    django.setup()
    from orders import get_order_model, services
    from orders.gateways import GatewayError, LocalPaymentGateway, payment_gateway
    from orders.models import Status

    Order = get_order_model()

    with open(plan_path) as f:
        plan: list[tuple[float, str, dict[str, Any]]] = json.load(f)
    # (when, planned, seq, action, arguments, first taken): a return whose parcel is not
    # shipped yet goes back in the queue, half a second later; its lag behind the plan
    # counts from when it was first taken.
    queue = [(at, at, seq, action, kwargs, 0.0) for seq, (at, action, kwargs) in enumerate(plan)]
    heapq.heapify(queue)
    results = []
    while queue:
        when, at, seq, action, kwargs, first = heapq.heappop(queue)
        time.sleep(max(0.0, when - time.time()))
        started = first or time.time()
        outcome, attempts = "", 0
        while not outcome:
            attempts += 1
            try:
                if action == "pay":
                    payment = services.record_payment(by="payment webhook", **kwargs)
                    outcome = payment.outcome
                elif action == "start":
                    attempt = services.start_payment(by="storefront", **kwargs)
                    outcome = f"attempt {attempt.outcome}"
                elif action == "tell":
                    provider = payment_gateway()
                    assert isinstance(provider, LocalPaymentGateway)
                    told = {k: v for k, v in kwargs.items() if k != "order_id"}
                    provider.simulate(told.pop("attempt_ref"), told.pop("status"), **told)
                    outcome = f"told {kwargs['status']}"
                elif action == "return":
                    order = Order.objects.get(pk=kwargs["order_id"])
                    if order.tracking_number:
                        order = services.record_parcel_status(
                            tracking_number=order.tracking_number,
                            status="returned",
                            by="logistics webhook",
                            **kwargs,
                        )
                        outcome = order.status
                    elif order.status in (Status.CREATED, Status.PAID) and time.time() < at + 120:
                        retry = (time.time() + 0.5, at, seq, action, kwargs, started)
                        heapq.heappush(queue, retry)
                        break
                    else:
                        outcome = f"never shipped: {order.status}"
                else:
                    raise ValueError(f"unknown action {action!r}")
            except GatewayError:
                if attempts >= 20:
                    raise
                time.sleep(0.2)  # the sender retries a failed webhook
            except services.OrderError as exc:
                # The webhook view answers with an error; the result says which.
                outcome = f"error: {type(exc).__name__}: {exc}"
        if outcome:
            results.append([at, started, action, kwargs["order_id"], outcome, attempts])
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    if sys.argv[1] == "script":
        run_script(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1], float(sys.argv[2]), sys.argv[3:])
