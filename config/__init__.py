"""The host project: settings, URLs and the Celery app that runs the orders app."""

from config.celery import app as celery_app

__all__ = ["celery_app"]
