"""An example shop that brings its own order model: a customer and lines of products
whose stock is reserved at checkout, released when the order expires or is cancelled,
and kept when it is paid. Its tests are tests/test_example_shop.py; the suite's
lifecycle, timer and API tests also run on it (ORDERS_ORDER_MODEL=shop.Order)."""
