"""The run command, as a new user runs it: ``manage.py up`` (what ``.ci/up`` calls after
installing) starts web, worker and beat, on a fresh database of the kind the run tests
on (SQLite, PostgreSQL or MariaDB); the printed login works and a short order
placed through the printed API token is cancelled by the worker it started. A worker
killed under it is started again (config/supervise.py), without stopping web and beat,
and the new worker cancels the next order."""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from tests.conftest import BASE_DIR, database_url

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(
    url: str,
    *,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    opener: urllib.request.OpenerDirector | None = None,
) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with (opener or urllib.request.build_opener()).open(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def up_database_url(tmp_path: Path, django_db_setup: Any, django_db_blocker: Any) -> Iterator[str]:
    """An empty database for ``up`` of its own, of the kind this run tests on: a fresh
    one on the same server (PostgreSQL, MariaDB), dropped after; else a SQLite file."""
    if connection.vendor == "sqlite":
        yield f"sqlite:///{tmp_path / 'up.sqlite3'}"
        return
    name = f"orders_up_{uuid.uuid4().hex[:8]}"
    force = " WITH (FORCE)" if connection.vendor == "postgresql" else ""
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield database_url().rsplit("/", 1)[0] + f"/{name}"
    finally:
        with django_db_blocker.unblock(), connection.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name}{force}")


def test_up_runs_web_worker_and_beat_its_login_and_token_work_and_a_killed_worker_comes_back(
    up_database_url: str,
    tmp_path: Path,
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERS_")} | {
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": up_database_url,
        "CELERY_KEY_PREFIX": f"orders-up-{uuid.uuid4().hex[:8]}:",
        "PYTHONUNBUFFERED": "1",
    }
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "up", "--port", str(port)],
            cwd=BASE_DIR,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        output = wait_for_output(
            log_path,
            proc,
            r"webhooks +payment secret whsec_\S+\n +logistics secret whsec_\S+\n",
            timeout=90,
        )
        login = re.search(r"login (\S+) / (\S+)", output)
        token = re.search(r"Bearer (\S+)", output)
        assert login, output
        assert token, output
        wait_for_output(log_path, proc, r"celery@\S+ ready", timeout=60)
        wait_for_output(log_path, proc, r"beat: Starting", timeout=60)
        wait_until(lambda: request(f"{base}/admin/login/")[0] == 200, 60, "the web server")

        assert admin_login(base, *login.groups()), "the printed login must open the admin"

        auth = {"Authorization": f"Bearer {token.group(1)}", "Content-Type": "application/json"}

        def an_order_expires(by: str) -> None:
            status, body = request(
                f"{base}/api/orders/",
                headers=auth,
                data=json.dumps({"amount": "9.99", "timeout_seconds": 2}).encode(),
            )
            assert status == 201, body
            order_url = f"{base}/api/orders/{json.loads(body)['id']}/"
            wait_until(
                lambda: json.loads(request(order_url, headers=auth)[1])["status"] == "cancelled",
                30,
                f"{by} to expire the order",
            )

        an_order_expires("the worker started by `up`")

        [worker] = re.findall(r"worker started \(pid=(\d+)\)", log_path.read_text())
        os.killpg(int(worker), signal.SIGKILL)  # the worker and its pool, as a crash would
        wait_for_output(log_path, proc, r"(?s)worker started .*worker started ", timeout=30)
        wait_for_output(log_path, proc, r"(?s)celery@\S+ ready.*celery@\S+ ready", timeout=60)
        an_order_expires("the restarted worker")
        output = log_path.read_text()
        assert len(re.findall(r"(web|beat) started", output)) == 2, "web and beat kept running"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def admin_login(base: str, username: str, password: str) -> bool:
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    request(f"{base}/admin/login/", opener=opener)
    csrf = next(c.value for c in jar if c.name == "csrftoken")
    form = urllib.parse.urlencode(
        {
            "username": username,
            "password": password,
            "csrfmiddlewaretoken": csrf,
            "next": "/admin/",
        }
    ).encode()
    request(
        f"{base}/admin/login/",
        data=form,
        opener=opener,
        headers={"Referer": f"{base}/admin/login/"},
    )
    status, page = request(f"{base}/admin/orders/order/", opener=opener)
    return status == 200 and b"Select order to change" in page


def wait_for_output(path: Path, proc: subprocess.Popen[Any], pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace")
        if re.search(pattern, text):
            return text
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"`manage.py up` never printed {pattern!r}:\n{text[-3000:]}")
        time.sleep(0.2)


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (OSError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)
