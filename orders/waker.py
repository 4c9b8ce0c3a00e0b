"""The batched timers' engine: one Redis sorted set of timer buckets, and a waker in
every worker that turns the buckets coming due into tasks.

Arming (``scheduling.publish_bucket_timer``) adds the deadline's bucket, a member
``"expire:<end ms>"`` scored by the earliest deadline armed in it, to the set: one
``ZADD``, nothing held in a worker. The waker, a thread each worker runs beside its
consumer, sleeps until the earliest bucket is due (at most ``TIMER_RESOLUTION``, so
that a bucket added meanwhile waits no longer), then claims the due buckets with one
Lua script and publishes ``orders.expire_bucket`` (or ``orders.remind_bucket``) for
each, at once.

Claiming does not remove a bucket: it moves its score ``LEASE`` ahead, and the bucket
is removed once its task is published. A waker that dies between the two leaves the
bucket to come due again, and another waker publishes it: a bucket's task may run twice
(it is a no-op the second time), never not at all. As BullMQ promotes delayed jobs from
one sorted set, with the set holding buckets rather than orders: its size is bounded by
the horizon over the resolution, however many orders are pending.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import redis
from celery import bootsteps

from orders import broker, scheduling
from orders.conf import get_settings
from orders.logging import log_event

if TYPE_CHECKING:
    from celery.worker.consumer import Consumer

logger = logging.getLogger("orders.timers")

#: How long a claimed bucket is kept from other wakers before it counts as lost (ms).
LEASE = 10_000
#: Buckets claimed per script call.
CLAIM_LIMIT = 100

# KEYS[1]: the set; ARGV: now (ms), the lease (ms), the limit. Returns the claimed
# members, their new score, and the earliest score left ('' if none).
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local leased = tonumber(ARGV[1]) + tonumber(ARGV[2])
for _, member in ipairs(due) do
    redis.call('ZADD', KEYS[1], 'XX', leased, member)
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {due, tostring(leased), first[2] or ''}
"""
# KEYS[1]: the set; ARGV[1]: the lease's score; the rest: members published. A member
# whose score changed meanwhile was armed again (a reminder for now, a re-arm): kept.
_RELEASE = """
local removed = 0
for i = 2, #ARGV do
    if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i])) == tonumber(ARGV[1]) then
        removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
    end
end
return removed
"""

#: What a wake raises when Redis (the set's, or the broker's for the publish) fails.
WAKE_ERRORS = scheduling.BROKER_ERRORS


def wake(client: redis.Redis, *, now_ms: int | None = None) -> float:
    """Publish the task of every bucket due by now; return how long to sleep (seconds)
    before the next wake. Raises WAKE_ERRORS (the claimed buckets come due again)."""
    from orders.tasks import expire_bucket_task, remind_bucket_task

    tasks = {scheduling.EXPIRE: expire_bucket_task, scheduling.REMIND: remind_bucket_task}
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    key = scheduling.timers_key()
    due, leased, first = client.eval(_CLAIM, 1, key, now_ms, LEASE, CLAIM_LIMIT)
    published = []
    for member in due:
        kind, _, bucket = member.decode().partition(":")
        task = tasks.get(kind)
        if task is not None:  # a member this version does not know is dropped
            scheduling.publish(task, args=(int(bucket),))
            log_event(
                logger,
                "timer.bucket_due",
                "Timer bucket {member} published, {to_end_ms} ms before its end.",
                level=logging.DEBUG,
                member=member.decode(),
                to_end_ms=int(bucket) - now_ms,
            )
        published.append(member)
    if published:
        client.eval(_RELEASE, 1, key, leased, *published)
    if len(due) == CLAIM_LIMIT:
        return 0.0
    longest = get_settings().TIMER_RESOLUTION
    if not first:
        return longest
    return min(longest, max(0.0, (float(first) - now_ms) / 1000))


class Waker(bootsteps.StartStopStep):
    """The worker's side: a thread that wakes while the consumer is started."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Consumer, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, parent: Consumer) -> None:
        self.stopping.clear()
        self.thread = threading.Thread(target=self.run, name="orders-timer-waker", daemon=True)
        self.thread.start()

    def stop(self, parent: Consumer) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
            self.thread = None

    shutdown = stop

    def run(self) -> None:
        client = broker.redis_client(connect_timeout=1, timeout=2)
        failing = False
        try:
            while not self.stopping.is_set():
                try:
                    pause = wake(client)
                except WAKE_ERRORS as exc:
                    if not failing:
                        log_event(
                            logger,
                            "timer.waker_failed",
                            "The timer waker cannot reach Redis ({error}); due buckets wait "
                            "until it can, and the sweep expires their orders meanwhile.",
                            level=logging.WARNING,
                            error=str(exc),
                        )
                    failing, pause = True, 1.0
                else:
                    if failing:
                        log_event(logger, "timer.waker_recovered", "The timer waker is back.")
                    failing = False
                self.stopping.wait(pause)
        finally:
            client.close()


def add_to_worker(sender: Any, **kwargs: Any) -> None:
    """``worker_init`` receiver, as ``heartbeat.add_to_worker``: every worker wakes the
    timers, whichever mode the processes that arm them run in."""
    sender.app.steps["consumer"].add(Waker)
