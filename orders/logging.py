"""A log formatter that writes one JSON object per line, with the structured fields that
the app's log calls pass as ``extra`` (``event``, ``order_id``, ``lateness_s``, ...).

Turn it on in the host project's ``LOGGING``::

    "formatters": {"json": {"()": "orders.logging.JsonFormatter"}}
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has: whatever else a record carries came from ``extra``.
_STANDARD_ATTRIBUTES = frozenset(
    logging.LogRecord("", logging.INFO, "", 0, "", (), None).__dict__
) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """``{"time": ..., "level": ..., "logger": ..., "message": ..., <extra fields>}``.

    The message stays the human-readable one; an exception's traceback goes under
    ``exception``. Values JSON cannot hold (a UUID, a Decimal, a datetime) are written as
    their ``str()``, so that a log call never fails for its fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def log_event(
    logger: logging.Logger,
    event: str,
    message: str,
    *,
    level: int = logging.INFO,
    exc_info: bool = False,
    **fields: Any,
) -> None:
    """Log one fact once: ``message`` is a ``str.format`` template over ``fields``, and the
    same fields (with ``event``) go to the record's ``extra`` for ``JsonFormatter``::

        log_event(logger, "order.placed", "Order {order_id} placed.", order_id=order.pk)
    """
    logger.log(level, message.format(**fields), extra={"event": event, **fields}, exc_info=exc_info)
