"""Signals for the host project, each sent once per transition, after its transaction commits.

Every signal is sent with ``sender=`` the order model (``orders.get_order_model()``) and
``order=`` the order.
"""

from django.dispatch import Signal

order_placed = Signal()
order_paid = Signal()
order_delivered = Signal()
order_expired = Signal()
order_cancelled = Signal()
order_refunded = Signal()
#: A payment that did not pay its order (late, surplus, mismatched) was refunded.
#: Sent with ``payment=<Payment>`` as well.
payment_refunded = Signal()
