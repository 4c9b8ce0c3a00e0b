"""gunicorn's settings for the host project's web process, the production web server:
``gunicorn -c config/gunicorn.conf.py``. Each figure can be overridden from the
environment (``WEB_CONCURRENCY``, ``GUNICORN_THREADS``, ``GUNICORN_BIND``) or on the
command line; bench/http_load.py measures it against runserver."""

from __future__ import annotations

import os

wsgi_app = "config.wsgi:application"

# Behind a reverse proxy that terminates TLS (SECURE_PROXY_SSL_HEADER): loopback only.
bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")

# A request spends much of its time waiting on PostgreSQL and Redis: a few threads a
# process keep a core busy, without a process (and its memory) per client. The web
# shares the machine with PostgreSQL and the Celery worker, so it gets half the cores:
# on 2 cores, one process of 8 threads placed 1.0-1.1x runserver's orders per second,
# two processes of 4 threads 0.9x (bench/http_load.py, in the same runs). On a machine
# of its own, set WEB_CONCURRENCY to the number of cores.
workers = int(os.environ.get("WEB_CONCURRENCY", max(1, (os.cpu_count() or 1) // 2)))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", 8))

# A request that has not answered in 30 s is stuck (placing an order takes milliseconds,
# and the broker's waits are bounded): its process is restarted. On SIGTERM, requests in
# flight get 30 s to finish.
timeout = 30
graceful_timeout = 30
# The proxy in front keeps connections open; a little longer than nothing saves a TCP
# handshake per request, and is shorter than a proxy's usual idle timeout (60 s).
keepalive = 5
# Recycle processes now and then (jittered, so not all at once) to bound slow leaks.
max_requests = 10_000
max_requests_jitter = 1_000

# One access-log line per request on stdout (journald, a log shipper), with the time
# the request took in microseconds (%(D)s) for a latency view.
accesslog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(B)s %(D)sus "%(a)s"'
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")

# gunicorn 25+ opens a control socket at one fixed path per user (~/.gunicorn/), which
# a second instance on the machine would take over; systemd and signals manage ours.
control_socket_disable = True
