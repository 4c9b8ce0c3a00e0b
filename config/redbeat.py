"""Settings for celery-redbeat, the optional beat scheduler that keeps its schedule and a
lock in Redis, so that of several beats only one sends tasks and another takes over when
it dies (``CELERY_BEAT_SCHEDULER=redbeat.RedBeatScheduler``, see README "Two beats").

redbeat reads neither kombu's ``redis+socket://`` nor its ``sentinel://`` URLs nor the
broker's ``global_keyprefix``: this spells the broker's Redis the way redbeat reads it."""

from __future__ import annotations

from typing import Any

from orders.broker import is_sentinel, parse_sentinel_url, redis_url

SCHEDULER = "redbeat.RedBeatScheduler"


def redbeat_settings(
    broker_url: str, transport_options: dict[str, Any], *, lock_timeout: int
) -> dict[str, Any]:
    """The ``CELERY_REDBEAT_*`` settings (without the prefix, lower case, as Celery keys)
    for a beat on the broker's Redis. The lock expires ``lock_timeout`` seconds after the
    active beat last ticked; a standby tries for it every fifth of that."""
    options: dict[str, Any] = {
        "socket_connect_timeout": transport_options.get("socket_connect_timeout", 2),
        "socket_timeout": transport_options.get("socket_timeout", 5),
        # Ride out a short broker outage (a failover) instead of dying at the first error.
        "retry_period": lock_timeout,
    }
    url = redis_url(broker_url)
    if is_sentinel(url):
        where = parse_sentinel_url(url, transport_options)
        url = "redis-sentinel://"
        options |= {
            "sentinels": list(where.sentinels),
            "service_name": where.master_name,
            "db": where.db,
            "password": where.password,
            "username": where.username,
            "sentinel_kwargs": where.sentinel_kwargs,
        }
        del options["socket_connect_timeout"]  # redbeat's Sentinel takes socket_timeout only
    return {
        "redbeat_redis_url": url,
        "redbeat_redis_options": options,
        "redbeat_key_prefix": f"{transport_options.get('global_keyprefix', '')}redbeat:",
        "redbeat_lock_timeout": lock_timeout,
        "beat_max_loop_interval": max(1, lock_timeout // 5),
    }
