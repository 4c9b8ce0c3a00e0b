"""The shop's order: the app's lifecycle plus the shop's own customer."""

from django.db import models

from orders.models import AbstractOrder


class Order(AbstractOrder):
    customer = models.CharField(max_length=64, help_text="Who placed the order.")
