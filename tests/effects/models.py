from django.db import models
from django.utils import timezone


class Effect(models.Model):
    """One call of a test receiver that committed: no unique constraint, so that a second
    effect of one delivery would show."""

    event_id = models.UUIDField(db_index=True)
    event_type = models.CharField(max_length=64)
    receiver = models.CharField(max_length=32)
    order_id = models.UUIDField()
    at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.receiver}: {self.event_type} {self.event_id}"
