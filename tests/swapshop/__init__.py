"""A shop's own order model, as a shop that adopts the app would write it: the suite runs
a second time with ``ORDERS_ORDER_MODEL=swapshop.Order`` (tests/settings.py) to prove
that everything reaches the order through ``get_order_model()``."""
