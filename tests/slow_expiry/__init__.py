"""A test-only app that makes each expiry take ``ORDERS_TEST_EXPIRY_DELAY`` seconds inside
its transaction, so that a sweep of a few thousand orders lasts longer than the sweep
interval on any machine (tests/test_beat.py needs two sweeps running at once)."""
