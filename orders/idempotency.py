"""Requests that are safe to repeat: the first answer to a key is stored in the transaction
of the effect that produced it, and a repeat of the key gets that answer back.

Used by the webhooks (the key is the sender's ``webhook-id``) and by placing an order
(the client's ``Idempotency-Key``). Claiming the key comes first: a twin request with
the same key waits on the unique index until the first one commits (then replays its
answer) or rolls back (then acts itself), so that two deliveries never both act.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from orders.models import IdempotencyRecord
from orders.services import InvalidInput, InvalidTransition

#: Longer keys are refused; the column is this wide.
MAX_KEY_LENGTH = 255
#: A key is visible ASCII, as a header value arrives intact (no spaces to strip, no
#: encoding to guess); the OpenAPI description says the same with this pattern.
KEY_PATTERN = f"[!-~]{{1,{MAX_KEY_LENGTH}}}"
_KEY = re.compile(KEY_PATTERN)


class KeyReused(InvalidTransition):
    """The key was first used with another request body: a conflict (409), not a retry."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]
    #: True when this is the stored answer to an earlier request with the same key.
    replayed: bool = False


def answer_once(
    *,
    scope: str,
    key: str,
    key_name: str,
    request_body: bytes,
    keep_for: timedelta,
    act: Callable[[], Answer],
    now: datetime | None = None,
) -> Answer:
    """Run ``act`` once per ``(scope, key)`` and keep its answer for at least ``keep_for``.
    A repeat with the same body gets the first answer back and changes nothing; with
    another body it is refused (``KeyReused``). An exception from ``act`` rolls back its
    effect and the claim together, so that the request may be sent again."""
    if not _KEY.fullmatch(key):
        raise InvalidInput(
            f"The {key_name} header must be 1 to {MAX_KEY_LENGTH} visible ASCII characters."
        )
    request_hash = hashlib.sha256(request_body).hexdigest()
    now = now or timezone.now()
    with transaction.atomic():
        try:
            with transaction.atomic():
                # Only the status says "no answer yet": nobody else can see this row
                # before it holds the real answer, since both commit together.
                record = IdempotencyRecord.objects.create(
                    scope=scope,
                    key=key,
                    request_hash=request_hash,
                    status=0,
                    body={},
                    created_at=now,
                    expires_at=now + keep_for,
                )
        except IntegrityError:
            # The twin committed first (we waited for it on the unique index).
            first = IdempotencyRecord.objects.get(scope=scope, key=key)
            if first.request_hash != request_hash:
                raise KeyReused(
                    f"The {key_name} {key!r} was already used for a request with another "
                    "body; use a new key for a new request."
                ) from None
            return Answer(first.status, first.body, replayed=True)
        answer = act()
        record.status, record.body = answer.status, answer.body
        record.save(update_fields=["status", "body"])
    return answer
