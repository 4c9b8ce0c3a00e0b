"""A bench-only app with one receiver of ``order_expired`` that does one small write, as
a shop's "release the stock" would. Installed only in the workers that
``bench/settings_receiver.py`` configures, never in the harness's own process, whose
expiries must stay unheard (it connects the receiver only for a moment, to count the
SQL of a delivery). No migrations: the harness creates the one table in its own
database (``bench.events``).

The names below are what the harness counts by, without importing the model."""

#: The receiver's name in the app's registry, and so in its delivery records.
RECEIVER = "bench.release_stock"
#: The receiver's table: one row per event it took.
TABLE = "bench_receiver_stockreleased"
