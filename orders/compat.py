"""A guarded fix for a kombu/celery bug that kills workers, applied in each Celery worker.

celery 5.7.0 (PR #10242) closes the consumer's connection a second time after a
connection error. kombu's Redis ``Channel.close()`` first reads the reply of a pending
BRPOP (kombu PR #1733); when the connection is gone that read raises, and the close
stops half-way. ``Connection.collect()`` then drops the transport, and the second close
reaches ``restore_unacked()`` with no broker URL: ``AttributeError: 'NoneType' object has
no attribute 'hostname'``, "Unrecoverable error", and the worker exits. It happens to any
worker that holds unacknowledged messages (every worker with pending countdown timers)
when Redis restarts or fails over.

The fix finishes that close when the drain fails, as kombu would if its ``close()``
caught the connection error around the drain (the fix proposed upstream, see
docs/RELIABILITY.md). It touches only what it checks first, applies once, and only where
celery is 5.7 or newer. Remove it (this module and its call in ``orders/apps.py``) once a
kombu or celery release that fixes the bug is the lowest one the app supports.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import celery

logger = logging.getLogger(__name__)

#: Set on the replacement ``close`` so that the fix is applied only once.
_MARK = "orders_finishes_close_after_failed_drain"

#: What the fix relies on in kombu's Redis ``Channel`` class. It also reads two attributes
#: that ``__init__`` sets, ``connection_errors`` and ``closed``, with defaults that make it
#: do nothing should they go.
_REQUIRED = ("close", "_brpop_read", "_in_poll")


def finish_redis_channel_close_after_failed_drain(channel_class: type | None = None) -> bool:
    """Make kombu's Redis ``Channel.close()`` complete when its BRPOP drain raises a
    connection error. Returns whether the fix is in place (False: not needed here, or the
    internals are not what it expects, which it logs)."""
    if celery.VERSION[:2] < (5, 7):
        return False  # no second close before celery 5.7: a half-closed channel is harmless
    if channel_class is None:
        from kombu.transport.redis import Channel

        channel_class = Channel
    missing = [name for name in _REQUIRED if not hasattr(channel_class, name)]
    if missing or not callable(channel_class.close):  # type: ignore[attr-defined]
        logger.warning(
            "orders.compat: kombu's Redis Channel lacks %s, so the fix for workers dying "
            "when Redis restarts (docs/RELIABILITY.md) is not applied. Check whether this "
            "kombu release still has the bug, and update or remove orders/compat.py.",
            ", ".join(missing) or "a callable close()",
        )
        return False
    original = channel_class.close  # type: ignore[attr-defined]
    if getattr(original, _MARK, False):
        return True

    @functools.wraps(original)
    def close(self: Any) -> None:
        draining = bool(self._in_poll)
        try:
            original(self)
        except getattr(self, "connection_errors", ()):
            if not draining or getattr(self, "closed", True):
                raise
            # The drain failed and _brpop_read() has cleared _in_poll: closing again skips
            # the drain and does the rest (consumers cancelled, unacknowledged messages
            # given back if Redis answers, clients closed) while the transport still exists.
            logger.info("Broker connection lost while closing a channel; finishing the close.")
            original(self)

    setattr(close, _MARK, True)
    channel_class.close = close  # type: ignore[attr-defined]
    logger.info(
        "orders.compat: kombu's Redis channel close is completed when its drain fails "
        "(celery %s, see docs/RELIABILITY.md).",
        celery.__version__,
    )
    return True
