"""A private ``redis-server`` for the fault tests, which stop, flush and restart it.

Never the shared Redis of the run (``settings.CELERY_BROKER_URL``): a test that shuts
its broker down must not take the other tests' broker with it. The server listens on a
free TCP port of 127.0.0.1, without persistence (``--save "" --appendonly no``), so a
restart comes back empty, like a failover to a replica that had nothing yet.

``publishing_to()`` points this process's Celery app at such a server for the duration
of a ``with`` block, so that ``services.place_order()`` and ``services.sweep()`` called
by the test publish their timers where the test's own workers listen.
"""

from __future__ import annotations

import ast
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import kombu.pools
import redis

from config.embedded_redis import server_binary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """``redis-server`` on 127.0.0.1:<port>, in its own process, started and stopped at will.

    The port stays the same across ``stop()`` and ``start()``, as a real Redis that
    restarts behind the same address."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.binary = shutil.which("redis-server") or server_binary()
        self.dir = Path(tempfile.mkdtemp(prefix="orders-test-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def is_up(self) -> bool:
        try:
            return bool(self.client().ping())
        except (redis.RedisError, OSError):
            return False

    def start(self, timeout: float = 10) -> RedisServer:
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--logfile",
                str(self.dir / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not self.is_up():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Shut the server down (its data is gone: no persistence)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def flushall(self) -> None:
        self.client().flushall()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def queued(client: redis.Redis, prefix: str, queue: str = "celery") -> int:
    """Messages waiting in a queue (not yet delivered to any worker)."""
    return int(client.llen(f"{prefix}{queue}"))


def unacked(client: redis.Redis, prefix: str) -> int:
    """Messages delivered to a worker and not acknowledged yet: for countdown tasks, the
    timers a worker holds in memory."""
    return int(client.hlen(f"{prefix}unacked"))


def _reset_producer_pools(app: Any) -> None:
    # Drop every connection and producer pool, kombu's global pool groups included (they
    # would hand the app its closed pools back: "Acquire on closed pool"), so that the
    # next publish opens a connection to the broker the configuration now names.
    kombu.pools.reset()
    app._pool = None
    app.amqp._producer_pool = None


@contextmanager
def publishing_to(url: str, prefix: str | None = None) -> Iterator[None]:
    """Make this process publish its tasks to ``url`` (keys prefixed ``prefix``, if given)
    inside the block; the broker from settings again afterwards."""
    from config.celery import app

    saved = {
        "broker_url": app.conf.broker_url,
        "broker_transport_options": dict(app.conf.broker_transport_options or {}),
    }
    options = dict(saved["broker_transport_options"])
    if prefix is not None:
        options["global_keyprefix"] = prefix
    _reset_producer_pools(app)
    app.conf.update(broker_url=url, broker_transport_options=options)
    try:
        yield
    finally:
        _reset_producer_pools(app)
        app.conf.update(saved)


def queued_task_args(
    client: redis.Redis, prefix: str, queue: str = "celery"
) -> list[tuple[str, tuple[Any, ...]]]:
    """The (task name, arguments) of the messages waiting in a queue."""
    found = []
    for raw in client.lrange(f"{prefix}{queue}", 0, -1):
        headers = json.loads(raw)["headers"]
        found.append((headers["task"], ast.literal_eval(headers["argsrepr"])))
    return found
