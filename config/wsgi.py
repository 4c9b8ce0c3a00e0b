"""The web entry point: gunicorn (config/gunicorn.conf.py) and runserver load it."""

import os

from django.core.wsgi import get_wsgi_application

from config import embedded_redis

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
application = get_wsgi_application()
# The web process publishes timers: it needs the broker (settings only name it).
embedded_redis.start_if_used()
