"""The order table as the migrations leave it, on whichever database the suite runs."""

from __future__ import annotations

import pytest
from django.db import connection

from orders import get_order_model

pytestmark = pytest.mark.django_db

Order = get_order_model()


def test_order_indexes_and_constraints_are_named_after_the_order_model() -> None:
    prefix = f"{Order._meta.app_label}_{Order._meta.model_name}"
    with connection.cursor() as cursor:
        names = set(connection.introspection.get_constraints(cursor, Order._meta.db_table))

    assert {f"{prefix}_expiry_idx", f"{prefix}_parcel_idx"} <= names
    assert f"{prefix}_amount_positive" in names
    # The names before the model became swappable (0005) are gone.
    assert not names & {"orders_status_expires_idx", "orders_parcel_check_idx"}
    assert "orders_amount_positive" not in names
