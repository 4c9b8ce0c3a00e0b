"""The host project's settings plus ``bench.receiver``: one receiver of ``order_expired``
that writes one row. The events scenario's workers run with these (as
``DJANGO_SETTINGS_MODULE``), so that the receiver is connected where the dispatcher
runs; the harness's own process keeps ``config.settings``."""

from config.settings import *  # noqa: F403

INSTALLED_APPS = [*INSTALLED_APPS, "bench.receiver"]  # noqa: F405
