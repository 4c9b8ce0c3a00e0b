"""The batched timers' engine on a real Redis: buckets in one sorted set, claimed by the
waker with a lease, published once, and a bucket whose waker died comes due again.
The tests that a real worker's waker expires orders on time are in test_timers.py."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import kombu.exceptions
import pytest
import redis
from pytest_django import Settings

from orders import broker, scheduling, waker

T = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@pytest.fixture
def client(timers_key: str) -> redis.Redis:
    """The broker's Redis, the timers' set being this test's own."""
    return broker.redis_client()


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """What the waker publishes (the publish itself is tested by the worker tests)."""
    published: list[tuple[str, int]] = []
    monkeypatch.setattr(
        scheduling,
        "publish",
        lambda task, **options: published.append((task.name, *options["args"])),
    )
    return published


def ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


@pytest.mark.parametrize(
    ("deadline", "bucket"),
    [
        (T, ms(T)),  # on a boundary: its own bucket, never late by rounding
        (T + timedelta(microseconds=1), ms(T) + 100),
        (T + timedelta(milliseconds=99), ms(T) + 100),
        (T + timedelta(milliseconds=100), ms(T) + 100),
        (T - timedelta(milliseconds=1), ms(T)),
    ],
)
def test_a_deadline_falls_into_the_bucket_ending_at_the_next_tenth_of_a_second(
    deadline: datetime, bucket: int
) -> None:
    assert scheduling.bucket_of(deadline) == bucket


def test_the_resolution_is_a_setting(settings: Settings) -> None:
    settings.ORDERS = settings.ORDERS | {"TIMER_RESOLUTION": 1}
    assert scheduling.bucket_of(T + timedelta(milliseconds=1)) == ms(T) + 1000
    settings.ORDERS = settings.ORDERS | {"TIMER_RESOLUTION": 0.005}
    assert scheduling.bucket_of(T + timedelta(milliseconds=1)) == ms(T) + 5


def test_adding_a_bucket_twice_keeps_one(client: redis.Redis) -> None:
    assert scheduling.add_buckets(scheduling.EXPIRE, [1000, 1100]) == 2
    assert scheduling.add_buckets(scheduling.EXPIRE, [1100, 1200]) == 1
    assert scheduling.add_buckets(scheduling.REMIND, [1100]) == 1  # another kind

    members = client.zrange(scheduling.timers_key(), 0, -1, withscores=True)
    assert members == [
        (b"expire:1000", 1000.0),
        (b"expire:1100", 1100.0),
        (b"remind:1100", 1100.0),
        (b"expire:1200", 1200.0),
    ]


def test_a_bucket_comes_due_at_the_earliest_deadline_armed_in_it(client: redis.Redis) -> None:
    bucket = ms(T) + 100
    member = f"expire:{bucket}"

    scheduling.publish_bucket_timer("a", T + timedelta(milliseconds=60, microseconds=1))
    assert client.zscore(scheduling.timers_key(), member) == ms(T) + 61  # never before it
    scheduling.publish_bucket_timer("b", T + timedelta(milliseconds=90))  # later: no change
    assert client.zscore(scheduling.timers_key(), member) == ms(T) + 61
    scheduling.publish_bucket_timer("c", T + timedelta(milliseconds=20))
    assert client.zscore(scheduling.timers_key(), member) == ms(T) + 20
    scheduling.add_buckets(scheduling.EXPIRE, [bucket])  # a re-arm, due at the end
    assert client.zscore(scheduling.timers_key(), member) == ms(T) + 20
    assert client.zcard(scheduling.timers_key()) == 1


def test_a_wake_publishes_each_due_bucket_once_and_keeps_the_rest(
    client: redis.Redis, sent: list[tuple[str, int]]
) -> None:
    scheduling.add_buckets(scheduling.EXPIRE, [1000, 2000, 9000])
    scheduling.add_buckets(scheduling.REMIND, [1500])

    pause = waker.wake(client, now_ms=2000)

    assert sent == [
        ("orders.expire_bucket", 1000),
        ("orders.remind_bucket", 1500),
        ("orders.expire_bucket", 2000),
    ]
    assert client.zrange(scheduling.timers_key(), 0, -1) == [b"expire:9000"]
    assert pause == 0.1, "the next bucket is far: sleep the resolution, no longer"

    assert waker.wake(client, now_ms=8950) == pytest.approx(0.05), "sleeps until it is due"
    assert len(sent) == 3, "nothing due twice"
    assert waker.wake(client, now_ms=9000) == 0.1
    assert sent[-1] == ("orders.expire_bucket", 9000)
    assert client.zcard(scheduling.timers_key()) == 0


