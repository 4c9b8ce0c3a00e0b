"""The broker's Redis, for the app's own few commands beside Celery's (the batched
timers' ``SET NX``, the health check, the workers' heartbeat): one place that turns
Celery's broker URL into a redis-py client."""

from __future__ import annotations

import redis
from celery import current_app


def redis_url(url: str | None = None) -> str:
    """``url`` (default: Celery's broker URL) in the form redis-py reads: kombu spells
    a Unix socket ``redis+socket://``, redis-py ``unix://``."""
    url = str(url or current_app.conf.broker_url)
    if url.startswith("redis+socket://"):
        url = "unix://" + url.removeprefix("redis+socket://")
    return url


def redis_client(
    url: str | None = None, *, connect_timeout: float = 2, timeout: float = 5
) -> redis.Redis:
    """A client on the broker's Redis whose every call is bounded in time."""
    return redis.Redis.from_url(
        redis_url(url), socket_connect_timeout=connect_timeout, socket_timeout=timeout
    )


def key_prefix() -> str:
    """The broker's ``global_keyprefix``: the app's own keys carry it too, so that two
    deployments sharing one Redis stay apart."""
    return str((current_app.conf.broker_transport_options or {}).get("global_keyprefix", ""))
