"""The app as another project gets it: a wheel, installed into a fresh environment, added
to a new ``django-admin startproject`` by following README's "Use it in your project"
word by word, placing an order that a worker of that project expires on time.

The wheel is built from a copy of the sources (so that no build/ or egg-info lands in
the checkout) without build isolation (no download). The new environment is a venv
that sees the project venv's packages (Django, Celery, ...) through a ``.pth`` line;
``--system-site-packages`` would not do, since a venv made from a venv inherits the base
interpreter's site-packages, not the venv's. Plain path lines in a ``.pth`` file are
not themselves scanned for ``.pth`` files, so the project venv's editable install of
``orders`` (a finder installed by a ``.pth``) is not active there: ``orders`` can come
only from the wheel, which the test checks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from tests.conftest import BASE_DIR

pytestmark = pytest.mark.integration


#: Run in the new project: place an order, and report where ``orders`` came from and
#: what became of the order once the new project's worker had its timer fire.
PLACE_ORDER = """
import json, os, sys, time
import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")
django.setup()

import orders
from django.db.migrations.recorder import MigrationRecorder
from django.test import Client
from orders import get_order_model, services

Order = get_order_model()
fields = json.loads(os.environ.get("ORDER_FIELDS", "{}"))  # a swapped model's own
order = services.place_order(amount="12.50", timeout=2, **fields)
deadline = time.monotonic() + 20
while Order.objects.get(pk=order.pk).status == "created" and time.monotonic() < deadline:
    time.sleep(0.1)
order.refresh_from_db()
client = Client(HTTP_HOST="localhost")
# An operator (staff allowed to view orders) reads /metrics and the health check's details.
from django.contrib.auth.models import Permission, User
operator = User.objects.create_user("operator", is_staff=True)
operator.user_permissions.add(Permission.objects.get(codename="view_order"))
client.force_login(operator)
metrics = client.get("/metrics")
health = client.get("/health/")
print(json.dumps({
    "orders_file": orders.__file__,
    "sys_path": sys.path,
    "model": Order._meta.label,
    "migrations": [f"{app}.{name}" for app, name in MigrationRecorder.Migration.objects
                   .order_by("id").values_list("app", "name")],
    "fields": {name: getattr(order, name) for name in fields},
    "status": order.status,
    "history": list(order.history.values_list("transition", "actor")),
    "lateness": (order.cancelled_at - order.expires_at).total_seconds()
    if order.cancelled_at else None,
    "metrics_status": metrics.status_code,
    "metrics": metrics.content.decode(),
    "health_status": health.status_code,
    "health": health.json(),
}))
"""


def readme_section(heading: str = "## Use it in your project") -> str:
    """A section of README.md, up to the next heading of its level or above, without
    its subsections: the project that does not swap the model follows "Use it in your
    project", one with its own order model the "Your own order model" section too."""
    readme = (BASE_DIR / "README.md").read_text()
    level = heading.split(" ", 1)[0]
    # "## " and "### " only: "# " also starts the first line of the Python blocks.
    end = "|".join("#" * n + " " for n in range(2, max(len(level), 2) + 2))
    match = re.search(rf"^{re.escape(heading)}\n.*?(?=^(?:{end})|\Z)", readme, re.M | re.S)
    assert match, f"README.md has no {heading!r} section"
    return match.group(0)


def python_blocks(section: str) -> dict[str, str]:
    """The section's Python blocks by the file their first line names (``# shop/x.py``)."""
    blocks: dict[str, str] = {}
    for block in re.findall(r"```python\n(.*?)```", section, re.S):
        first, _, rest = block.partition("\n")
        assert first.startswith("# "), f"a Python block must start by naming its file:\n{block}"
        blocks[first.removeprefix("# ").strip()] = rest
    return blocks


