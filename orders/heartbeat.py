"""Workers say they are alive, so that nobody has to ask them: each worker writes its
name into one Redis sorted set every ``INTERVAL`` seconds, and ``/health/`` and
``orders_demo`` read who did so within ``TTL`` seconds.

Asking instead (a Celery broadcast ``ping``) takes two broker connections from the
process's pool of ten and waits for answers: from web requests under load it hung every
thread. Reading one key takes one round trip on a client with a 1 s timeout.

The writer is a consumer bootstep that the app adds to every worker of any host
project (``add_to_worker``, connected to Celery's ``worker_init`` signal in
``OrdersConfig.ready``): it runs on the worker's own timer, only while the consumer is
connected (the consumer stops its steps when the broker connection is lost and starts
them again once reconnected), so a beat means "this worker is consuming".
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
import redis.exceptions
from celery import bootsteps

from orders import broker
from orders.logging import log_event

if TYPE_CHECKING:
    from celery.worker.consumer import Consumer

logger = logging.getLogger("orders.heartbeat")

#: How often a worker beats, and how long a beat counts (seconds).
INTERVAL = 10.0
TTL = 30
#: At most this many workers are read back: the answer stays small and bounded.
MAX_WORKERS = 100

#: What a Redis call raises when the server is unreachable or slow.
REDIS_ERRORS = (redis.exceptions.RedisError, OSError)


def heartbeat_key() -> str:
    """One sorted set per deployment: worker name -> Redis time of its last beat. The
    broker's ``global_keyprefix`` keeps deployments sharing one Redis apart."""
    return f"{broker.key_prefix()}orders:worker-heartbeats"


def _server_time(client: redis.Redis) -> float:
    # Redis's clock, not the hosts': a worker's and the web server's clocks may differ.
    seconds, microseconds = client.time()
    return seconds + microseconds / 1_000_000


def beat(client: redis.Redis, worker: str) -> None:
    """Record that ``worker`` is alive now; forget workers silent for longer than TTL."""
    now = _server_time(client)
    key = heartbeat_key()
    pipe = client.pipeline()
    pipe.zadd(key, {worker: now})
    pipe.zremrangebyscore(key, "-inf", now - TTL)
    # When every worker is gone the key goes too.
    pipe.expire(key, TTL)
    pipe.execute()


def forget(client: redis.Redis, worker: str) -> None:
    """A worker that stops says so at once, rather than TTL seconds later."""
    client.zrem(heartbeat_key(), worker)


@dataclass(frozen=True)
class LiveWorker:
    name: str
    #: Seconds since its last beat.
    age: float


def live_workers(client: redis.Redis) -> list[LiveWorker]:
    """The workers that beat within the last TTL seconds, most recent first."""
    pipe = client.pipeline(transaction=False)
    pipe.time()
    pipe.zrevrange(heartbeat_key(), 0, MAX_WORKERS - 1, withscores=True)
    (seconds, microseconds), members = pipe.execute()
    now = seconds + microseconds / 1_000_000
    workers = [LiveWorker(name.decode(), max(0.0, now - score)) for name, score in members]
    return [worker for worker in workers if worker.age <= TTL]


class Heartbeat(bootsteps.StartStopStep):
    """The worker's side: beat at once when the consumer starts consuming, then every
    INTERVAL seconds on the consumer's timer; forget the worker when it stops."""

    # After the task consumer, so that a beat means the worker takes tasks.
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Consumer, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.client: redis.Redis | None = None
        self.timer_entry: Any = None

    def start(self, parent: Consumer) -> None:
        # Short timeouts: on the prefork event loop a slow Redis must not stall the
        # consumer for long.
        self.client = broker.redis_client(connect_timeout=1, timeout=1)
        self._beat(parent.hostname)
        self.timer_entry = parent.timer.call_repeatedly(INTERVAL, self._beat, (parent.hostname,))

    def stop(self, parent: Consumer) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None
        if self.client is not None:
            # Redis gone: the beat expires by itself after TTL.
            with contextlib.suppress(*REDIS_ERRORS):
                forget(self.client, parent.hostname)
            self.client.close()
            self.client = None

    shutdown = stop

    def _beat(self, worker: str) -> None:
        assert self.client is not None
        try:
            beat(self.client, worker)
        except REDIS_ERRORS as exc:
            log_event(
                logger,
                "heartbeat.failed",
                "Worker {worker} could not write its heartbeat ({error}); /health/ will report "
                "it down after {ttl_s}s.",
                level=logging.WARNING,
                worker=worker,
                error=type(exc).__name__,
                ttl_s=TTL,
            )


def add_to_worker(sender: Any, **kwargs: Any) -> None:
    """``worker_init`` receiver: give the starting worker's consumer the Heartbeat step.
    ``worker_init`` comes after Django is set up and before the consumer is built, so
    this reaches every worker of any project that installs the app."""
    sender.app.steps["consumer"].add(Heartbeat)