def test_a_bucket_claimed_by_a_waker_that_died_comes_due_again_after_the_lease(
    client: redis.Redis, sent: list[tuple[str, int]]
) -> None:
    scheduling.add_buckets(scheduling.EXPIRE, [1000])
    # A waker claims it and dies before publishing: the claim alone, no release.
    claimed, _, _ = client.eval(waker._CLAIM, 1, scheduling.timers_key(), 1000, waker.LEASE, 10)
    assert claimed == [b"expire:1000"]

    waker.wake(client, now_ms=1000 + waker.LEASE - 1)
    assert sent == [], "another waker leaves it alone while the lease lasts"

    waker.wake(client, now_ms=1000 + waker.LEASE)
    assert sent == [("orders.expire_bucket", 1000)]
    assert client.zcard(scheduling.timers_key()) == 0


def test_a_bucket_armed_again_while_its_task_is_published_stays(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduling.add_buckets(scheduling.REMIND, [1000])

    def publish_while_a_reminder_for_now_arrives(task: Any, **options: Any) -> None:
        # A reminder whose time has passed is added to the coming bucket: this one.
        scheduling.add_buckets(scheduling.REMIND, [1000])

    monkeypatch.setattr(scheduling, "publish", publish_while_a_reminder_for_now_arrives)
    waker.wake(client, now_ms=1000)

    assert client.zrange(scheduling.timers_key(), 0, -1) == [b"remind:1000"], (
        "the task already published may have read the database before that order committed"
    )


def test_a_broker_that_refuses_the_publish_leaves_the_bucket_to_come_due_again(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch, sent: list[tuple[str, int]]
) -> None:
    scheduling.add_buckets(scheduling.EXPIRE, [1000])

    def down(task: Any, **options: Any) -> None:
        raise kombu.exceptions.OperationalError("connection refused")

    with monkeypatch.context() as patch:
        patch.setattr(scheduling, "publish", down)
        with pytest.raises(kombu.exceptions.OperationalError):
            waker.wake(client, now_ms=1000)

    assert client.zscore(scheduling.timers_key(), "expire:1000") == 1000 + waker.LEASE
    waker.wake(client, now_ms=1000 + waker.LEASE)
    assert sent == [("orders.expire_bucket", 1000)]


def test_many_due_buckets_are_taken_a_claim_at_a_time_without_sleeping(
    client: redis.Redis, sent: list[tuple[str, int]]
) -> None:
    scheduling.add_buckets(scheduling.EXPIRE, range(1, waker.CLAIM_LIMIT + 6))

    assert waker.wake(client, now_ms=10_000) == 0.0, "more may be due: wake again at once"
    assert waker.wake(client, now_ms=10_000) == 0.1
    assert sorted(b for _, b in sent) == list(range(1, waker.CLAIM_LIMIT + 6))


def test_a_member_of_an_unknown_kind_is_dropped_not_retried(
    client: redis.Redis, sent: list[tuple[str, int]]
) -> None:
    client.zadd(scheduling.timers_key(), {"shipment:1000": 1000})
    waker.wake(client, now_ms=1000)
    assert sent == []
    assert client.zcard(scheduling.timers_key()) == 0


def test_the_waker_thread_wakes_until_stopped_and_says_when_redis_is_down(
    client: redis.Redis,
    sent: list[tuple[str, int]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The consumer is not used by the step.
    step = waker.Waker(None)  # type: ignore[arg-type]
    scheduling.add_buckets(scheduling.EXPIRE, [ms(datetime.now(UTC)) - 1])

    step.start(None)  # type: ignore[arg-type]
    wait_for(lambda: bool(sent))
    step.stop(None)  # type: ignore[arg-type]
    assert len(sent) == 1
    assert step.thread is None

    monkeypatch.setattr(
        broker, "redis_client", lambda **_: redis.Redis(port=1, socket_connect_timeout=0.2)
    )
    with caplog.at_level(logging.WARNING, logger="orders.timers"):
        step.start(None)  # type: ignore[arg-type]
        wait_for(lambda: "cannot reach Redis" in caplog.text)
        step.stop(None)  # type: ignore[arg-type]
    assert caplog.text.count("cannot reach Redis") == 1, "said once, not every second"


def wait_for(condition: Any, seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