def run(args: list[str | Path], *, cwd: Path, env: dict[str, str], timeout: float = 180) -> str:
    result = subprocess.run(
        [str(arg) for arg in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} failed ({result.returncode}):\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


def build_wheel(tmp: Path) -> Path:
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(BASE_DIR / name, source / name)
    shutil.copytree(
        BASE_DIR / "orders",
        source / "orders",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    wheels = tmp / "wheels"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-w",
            wheels,
            source,
        ],
        cwd=tmp,
        env=dict(os.environ),
    )
    (wheel,) = wheels.glob("django_timely_orders-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def fresh_venv(wheel: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A fresh environment with the wheel installed (its python and site-packages): the
    project venv's packages, but not its checkout of orders."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path, env=dict(os.environ))
    python = venv / "bin" / "python"
    site_packages = Path(
        run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            cwd=tmp_path,
            env=dict(os.environ),
        ).strip()
    )
    (site_packages / "project-venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "--no-deps",
            "--disable-pip-version-check",
            wheel,
        ],
        cwd=tmp_path,
        env=dict(os.environ),
    )
    return python, site_packages


#: A shop's calls of the public API, one of them wrong: mypy must see it through the
#: wheel's py.typed.
SHOP_CALLS = """
from orders import get_order_model
from orders.models import AbstractOrder
from orders.services import place_order, ship_order

order: AbstractOrder = place_order(amount="12.50", reference="shop-1", metadata={"a": 1})
ship_order(order_id=order.pk, tracking_number="SF123")
model: type[AbstractOrder] = get_order_model()
place_order(amount="12.50", timeout="ten minutes")
"""


