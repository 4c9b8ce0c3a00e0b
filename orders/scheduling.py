"""How timers and follow-up tasks reach the broker: after commit, within the horizon,
and never at the cost of the order when the broker is down (the sweep recovers)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import kombu.exceptions
import redis
import redis.exceptions
from django.db import transaction
from django.utils import timezone

from orders import broker, get_order_model
from orders.conf import get_settings
from orders.logging import log_event
from orders.models import AbstractOrder

logger = logging.getLogger("orders.timers")

# What a publish raises when Redis is unreachable or refuses us.
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    kombu.exceptions.OperationalError,
    redis.exceptions.RedisError,
    OSError,
)


#: How long a publish waits for a free connection in the process's broker pool when the
#: Celery app sets no ``broker_pool_acquire_timeout`` (seconds).
POOL_WAIT = 2.0


def publish(task: Any, **options: Any) -> None:
    """``task.apply_async(**options)`` on a connection from the Celery app's broker pool,
    waiting a bounded time for one (``broker_pool_acquire_timeout``, else POOL_WAIT).

    Celery's own publish takes a producer from a pool and then, for it, a connection
    from the connection pool with no time limit: once something holds all
    ``broker_pool_limit`` connections, every request that publishes hangs for good. An
    empty pool here is "the broker is unreachable" (OperationalError): the order is
    saved and the sweep arms its timer later."""
    app = task.app
    timeout = app.conf.get("broker_pool_acquire_timeout") or POOL_WAIT
    try:
        connection = app.pool.acquire(block=True, timeout=timeout)
    except kombu.exceptions.LimitExceeded:
        raise kombu.exceptions.OperationalError(
            f"all {app.pool.limit} broker connections of this process stayed in use for "
            f"{timeout:g}s (broker_pool_limit)"
        ) from None
    with connection:
        # ``connection=`` (public, documented): the producer is made on this connection
        # instead of being taken from the producer pool.
        task.apply_async(connection=connection, **options)


def within_horizon(deadline: datetime, now: datetime | None = None) -> bool:
    horizon = timedelta(seconds=get_settings().TIMER_HORIZON)
    return deadline - (now or timezone.now()) <= horizon


def arm_expiry_timer(
    order: AbstractOrder, *, now: datetime | None = None, rearm: bool = False
) -> bool:
    """Arm the order's expiry timer for its current deadline once the caller's
    transaction commits; the caller saves ``order``. Returns whether a timer will be sent.

    A deadline that already has its timer is left alone, unless this is a re-arm (the
    broker lost the timers: ``services.rearm_timers``).
    A deadline beyond the horizon is left for the sweep to arm later, so that no
    countdown outlives the broker's visibility timeout or sits in worker memory for days.
    """
    already_armed = order.timer_armed_for == order.expires_at and not rearm
    if already_armed or not within_horizon(order.expires_at, now):
        return False
    order.timer_armed_for = order.expires_at
    order_id, deadline = str(order.pk), order.expires_at
    if get_settings().TIMER_MODE == "batched":
        transaction.on_commit(lambda: publish_bucket_timer(order_id, deadline))
    else:
        transaction.on_commit(lambda: publish_expiry_timer(order_id, deadline))
    # The reminder rides along: armed with the deadline's timer, so by the same rule.
    remind_at = reminder_time(order)
    if remind_at is not None:
        arm_reminder_timer(order_id, deadline, remind_at)
    return True


def reminder_time(order: AbstractOrder) -> datetime | None:
    """When ``order.expiring_soon`` is owed for the order's current deadline:
    ``REMIND_BEFORE`` seconds before it; None when reminders are off, it was sent, or a
    payment attempt holds the order."""
    before = get_settings().REMIND_BEFORE
    # A customer in the middle of paying (a payment attempt holds the order) is not
    # reminded to pay.
    if not before or order.reminded_for == order.expires_at or order.original_expires_at:
        return None
    return order.expires_at - timedelta(seconds=before)


def arm_reminder_timer(order_id: str, deadline: datetime, remind_at: datetime) -> None:
    """Send the reminder's timer for ``deadline`` once the caller's transaction commits,
    to fire at ``remind_at`` (at once if that has passed). Only ``arm_expiry_timer``
    decides to, and ``services.remind_order`` when a timer fired a moment early."""
    if get_settings().TIMER_MODE == "batched":
        transaction.on_commit(lambda: publish_reminder_bucket(order_id, remind_at))
    else:
        transaction.on_commit(lambda: publish_reminder_timer(order_id, deadline, remind_at))


def publish_expiry_timer(order_id: str, deadline: datetime) -> None:
    """Send the order's own countdown task now (per-order mode); a broker error is logged
    and leaves the order to the sweep."""
    from orders.tasks import expire_order_task  # tasks import services, which import us

    countdown = max(0.0, (deadline - timezone.now()).total_seconds())
    try:
        publish(expire_order_task, args=(order_id,), countdown=countdown)
    except BROKER_ERRORS as exc:
        _forget_timer(order_id, deadline, exc)
    else:
        log_event(
            logger,
            "timer.armed",
            "Expiry timer armed for order {order_id}: fires in {countdown_s:.1f}s at {expires_at}.",
            order_id=order_id,
            countdown_s=countdown,
            expires_at=deadline.isoformat(),
        )


def publish_reminder_timer(order_id: str, deadline: datetime, remind_at: datetime) -> None:
    """Send the order's reminder countdown task (per-order mode), which names the
    deadline it reminds of: after an extension it is a no-op, the new one has its own."""
    from orders.tasks import remind_order_task

    countdown = max(0.0, (remind_at - timezone.now()).total_seconds())
    try:
        publish(remind_order_task, args=(order_id, deadline.isoformat()), countdown=countdown)
    except BROKER_ERRORS as exc:
        _reminder_not_armed(order_id, remind_at, exc)
    else:
        log_event(
            logger,
            "timer.reminder_armed",
            "Reminder timer armed for order {order_id}: fires in {countdown_s:.1f}s at "
            "{remind_at}.",
            order_id=order_id,
            countdown_s=countdown,
            remind_at=remind_at.isoformat(),
            expires_at=deadline.isoformat(),
        )


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MILLISECOND = timedelta(milliseconds=1)

#: What a timer bucket is for, in its sorted-set member ``"<kind>:<end in ms>"``.
EXPIRE, REMIND = "expire", "remind"


def bucket_of(deadline: datetime) -> int:
    """The bucket whose timer covers ``deadline``, as its end in milliseconds since the
    epoch: the next multiple of ``TIMER_RESOLUTION``, so that a bucket never fires before
    any of its deadlines."""
    step = round(get_settings().TIMER_RESOLUTION * 1000) * 1000  # microseconds
    at = (deadline - EPOCH) // timedelta(microseconds=1)
    return -(-at // step) * step // 1000


def ms_after(moment: datetime) -> int:
    """``moment`` in milliseconds since the epoch, rounded up (a timer never before it)."""
    return -(-(moment - EPOCH) // MILLISECOND)


def timers_key() -> str:
    """The one sorted set of timer buckets (member ``"<kind>:<end ms>"``, score when it
    is due in ms: its end, or the earliest deadline armed in it) that ``orders.waker``
    turns into tasks when they come due."""
    return f"{broker.key_prefix()}orders:timers"


def publish_bucket_timer(order_id: str, deadline: datetime) -> None:
    """Add the deadline's bucket to the timers' sorted set (batched mode): the first order
    of a bucket adds it, the rest find it there. No task waits in a worker meanwhile.

    The bucket comes due at the earliest deadline armed in it, not at its end: the orders
    of a sale, which share one deadline, expire from that moment. Its task comes again at
    the bucket's end for the bucket's later deadlines, if it has any."""
    _add_bucket(
        EXPIRE,
        order_id,
        deadline,
        bucket=bucket_of(deadline),
        due_ms=ms_after(deadline),  # never after the bucket's end
        not_added=_forget_timer,
        expires_at=deadline.isoformat(),
    )


def publish_reminder_bucket(order_id: str, remind_at: datetime) -> None:
    """Add the reminder's bucket, as ``publish_bucket_timer`` does for deadlines, due at
    its end (a reminder is never early). A reminder time already past goes to the coming
    bucket, which the waker takes at once."""
    bucket = bucket_of(max(remind_at, timezone.now()))
    _add_bucket(
        REMIND,
        order_id,
        remind_at,
        bucket=bucket,
        due_ms=bucket,
        not_added=_reminder_not_armed,
        remind_at=remind_at.isoformat(),
    )


#: The log line of a bucket added to the timers' set, by its kind.
_BUCKET_ARMED = {
    EXPIRE: ("timer.bucket_armed", "Timer bucket"),
    REMIND: ("timer.reminder_bucket_armed", "Reminder bucket"),
}


def _add_bucket(
    kind: str,
    order_id: str,
    at: datetime,
    *,
    bucket: int,
    due_ms: int,
    not_added: Callable[[str, datetime, BaseException], None],
    **fields: Any,
) -> None:
    """Add ``bucket`` (``add_buckets``), due at ``due_ms``, for one order's deadline or
    reminder ``at``, and log it if the order was its first; with the broker down,
    ``not_added(order_id, at, error)`` says so and leaves the order to the sweep."""
    try:
        added = add_buckets(kind, [bucket], due={bucket: due_ms})
    except BROKER_ERRORS as exc:
        not_added(order_id, at, exc)
        return
    if added:
        event, what = _BUCKET_ARMED[kind]
        log_event(
            logger,
            event,
            what + " {bucket} armed by order {order_id}: fires in {countdown_s:.1f}s.",
            bucket=bucket,
            order_id=order_id,
            countdown_s=max(0.0, due_ms / 1000 - time.time()),
            **fields,
        )


def share_bucket(bucket: int, helpers: int) -> None:
    """Publish ``helpers`` more tasks of an expiry bucket, which take its batches side by
    side with the task that calls this. With the broker down, that task does it all."""
    from orders.tasks import expire_bucket_task

    try:
        for _ in range(helpers):
            publish(expire_bucket_task, args=(bucket,), kwargs={"share": False})
    except BROKER_ERRORS as exc:
        log_event(
            logger,
            "timer.bucket_not_shared",
            "Timer bucket {bucket} not shared, the broker is unreachable ({error}); one task "
            "expires it all.",
            level=logging.WARNING,
            bucket=bucket,
            error=str(exc),
        )
    else:
        if helpers:
            log_event(
                logger,
                "timer.bucket_shared",
                "Timer bucket {bucket} shared with {helpers} more tasks.",
                bucket=bucket,
                helpers=helpers,
            )


def fire_bucket_again(bucket: int) -> None:
    """Add back, due at its end, an expiry bucket whose task ran before its end (at its
    earliest deadline, or on a worker's clock behind the waker's), for its orders not due
    yet. With Redis down, the sweep expires them."""
    try:
        add_buckets(EXPIRE, [bucket])
    except BROKER_ERRORS as exc:
        log_event(
            logger,
            "timer.bucket_not_armed",
            "Timer bucket {bucket} fired early and could NOT be armed again, the broker is "
            "unreachable ({error}); the sweep will expire its orders.",
            level=logging.ERROR,
            bucket=bucket,
            error=str(exc),
        )


def waker_lag() -> float:
    """How long (seconds) the oldest due bucket has waited for a waker; 0 if none is due.
    A bucket a waker claimed is not due (its lease moved it ahead). Raises the broker's
    error."""
    now_ms = time.time() * 1000
    oldest = _redis().zrangebyscore(timers_key(), "-inf", now_ms, start=0, num=1, withscores=True)
    return (now_ms - float(oldest[0][1])) / 1000 if oldest else 0.0


#: Buckets per ZADD (of one pipeline) in a re-arm.
ADD_CHUNK = 10_000


def add_buckets(kind: str, buckets: Iterable[int], *, due: Mapping[int, int] | None = None) -> int:
    """Add buckets of ``kind`` (EXPIRE or REMIND) to the timers' sorted set, each due at
    its end or at ``due[bucket]`` (ms) if that is earlier; returns how many were new. A
    bucket already there keeps the earlier of its two times (``ZADD LT``), so adding one
    twice is a no-op and a re-arm needs no bookkeeping of its own. Raises the broker's
    error."""
    pipe, key = _redis().pipeline(transaction=False), timers_key()
    chunk: dict[str, int] = {}
    for bucket in buckets:
        chunk[f"{kind}:{bucket}"] = min(bucket, (due or {}).get(bucket, bucket))
        if len(chunk) == ADD_CHUNK:
            pipe.zadd(key, chunk, lt=True)
            chunk = {}
    if chunk:
        pipe.zadd(key, chunk, lt=True)
    return sum(pipe.execute())


def _reminder_not_armed(order_id: str, remind_at: datetime, exc: BaseException) -> None:
    # Nothing to clear: the sweep sends every reminder that is due and not sent.
    log_event(
        logger,
        "timer.reminder_not_armed",
        "Reminder timer for order {order_id} NOT armed, the broker is unreachable ({error}); "
        "the sweep will send the reminder.",
        level=logging.ERROR,
        order_id=order_id,
        remind_at=remind_at.isoformat(),
        error=str(exc),
    )


def _forget_timer(order_id: str, deadline: datetime, exc: BaseException) -> None:
    # Clearing timer_armed_for makes the sweep arm the timer again (or expire the order).
    get_order_model().objects.filter(pk=order_id, timer_armed_for=deadline).update(
        timer_armed_for=None
    )
    log_event(
        logger,
        "timer.not_armed",
        "Expiry timer for order {order_id} NOT armed, the broker is unreachable ({error}); "
        "the sweep will arm it or expire the order.",
        level=logging.ERROR,
        order_id=order_id,
        expires_at=deadline.isoformat(),
        error=str(exc),
    )


@cache
def _redis() -> redis.Redis:
    """A client on the broker's Redis, for the buckets' keys."""
    return broker.redis_client()


def enqueue_on_commit(task: Any, *args: str | list[str], what: str) -> None:
    """Send a follow-up task (shipping, refund, event dispatch) once the caller's
    transaction commits. If the broker is down the work is not lost: the sweep finds it
    in the database."""
    transaction.on_commit(_publisher(task, args, what))


def _publisher(task: Any, args: tuple[str | list[str], ...], what: str) -> Callable[[], None]:
    def send() -> None:
        try:
            publish(task, args=args)
        except BROKER_ERRORS as exc:
            log_event(
                logger,
                "task.not_queued",
                "Could not queue {what} for {task_args}, the broker is unreachable ({error}); "
                "the sweep will retry it.",
                level=logging.ERROR,
                what=what,
                task_args=list(args),
                error=str(exc),
            )

    return send
