"""The Celery app: configured from Django settings (``CELERY_*``), tasks found in apps."""

import os
from pathlib import Path
from typing import Any

from celery import Celery
from celery.beat import PersistentScheduler
from celery.signals import beat_init, worker_init

from config import embedded_redis

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("config")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_init.connect
@beat_init.connect
def start_embedded_redis(**kwargs: Any) -> None:
    """The worker and beat start the embedded Redis when they use it: importing the
    settings, as every process of the project does, starts nothing."""
    embedded_redis.start_if_used()


class BeatScheduler(PersistentScheduler):
    """Celery's schedule file, in a folder beat makes itself (var/ by default): the
    settings only name it (CELERY_BEAT_SCHEDULER)."""

    def setup_schedule(self) -> None:
        filename = self.schedule_filename  # type: ignore[attr-defined]  # (not in celery-types)
        Path(filename).parent.mkdir(parents=True, exist_ok=True)
        super().setup_schedule()
