"""The host project's settings as they were before the bench: Celery's Django fixup
closing the worker's database connection before and after every task (no
``CELERY_DB_REUSE_MAX``), so that each expiry timer opens a new connection. Used only by
the labelled experiment 3b, to show what keeping the connection changed."""

from config.settings import *  # noqa: F403

CELERY_DB_REUSE_MAX = 0  # falsy: the fixup closes the connection around every task
