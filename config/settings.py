"""Settings of the host project, read from the environment (django-environ) with defaults
that work on a fresh machine: SQLite under var/, and an embedded Redis when REDIS_URL is
not set. See README.md, "Configuration".

Importing this module only reads values: it starts no server and creates no file. The
processes that need the embedded Redis start it (``config.embedded_redis.start_if_used``).
"""

from __future__ import annotations

from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from config import embedded_redis

BASE_DIR = Path(__file__).resolve().parent.parent
# var/, or the folder VAR_DIR names (config/embedded_redis.py); made by the processes that
# write there (`up`, tests, bench).
VAR_DIR = embedded_redis.VAR_DIR

env = environ.Env()

DEBUG = env.bool("DEBUG", default=False)
SECRET_KEY = env("SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. With DEBUG off the host project needs its own key in the "
            "environment, e.g. the output of "
            "python -c 'import secrets; print(secrets.token_urlsafe(50))'. "
            "For local development set DEBUG=1, or run .ci/up, which keeps one in var/secret_key."
        )
    # Only ever with DEBUG on; the prefix makes `check --deploy` flag it (security.W009).
    SECRET_KEY = "django-insecure-local-development-key-set-SECRET_KEY"
# Keys still accepted for signatures made before a rotation (docs/SECURITY.md).
SECRET_KEY_FALLBACKS = env.list("SECRET_KEY_FALLBACKS", default=[])
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])

# HTTPS in production (README.md, "Production settings"). Off by default, as in Django,
# so that the local HTTP set-up works; `manage.py check --deploy` names each one unset.
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=False)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=False)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=False)
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
# Behind a proxy that terminates TLS, the header it sets to "https" (e.g.
# X-Forwarded-Proto). Opt-in: trusted from a client that reaches Django directly, it
# would let anyone claim HTTPS.
_proxy_ssl_header = env("SECURE_PROXY_SSL_HEADER", default="")
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_" + _proxy_ssl_header.upper().replace("-", "_"), "https") if _proxy_ssl_header else None
)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_fsm",
    "config",
    "orders",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["OPTIONS"] = {
        # IMMEDIATE takes the write lock at BEGIN: SQLite's stand-in for SELECT ... FOR
        # UPDATE, so that the timer and a payment serialise instead of deadlocking.
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # A file, not :memory:, so that the worker processes of the tests share it.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test.sqlite3")}
elif DATABASES["default"]["ENGINE"] == "django.db.backends.mysql":
    # MySQL or MariaDB through PyMySQL, standing in for mysqlclient (no C headers).
    import pymysql  # type: ignore[import-untyped]

    pymysql.install_as_MySQLdb()
    DATABASES["default"]["OPTIONS"] = {
        "charset": "utf8mb4",
        # Django's default, said out loud: a locking read sees the latest row either way,
        # and READ COMMITTED takes no gap locks, which deadlock a burst of expiries.
        "isolation_level": "read committed",
    }
    DATABASES["default"]["TEST"] = {"CHARSET": "utf8mb4", "COLLATION": "utf8mb4_unicode_ci"}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# The app. Every key is optional; see orders/conf.py for the defaults.
ORDERS = {
    "DEFAULT_TIMEOUT": env.int("ORDERS_DEFAULT_TIMEOUT", default=30 * 60),
    "SWEEP_INTERVAL": env.int("ORDERS_SWEEP_INTERVAL", default=30),
    "SWEEP_GRACE": env.int("ORDERS_SWEEP_GRACE", default=5),
    "TIMER_HORIZON": env.int("ORDERS_TIMER_HORIZON", default=50 * 60),
    "TIMER_MODE": env("ORDERS_TIMER_MODE", default="batched"),
    "TIMER_RESOLUTION": env.float("ORDERS_TIMER_RESOLUTION", default=0.1),
    "API_TOKEN": env("ORDERS_API_TOKEN", default=""),
    # Standard Webhooks secrets ("whsec_" + base64), one per provider.
    "PAYMENT_WEBHOOK_SECRET": env("ORDERS_PAYMENT_WEBHOOK_SECRET", default=""),
    "LOGISTICS_WEBHOOK_SECRET": env("ORDERS_LOGISTICS_WEBHOOK_SECRET", default=""),
    "METRICS_TOKEN": env("ORDERS_METRICS_TOKEN", default=""),
}

# Celery, on Redis. An unset REDIS_URL means the embedded server, whose address is known
# without starting it; the processes that use it start it.
REDIS_IS_EMBEDDED = not env("REDIS_URL", default="")
REDIS_URL = embedded_redis.broker_url() if REDIS_IS_EMBEDDED else env("REDIS_URL")
CELERY_BROKER_URL = REDIS_URL
CELERY_BROKER_TRANSPORT_OPTIONS = {
    # A message not acknowledged within this is redelivered; ORDERS["TIMER_HORIZON"]
    # stays below it (system check orders.E004).
    "visibility_timeout": env.int("CELERY_VISIBILITY_TIMEOUT", default=3600),
    "socket_connect_timeout": 2,
    "socket_timeout": 5,
    "global_keyprefix": env("CELERY_KEY_PREFIX", default=""),
}
# Under Sentinel, REDIS_URL is sentinel://host1:26379;sentinel://host2:26379 and this
# names the master the sentinels monitor (kombu and orders/broker.py both need it).
if env("REDIS_SENTINEL_MASTER", default=""):
    CELERY_BROKER_TRANSPORT_OPTIONS["master_name"] = env("REDIS_SENTINEL_MASTER")
if env("REDIS_SENTINEL_PASSWORD", default=""):  # the sentinels' own, if they have one
    CELERY_BROKER_TRANSPORT_OPTIONS["sentinel_kwargs"] = {
        "password": env("REDIS_SENTINEL_PASSWORD")
    }
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Publishing gives up quickly when Redis is down: the order is saved regardless and the
# sweep arms its timer later, so a customer never waits on a dead broker.
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2}
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_ENABLE_SOFT_SHUTDOWN_ON_IDLE = True
CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT = 10
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Celery's Django fixup otherwise closes the database connection around every task: a
# new connection for every timer that fires (bench/: 13.8 ms an expiry instead of 2 ms).
# It still closes connections that are unusable or past CONN_MAX_AGE.
CELERY_DB_REUSE_MAX = 1000
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULE = {
    "orders-sweep": {"task": "orders.sweep", "schedule": float(ORDERS["SWEEP_INTERVAL"])},
    "orders-poll-parcels": {"task": "orders.poll_parcels", "schedule": 60.0},
    # Webhook retries are due at times kept in the database: this picks them up.
    "orders-send-due-webhooks": {"task": "orders.send_due_webhooks", "schedule": 10.0},
}
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULER = "config.celery:BeatScheduler"  # makes the file's folder

# LOG_FORMAT=json writes one JSON object per line, with the structured fields of the
# app's log calls (event, order_id, lateness_s, ...), for a log shipper to index.
LOG_FORMAT = env("LOG_FORMAT", default="plain")
if LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be 'plain' or 'json', got {LOG_FORMAT!r}.")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        # One line per record even when a request put a line break in the message.
        "plain": {
            "()": "orders.logging.PlainFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
        },
        "json": {"()": "orders.logging.JsonFormatter"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "orders": {"level": env("ORDERS_LOG_LEVEL", default="INFO")},
    },
}
