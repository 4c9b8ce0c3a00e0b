"""How timers and follow-up tasks reach the broker: after commit, within the horizon,
and never at the cost of the order when the broker is down (the sweep recovers)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import kombu.exceptions
import redis.exceptions
from django.db import transaction
from django.utils import timezone

from orders.conf import get_settings
from orders.models import Order

logger = logging.getLogger("orders.timers")

# What a publish raises when Redis is unreachable or refuses us.
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    kombu.exceptions.OperationalError,
    redis.exceptions.RedisError,
    OSError,
)


def within_horizon(deadline: datetime, now: datetime | None = None) -> bool:
    horizon = timedelta(seconds=get_settings().TIMER_HORIZON)
    return deadline - (now or timezone.now()) <= horizon


def arm_expiry_timer(order: Order, *, now: datetime | None = None, force: bool = False) -> bool:
    """Arm the order's expiry timer for its current deadline once the caller's
    transaction commits; the caller saves ``order``. Returns whether a timer will be sent.

    A deadline that already has its timer is left alone unless ``force`` (the broker lost
    it). A deadline beyond the horizon is left for the sweep to arm later, so that no
    countdown outlives the broker's visibility timeout or sits in worker memory for days.
    """
    already_armed = order.timer_armed_for == order.expires_at and not force
    if already_armed or not within_horizon(order.expires_at, now):
        return False
    order.timer_armed_for = order.expires_at
    order_id, deadline = str(order.pk), order.expires_at
    transaction.on_commit(lambda: _publish_expiry_timer(order_id, deadline))
    return True


def _publish_expiry_timer(order_id: str, deadline: datetime) -> None:
    from orders.tasks import expire_order_task  # tasks import services, which import us

    countdown = max(0.0, (deadline - timezone.now()).total_seconds())
    try:
        expire_order_task.apply_async(args=(order_id,), countdown=countdown)
    except BROKER_ERRORS as exc:
        # Forget the timer so that the sweep arms it again (or expires the order).
        Order.objects.filter(pk=order_id, timer_armed_for=deadline).update(timer_armed_for=None)
        logger.error(
            "Expiry timer for order %s NOT armed, the broker is unreachable (%s); "
            "the sweep will arm it or expire the order.",
            order_id,
            exc,
        )
    else:
        logger.info(
            "Expiry timer armed for order %s: fires in %.1fs at %s.",
            order_id,
            countdown,
            deadline.isoformat(),
        )


def enqueue_on_commit(task: Any, *args: str, what: str) -> None:
    """Send a follow-up task (shipping, refund) once the caller's transaction commits.
    If the broker is down the work is not lost: the sweep finds it in the database."""
    transaction.on_commit(_publisher(task, args, what))


def _publisher(task: Any, args: tuple[str, ...], what: str) -> Callable[[], None]:
    def publish() -> None:
        try:
            task.apply_async(args=args)
        except BROKER_ERRORS as exc:
            logger.error(
                "Could not queue %s for %s, the broker is unreachable (%s); "
                "the sweep will retry it.",
                what,
                ", ".join(args),
                exc,
            )

    return publish
