"""The Celery app: configured from Django settings (``CELERY_*``), tasks found in apps."""

import os
from typing import Any

from celery import Celery

from config import redbeat

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("config")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.on_after_configure.connect
def configure_redbeat(sender: Celery, source: Any, **kwargs: Any) -> None:
    # Set on the app itself, not as CELERY_REDBEAT_* settings: redbeat forwards its
    # redis options only when it finds them under their own name.
    if source.beat_scheduler == redbeat.SCHEDULER:
        source.update(
            redbeat.redbeat_settings(
                source.broker_url,
                source.broker_transport_options,
                lock_timeout=source.redbeat_lock_timeout,
            )
        )
