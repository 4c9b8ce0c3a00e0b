# Written by hand: the autodetector sees neither the swappable option nor foreign keys
# that follow a setting (a SettingsReference compares equal to the model it names).
#
# The order model becomes swappable (ORDERS_ORDER_MODEL, default "orders.Order"). The
# foreign keys to it follow the setting; the default model's index and constraint names
# now come from its app and class, as every subclass of AbstractOrder gets its own. When
# the setting names a shop's own model, the operations on orders.Order below touch
# nothing (Django skips a swapped model), and the shop's first migration must create
# that model (swappable_dependency points at it).

import django.db.models.deletion
from django.db import migrations, models

from orders import ORDER_MODEL_SETTING, get_order_model_string


class Migration(migrations.Migration):
    dependencies = [
        ("orders", "0004_status_label_shipped"),
        migrations.swappable_dependency(get_order_model_string()),
    ]

    operations = [
        migrations.AlterField(
            model_name="payment",
            name="order",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.PROTECT,
                related_name="payments",
                to=get_order_model_string(),
            ),
        ),
        migrations.AlterField(
            model_name="ordertransition",
            name="order",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.CASCADE,
                related_name="history",
                to=get_order_model_string(),
            ),
        ),
        migrations.AlterField(
            model_name="parcelevent",
            name="order",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.CASCADE,
                related_name="parcel_events",
                to=get_order_model_string(),
            ),
        ),
        migrations.AlterModelOptions(
            name="order",
            options={
                "ordering": ["-created_at"],
                "permissions": [
                    ("refund_order", "Can refund a paid or delivered order"),
                    ("cancel_order", "Can cancel an unpaid order"),
                ],
                "swappable": ORDER_MODEL_SETTING,
            },
        ),
        migrations.RenameIndex(
            model_name="order",
            new_name="orders_order_expiry_idx",
            old_name="orders_status_expires_idx",
        ),
        migrations.RenameIndex(
            model_name="order",
            new_name="orders_order_parcel_idx",
            old_name="orders_parcel_check_idx",
        ),
        migrations.RemoveConstraint(
            model_name="order",
            name="orders_amount_positive",
        ),
        migrations.AddConstraint(
            model_name="order",
            constraint=models.CheckConstraint(
                condition=models.Q(("amount__gt", 0)), name="orders_order_amount_positive"
            ),
        ),
    ]
