"""The broker's Redis, for the app's own few commands beside Celery's (the batched
timers' sorted set, the health check, the workers' heartbeat): one place that turns
Celery's broker URL into a redis-py client, a Sentinel-managed one for ``sentinel://``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.sentinel
from celery import current_app
from django.core.exceptions import ImproperlyConfigured

#: kombu's default port of a ``sentinel://`` URL (``SentinelTransport.default_port``).
SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelBroker:
    """Where a ``sentinel://`` broker URL and its transport options say the master is."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    #: Connection arguments for the sentinels themselves (their password, say).
    sentinel_kwargs: dict[str, Any] | None = field(default=None, compare=False)
    min_other_sentinels: int = 0


def is_sentinel(url: str) -> bool:
    return url.startswith("sentinel://")


def parse_sentinel_url(url: str, transport_options: Mapping[str, Any]) -> SentinelBroker:
    """Read a ``sentinel://[user:password@]host[:port][/db][;sentinel://host[:port]...]``
    URL as kombu's sentinel transport does: every part names a sentinel; the Redis
    credentials and database come from the first part; ``master_name`` (required),
    ``sentinel_kwargs`` and ``min_other_sentinels`` from the transport options."""
    parts = [urlsplit(part) for part in url.split(";") if part]
    if not parts or any(part.scheme != "sentinel" for part in parts):
        raise ImproperlyConfigured(
            f"A Sentinel broker URL is 'sentinel://host:port' parts joined by ';', got {url!r}."
        )
    master_name = transport_options.get("master_name")
    if not master_name:
        raise ImproperlyConfigured(
            "The broker URL is a sentinel:// URL but broker_transport_options has no "
            "'master_name': set it to the name the sentinels monitor "
            "(the host project reads REDIS_SENTINEL_MASTER)."
        )
    first = parts[0]
    path = first.path.strip("/")
    try:
        db = int(path) if path else 0
    except ValueError:
        raise ImproperlyConfigured(
            f"The database of a sentinel:// URL is a number, got {path!r}."
        ) from None
    return SentinelBroker(
        sentinels=tuple((p.hostname or "127.0.0.1", p.port or SENTINEL_PORT) for p in parts),
        master_name=str(master_name),
        db=db,
        username=unquote(first.username) if first.username else None,
        password=unquote(first.password) if first.password else None,
        sentinel_kwargs=transport_options.get("sentinel_kwargs"),
        min_other_sentinels=int(transport_options.get("min_other_sentinels") or 0),
    )


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
    """A client on the broker's Redis whose every call is bounded in time. Under
    Sentinel it asks the sentinels where the master is, and again after a failover."""
    url = redis_url(url)
    if is_sentinel(url):
        return _sentinel_master(
            parse_sentinel_url(url, transport_options()), connect_timeout, timeout
        )
    return redis.Redis.from_url(url, socket_connect_timeout=connect_timeout, socket_timeout=timeout)


def _sentinel_master(where: SentinelBroker, connect_timeout: float, timeout: float) -> redis.Redis:
    # Without sentinel_kwargs, redis-py gives the sentinels the same socket timeouts
    # (and no password), as kombu does.
    sentinel = redis.sentinel.Sentinel(
        list(where.sentinels),
        min_other_sentinels=where.min_other_sentinels,
        sentinel_kwargs=where.sentinel_kwargs,
        socket_connect_timeout=connect_timeout,
        socket_timeout=timeout,
    )
    return sentinel.master_for(
        where.master_name, db=where.db, username=where.username, password=where.password
    )


def transport_options() -> dict[str, Any]:
    return dict(current_app.conf.broker_transport_options or {})


def key_prefix() -> str:
    """The broker's ``global_keyprefix``: the app's own keys carry it too, so that two
    deployments sharing one Redis stay apart."""
    return str(transport_options().get("global_keyprefix", ""))
