"""orders/broker.py: the broker URL, as Celery takes it, turned into the app's own Redis
client: plain, Unix socket, or Sentinel (read as kombu's sentinel transport reads it).
The failover itself is proven in tests/test_failover.py."""

from __future__ import annotations

import pytest
import redis.sentinel
from django.core.exceptions import ImproperlyConfigured

from orders import broker

MASTER = {"master_name": "shop"}


def test_a_single_sentinel_url_names_one_sentinel_and_database_0() -> None:
    where = broker.parse_sentinel_url("sentinel://10.0.0.5:26380", MASTER)
    assert where.sentinels == (("10.0.0.5", 26380),)
    assert (where.master_name, where.db, where.username, where.password) == ("shop", 0, None, None)


def test_several_sentinels_are_joined_by_semicolons_and_the_port_defaults_to_26379() -> None:
    where = broker.parse_sentinel_url("sentinel://s1;sentinel://s2:26380;sentinel://s3/", MASTER)
    assert where.sentinels == (("s1", 26379), ("s2", 26380), ("s3", 26379))


def test_credentials_and_database_come_from_the_first_part_as_in_kombu() -> None:
    where = broker.parse_sentinel_url(
        "sentinel://app:p%40ss@s1:26379/3;sentinel://s2:26379/3", MASTER
    )
    assert (where.username, where.password, where.db) == ("app", "p@ss", 3)
    assert where.sentinels == (("s1", 26379), ("s2", 26379))


def test_a_password_alone_is_the_masters_and_the_sentinels_get_theirs_from_sentinel_kwargs() -> (
    None
):
    where = broker.parse_sentinel_url(
        "sentinel://:secret@s1",
        MASTER | {"sentinel_kwargs": {"password": "other"}, "min_other_sentinels": 1},
    )
    assert (where.username, where.password) == (None, "secret")
    assert where.sentinel_kwargs == {"password": "other"}
    assert where.min_other_sentinels == 1


def test_without_a_master_name_the_error_says_which_setting_to_give() -> None:
    with pytest.raises(ImproperlyConfigured, match="REDIS_SENTINEL_MASTER"):
        broker.parse_sentinel_url("sentinel://s1:26379", {"global_keyprefix": "x:"})


@pytest.mark.parametrize(
    "url",
    ["sentinel://s1:26379;redis://r1:6379", "sentinel://s1:26379/zero"],
)
def test_a_malformed_sentinel_url_is_refused_clearly(url: str) -> None:
    with pytest.raises(ImproperlyConfigured, match="sentinel://"):
        broker.parse_sentinel_url(url, MASTER)


def test_the_client_of_a_sentinel_url_asks_the_sentinels_for_the_master() -> None:
    from config.celery import app

    saved = app.conf.broker_transport_options
    app.conf.broker_transport_options = dict(saved or {}) | MASTER
    try:
        client = broker.redis_client("sentinel://s1:26380;sentinel://s2", timeout=3)
    finally:
        app.conf.broker_transport_options = saved
    pool = client.connection_pool
    assert isinstance(pool, redis.sentinel.SentinelConnectionPool)
    assert pool.service_name == "shop"
    sentinels = pool.sentinel_manager.sentinels
    assert [(s.connection_pool.connection_kwargs["host"]) for s in sentinels] == ["s1", "s2"]
    assert [(s.connection_pool.connection_kwargs["port"]) for s in sentinels] == [26380, 26379]
    assert pool.connection_kwargs["socket_timeout"] == 3


def test_a_unix_socket_url_is_spelled_for_redis_py_and_others_are_left_alone() -> None:
    assert broker.redis_url("redis+socket:///var/run/redis.sock") == "unix:///var/run/redis.sock"
    assert broker.redis_url("redis://r1:6379/2") == "redis://r1:6379/2"
    client = broker.redis_client("redis+socket:///tmp/x.sock", timeout=4)
    assert client.connection_pool.connection_kwargs["path"] == "/tmp/x.sock"
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 4
