"""orders/compat.py: the fix for kombu's half-finished Redis channel close is applied only
where it fits. That it keeps a real worker alive through a Redis restart is proven in
tests/test_reliability.py (``test_worker_holding_timers_survives_a_redis_restart...``)."""

from __future__ import annotations

import logging

import celery
import pytest

from orders import compat
from orders.compat import finish_redis_channel_close_after_failed_drain as fix


@pytest.fixture(autouse=True)
def affected_celery(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fix's logic is tested whatever celery is installed."""
    monkeypatch.setattr(celery, "VERSION", (5, 7, 0, "", ""))


def test_the_installed_kombu_still_has_what_the_fix_relies_on() -> None:
    """Fails on a kombu upgrade that reshapes the channel: then check whether the bug is
    still there (docs/RELIABILITY.md) and update or remove orders/compat.py."""
    from kombu.transport.redis import Channel

    assert all(hasattr(Channel, name) for name in compat._REQUIRED)


class DrainFails:
    """The shape of kombu's Redis Channel that the fix relies on, with a pending BRPOP
    whose reply cannot be read because the connection is gone."""

    _in_poll: object = False

    def __init__(self) -> None:
        self.connection_errors = (ConnectionError,)
        self.closed = False
        self._in_poll = object()

    def _brpop_read(self) -> None:
        self._in_poll = None  # as kombu's does, in a finally
        raise ConnectionError("Connection closed by server.")

    def close(self) -> None:
        if self._in_poll:
            self._brpop_read()
        self.closed = True


def test_a_close_whose_drain_fails_is_finished() -> None:
    unfixed = DrainFails()
    with pytest.raises(ConnectionError):
        unfixed.close()
    assert not unfixed.closed, "without the fix the channel stays half-closed"

    class Fixed(DrainFails):
        pass

    assert fix(Fixed) is True
    channel = Fixed()
    channel.close()
    assert channel.closed


def test_the_fix_is_applied_once() -> None:
    class Channel(DrainFails):
        pass

    assert fix(Channel) is True
    patched = Channel.close
    assert fix(Channel) is True
    assert Channel.close is patched


def test_the_fix_refuses_to_patch_when_the_internals_it_relies_on_are_missing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Reshaped:  # a kombu release whose Channel no longer drains a BRPOP on close
        def close(self) -> None:
            pass

    close = Reshaped.close
    with caplog.at_level(logging.WARNING, logger="orders.compat"):
        assert fix(Reshaped) is False
    assert Reshaped.close is close
    assert "lacks _brpop_read, _in_poll" in caplog.text
    assert "orders/compat.py" in caplog.text


def test_the_fix_is_not_applied_before_celery_5_7(monkeypatch: pytest.MonkeyPatch) -> None:
    class Channel(DrainFails):
        pass

    close = Channel.close
    monkeypatch.setattr(celery, "VERSION", (5, 6, 3, "", ""))
    assert fix(Channel) is False
    assert Channel.close is close