def test_mypy_checks_a_shops_calls_through_the_wheels_type_hints(
    wheel: Path, tmp_path: Path
) -> None:
    python, _ = fresh_venv(wheel, tmp_path)
    (tmp_path / "calls.py").write_text(SHOP_CALLS)

    result = subprocess.run(
        [python, "-m", "mypy", "--no-incremental", "calls.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )

    lines = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert len(lines) == 1, result.stdout + result.stderr
    assert lines[0].startswith('calls.py:9: error: Argument "timeout" to "place_order"')


def test_wheel_contains_every_file_of_the_app(wheel: Path) -> None:
    """Migrations, templates, static files and commands: everything under orders/."""
    expected = {
        path.relative_to(BASE_DIR).as_posix()
        for path in (BASE_DIR / "orders").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert {"orders/migrations/0001_initial.py", "orders/py.typed"} <= expected
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert expected - names == set(), "files of orders/ missing from the wheel"
    assert not {n for n in names if n.startswith(("config/", "tests/"))}


def follow_readme(
    wheel: Path, tmp_path: Path, blocks: list[dict[str, str]], *, own_model: bool
) -> tuple[dict[str, Any], str, Path]:
    """startproject, README's Python blocks added to their files (``blocks`` in order),
    migrate, a worker, and PLACE_ORDER. Returns (its report, the worker's log, the new
    environment's site-packages)."""
    python, site_packages = fresh_venv(wheel, tmp_path)
    prefix = f"orders-install-test-{uuid.uuid4().hex[:10]}:"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DJANGO_SETTINGS_MODULE", "PYTHONPATH", "DATABASE_URL")
        and not key.startswith(("CELERY_", "ORDERS_"))
    } | {
        "PATH": f"{python.parent}{os.pathsep}{os.environ['PATH']}",
        "REDIS_URL": settings.CELERY_BROKER_URL,
        "ORDERS_API_TOKEN": "install-test-token",
        "ORDERS_PAYMENT_WEBHOOK_SECRET": "whsec_aW5zdGFsbC10ZXN0LXBheW1lbnQtc2VjcmV0LXgK",
        "ORDERS_LOGISTICS_WEBHOOK_SECRET": "whsec_aW5zdGFsbC10ZXN0LWxvZ2lzdGljcy1zZWNyZXQK",
        "PYTHONUNBUFFERED": "1",
    }

    run([python, "-m", "django", "startproject", "shop"], cwd=tmp_path, env=env)
    project = tmp_path / "shop"
    for group in blocks:
        for name, code in group.items():
            with open(project / name, "a") as f:
                f.write("\n" + code)
    with open(project / "shop" / "settings.py", "a") as f:
        f.write(
            "\n# Test only: this run's own keys on the shared test Redis.\n"
            f'CELERY_BROKER_TRANSPORT_OPTIONS["global_keyprefix"] = {prefix!r}\n'
        )

    if own_model:
        run([python, "manage.py", "makemigrations", "shop"], cwd=project, env=env)
        env["ORDER_FIELDS"] = json.dumps({"customer": "c-7"})
    run([python, "manage.py", "migrate"], cwd=project, env=env)
    checked = run([python, "manage.py", "check"], cwd=project, env=env)
    assert "System check identified no issues" in checked

    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [
                python,
                "-m",
                "celery",
                "-A",
                "shop",
                "worker",
                "-l",
                "info",
                "--concurrency",
                "1",
                "--without-mingle",
                "--without-gossip",
            ],
            cwd=project,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            while b" ready." not in log_path.read_bytes():
                assert worker.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
            (project / "place_order.py").write_text(PLACE_ORDER)
            report = json.loads(run([python, "place_order.py"], cwd=project, env=env))
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(30)
    return report, log_path.read_text(), site_packages


def test_a_new_project_following_the_readme_places_orders_that_expire(
    wheel: Path, tmp_path: Path
) -> None:
    # README, word by word: startproject, then each Python block added to its file.
    blocks = python_blocks(readme_section())
    assert set(blocks) == {"shop/settings.py", "shop/celery.py", "shop/__init__.py", "shop/urls.py"}
    report, log, site_packages = follow_readme(wheel, tmp_path, [blocks], own_model=False)

    assert report["model"] == "orders.Order"
    assert Path(report["orders_file"]).is_relative_to(site_packages), report["orders_file"]
    assert str(BASE_DIR) not in report["sys_path"]
    assert ". orders.expire_order" in log, "autodiscover found the tasks"
    assert report["status"] == "cancelled", log
    assert report["history"] == [["place", "shop"], ["expire", "expiry timer"]]
    assert 0 <= report["lateness"] < 1.0
    assert report["metrics_status"] == 200
    assert 'orders_expiries_total{actor="timer"} 1.0' in report["metrics"]
    # No beat in this test, so the health check says so; the rest is up, and the worker
    # writes its heartbeat in a project that only installed the app.
    assert report["health_status"] == 503
    assert {name: check["ok"] for name, check in report["health"]["checks"].items()} == {
        "database": True,
        "redis": True,
        "workers": True,
        "beat": False,
    }


def test_a_new_project_with_its_own_order_model_following_the_readme(
    wheel: Path, tmp_path: Path
) -> None:
    """The same project, and README's "Your own order model" on top: ``shop.Order``
    with a customer, created by the shop's first migration before any of the app's;
    ``place_order(customer=...)`` stores it, and the project's worker expires it."""
    blocks = python_blocks(readme_section())
    own = python_blocks(readme_section("## Your own order model"))
    assert set(own) == {"shop/models.py", "shop/settings.py"}
    report, log, _ = follow_readme(wheel, tmp_path, [blocks, own], own_model=True)

    assert (tmp_path / "shop" / "shop" / "migrations" / "0001_initial.py").exists()
    assert report["model"] == "shop.Order"
    assert report["fields"] == {"customer": "c-7"}
    assert report["status"] == "cancelled", log
    assert report["history"] == [["place", "shop"], ["expire", "expiry timer"]]
    assert 0 <= report["lateness"] < 1.0
    assert report["migrations"].index("shop.0001_initial") < report["migrations"].index(
        "orders.0001_initial"
    )
    assert 'orders_expiries_total{actor="timer"} 1.0' in report["metrics"]
