"""Log formatters whose every record is one line, whatever a request put in it: JSON with
the structured fields that the app's log calls pass as ``extra`` (``event``, ``order_id``,
``lateness_s``, ...), or plain text with line breaks escaped.

Turn them on in the host project's ``LOGGING``::

    "formatters": {
        "json": {"()": "orders.logging.JsonFormatter"},
        "plain": {"()": "orders.logging.PlainFormatter", "fmt": "%(asctime)s %(message)s"},
    }
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

# A path, a reason or a JSON key can carry CR, LF or other control characters; written
# as they are, they would start a forged line in a plain log. C1 controls (NEL) and the
# Unicode line and paragraph separators break lines in some readers too.
_LINE_BREAKERS = (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
_CONTROL_ESCAPES = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _LINE_BREAKERS} | {
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}


def one_line(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\r``, ``\\x00``), as one line."""
    return text.translate(_CONTROL_ESCAPES)


class PlainFormatter(logging.Formatter):
    """The standard formatter, except that the record's line cannot be split: control
    characters in the message and its fields are escaped. A traceback, appended after
    the line, keeps its own line breaks."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return one_line(super().formatMessage(record))


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
    order: Any = None,
    by: Any = None,
    **fields: Any,
) -> None:
    """Log one fact once: ``message`` is a ``str.format`` template over ``fields``, and the
    same fields (with ``event``) go to the record's ``extra`` for ``JsonFormatter``.
    ``order`` and ``by`` are the fields ``order_id`` and ``actor``::

        log_event(logger, "order.placed", "Order {order_id} placed.", order=order)
    """
    if order is not None:
        fields["order_id"] = str(order.pk)
    if by is not None:
        fields["actor"] = str(by)
    logger.log(level, message.format(**fields), extra={"event": event, **fields}, exc_info=exc_info)
