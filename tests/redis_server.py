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
from typing import Any, cast

import kombu.pools
import redis

from config.embedded_redis import server_binary

#: Ports this process has handed out: the kernel may offer a port again once the probe
#: socket is closed, and a group of servers picks its ports before any of them binds.
_handed_out: set[int] = set()


def free_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


class RedisServer:
    """``redis-server`` on 127.0.0.1:<port>, in its own process, started and stopped at will.

    The port stays the same across ``stop()`` and ``start()``, as a real Redis that
    restarts behind the same address."""

    def __init__(self, port: int | None = None, *, args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.args = args  # more of redis-server's options (--replicaof, --sentinel)
        self.binary = shutil.which("redis-server") or server_binary()
        self.dir = Path(tempfile.mkdtemp(prefix="orders-test-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def is_up(self) -> bool:
        """Our own server answers on our port (not another process that took the port)."""
        if self.proc is None:
            return False
        try:
            return int(self.client().info("server")["process_id"]) == self.proc.pid
        except (redis.RedisError, OSError):
            return False

    def command(self) -> list[str]:
        return [
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
            *self.args,
        ]

    def start(self, timeout: float = 10) -> RedisServer:
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen(
            self.command(),
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
        self.assert_is_ours()
        self.client().flushall()

    def assert_is_ours(self) -> None:
        """Before anything destructive: the server answering on our port is the process
        we started (``INFO server`` process_id), never someone else's Redis."""
        assert self.proc is not None, "not started"
        assert self.proc.poll() is None, "not running"
        answering = int(self.client().info("server")["process_id"])
        assert answering == self.proc.pid, (
            f"port {self.port} is answered by process {answering}, not ours ({self.proc.pid})"
        )

    def kill(self) -> None:
        """SIGKILL the server, as a machine that dies: no shutdown, nothing saved."""
        self.assert_is_ours()
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class SentinelServer(RedisServer):
    """``redis-server --sentinel`` watching ``primary`` as ``master_name``, tuned for a
    test: quorum 1, a master is down after one second, a failover is quick. Its
    configuration file is its own (a sentinel rewrites it as it learns)."""

    def __init__(self, primary: RedisServer, master_name: str) -> None:
        super().__init__()
        self.primary_port = primary.port
        self.master_name = master_name

    def command(self) -> list[str]:
        conf = self.dir / "sentinel.conf"
        name = self.master_name
        conf.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.dir}\n"
            f"logfile {self.dir / 'redis.log'}\n"
            f"sentinel monitor {name} 127.0.0.1 {self.primary_port} 1\n"
            f"sentinel down-after-milliseconds {name} 1000\n"
            # Two sentinels that both ask for votes at once split them and try again
            # after twice this: keep it short.
            f"sentinel failover-timeout {name} 2000\n"
            f"sentinel parallel-syncs {name} 1\n"
        )
        return [self.binary, str(conf), "--sentinel"]

    def master_port(self) -> int:
        # (redis-py's annotations of the SENTINEL commands are looser than their replies)
        address = self.client().sentinel_get_master_addr_by_name(self.master_name)
        return int(cast(tuple[str, int], address)[1])


class SentinelGroup:
    """A primary, its replica and two sentinels, all on free ports of 127.0.0.1: what a
    production Redis under Sentinel looks like, small. ``url`` is the broker URL that
    names both sentinels, as kombu takes it."""

    def __init__(self, master_name: str = "orders-test") -> None:
        self.master_name = master_name
        self.primary = RedisServer()
        self.replica = RedisServer(args=("--replicaof", "127.0.0.1", str(self.primary.port)))
        self.sentinels = [SentinelServer(self.primary, master_name) for _ in range(2)]

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{s.port}/0" for s in self.sentinels)

    def servers(self) -> list[RedisServer]:
        return [self.primary, self.replica, *self.sentinels]

    def start(self, timeout: float = 30) -> SentinelGroup:
        for server in self.servers():
            server.start()
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise RuntimeError("the sentinels did not see the replica and each other")
            time.sleep(0.1)
        return self

    def ready(self) -> bool:
        """The replica is in sync and every sentinel knows it and the other sentinel, so
        that a failover can happen."""
        if self.replica.client().info("replication").get("master_link_status") != "up":
            return False
        for sentinel in self.sentinels:
            client = sentinel.client()
            replicas = client.sentinel_slaves(self.master_name)
            if not any(r["port"] == self.replica.port and r["is_slave"] for r in replicas):
                return False
            master = cast(dict[str, Any], client.sentinel_master(self.master_name))
            if master["num-other-sentinels"] < 1:
                return False
        return True

    def master_port(self) -> int:
        """The master's port as the sentinels report it."""
        return self.sentinels[0].master_port()

    def promoted(self) -> bool:
        """Has the replica taken over: the sentinels name it, and it says it is master?"""
        try:
            role = self.replica.client().info("replication")["role"]
            return role == "master" and all(
                s.master_port() == self.replica.port for s in self.sentinels
            )
        except (redis.RedisError, OSError):
            return False

    def close(self) -> None:
        for server in reversed(self.servers()):
            server.close()

    def __enter__(self) -> SentinelGroup:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

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
    from orders import scheduling

    kombu.pools.reset()
    app._pool = None
    app.amqp._producer_pool = None
    scheduling._redis.cache_clear()  # the batched timers' client, on the broker of before


@contextmanager
def publishing_to(url: str, prefix: str | None = None, **options: Any) -> Iterator[None]:
    """Make this process publish its tasks to ``url`` (keys prefixed ``prefix``, if given;
    more transport ``options``, such as a Sentinel ``master_name``) inside the block; the
    broker from settings again afterwards."""
    from config.celery import app

    saved = {
        "broker_url": app.conf.broker_url,
        "broker_transport_options": dict(app.conf.broker_transport_options or {}),
    }
    options = dict(saved["broker_transport_options"]) | options
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
