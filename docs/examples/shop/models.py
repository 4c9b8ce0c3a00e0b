"""The shop's catalogue and its own order: the app's lifecycle plus a customer and lines."""

from django.db import models

from orders.models import AbstractOrder


class Product(models.Model):
    name = models.CharField(max_length=100)
    price = models.DecimalField(max_digits=10, decimal_places=2)
    stock = models.PositiveIntegerField(help_text="Units on hand and not reserved.")

    def __str__(self) -> str:
        return self.name


class Order(AbstractOrder):
    customer = models.CharField(max_length=64)


class OrderLine(models.Model):
    order = models.ForeignKey(Order, on_delete=models.CASCADE, related_name="lines")
    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="+")
    quantity = models.PositiveIntegerField()

    def __str__(self) -> str:
        return f"{self.quantity} x {self.product}"
