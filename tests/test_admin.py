"""The order admin: a read-only page whose Refund and Cancel buttons go through the services,
and only for staff holding the transition's permission; the list's filters and bulk
actions; the overview page."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib import admin
from django.contrib.auth.models import Permission
from django.contrib.staticfiles import finders
from django.db import connection
from django.test import Client, RequestFactory
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from pytest_django.asserts import assertContains, assertNotContains
from pytest_django.fixtures import Settings

from orders import get_order_model, services
from orders.gateways import GatewayError
from orders.models import (
    AbstractOrder,
    CancelReason,
    ParcelStatus,
    Payment,
    PaymentAttempt,
    Status,
    SweepRun,
)
from tests.dbstate import snapshot

Order = get_order_model()
#: The prefix of the admin's URL names for the order model, whichever it is.
ADMIN = f"admin:{Order._meta.app_label}_{Order._meta.model_name}"

pytestmark = pytest.mark.django_db

MakeStaff = Callable[..., Any]
# The change form's inline formsets (payments, payment attempts, logistics events, history)
# need their management data for a posted button to get past form validation to the
# transition.
NO_INLINE_ROWS = {
    f"{prefix}-{key}": "0"
    for prefix in ("payments", "payment_attempts", "parcel_events", "history")
    for key in ("TOTAL_FORMS", "INITIAL_FORMS")
}


class FailingGateway:
    def refund(
        self, *, payment_ref: str, amount: Decimal, currency: str, idempotency_key: str
    ) -> str:
        raise GatewayError("card issuer unreachable")


@pytest.fixture
def make_staff(django_user_model: Any, client: Client) -> MakeStaff:
    """Log in a staff user holding the given permissions on the order model."""

    def make(*codenames: str, username: str = "alice") -> Any:
        user = django_user_model.objects.create_user(username=username, is_staff=True)
        user.user_permissions.set(
            Permission.objects.filter(
                content_type__app_label=Order._meta.app_label, codename__in=codenames
            )
        )
        client.force_login(user)
        return user

    return make


def paid_order(payment_ref: str = "pay-1") -> AbstractOrder:
    order = services.place_order(amount="12.50")
    services.record_payment(order_id=order.pk, payment_ref=payment_ref, amount="12.50")
    return Order.objects.get(pk=order.pk)


def change_url(order: AbstractOrder) -> str:
    return reverse(f"{ADMIN}_change", args=[order.pk])


def transition_url(order: AbstractOrder, name: str) -> str:
    return reverse(f"{ADMIN}_transition", kwargs={"object_id": order.pk, "transition_name": name})


def history(order: AbstractOrder) -> list[tuple[str, str, str]]:
    return list(order.history.values_list("transition", "actor", "reason"))


#: The first lines of a paid order's history, as ``history()`` lists them.
PLACED = ("place", "shop", "")
PAID = ("pay", "payment gateway", "")


def has_button(content: str, name: str) -> bool:
    return re.search(rf'name="_fsm_transition_to"\s+value="{name}"', content) is not None


# The list


def test_changelist_shows_status_badges_time_left_and_filters(
    client: Client, make_staff: MakeStaff
) -> None:
    make_staff("view_order")
    services.place_order(amount="12.50", timeout=750)
    services.place_order(amount="3.00", now=timezone.now() - timedelta(hours=1), timeout=60)
    paid_order()

    response = client.get(reverse(f"{ADMIN}_changelist"))

    content = response.content.decode()
    assert response.status_code == 200
    assert re.search(
        r'<span class="orders-badge" style="background:[^"]+">Awaiting payment</span>', content
    )
    assert re.search(
        r'<span class="orders-badge" style="background:[^"]+">Paid, awaiting shipment</span>',
        content,
    )
    assert "12.50 CNY" in content
    assert re.search(r">12m (2\d|30)s<", content), "time left of the unpaid order"
    assert ">overdue<" in content
    assert ">—<" in content, "a paid order has no time left"
    for title in ("By status", "By cancel reason", "By currency"):
        assert title in content


def test_search_finds_an_order_by_payment_reference_and_by_full_id(
    client: Client, make_staff: MakeStaff
) -> None:
    make_staff("view_order")
    wanted, other = paid_order("pay-wanted"), paid_order("pay-other")

    def found(query: str) -> set[Any]:
        response = client.get(reverse(f"{ADMIN}_changelist"), {"q": query})
        return {order.pk for order in response.context["cl"].result_list}

    assert found("pay-wanted") == {wanted.pk}
    assert found(str(wanted.pk)) == {wanted.pk}
    assert found(str(other.pk).upper()) == {other.pk}


def test_search_finds_an_order_by_the_shops_reference_and_metadata(
    client: Client, make_staff: MakeStaff
) -> None:
    make_staff("view_order")
    wanted = services.place_order(
        amount="12.50", reference="shop-1001", metadata={"customer": "Zoe Lam"}
    )
    services.place_order(amount="12.50", reference="shop-2002")

    def found(query: str) -> set[Any]:
        response = client.get(reverse(f"{ADMIN}_changelist"), {"q": query})
        return {order.pk for order in response.context["cl"].result_list}

    assert found("shop-1001") == {wanted.pk}
    assert found("zoe lam") == {wanted.pk}


def test_changelist_queries_do_not_grow_with_the_number_of_orders(
    client: Client, make_staff: MakeStaff
) -> None:
    make_staff("view_order")
    url = reverse(f"{ADMIN}_changelist")
    paid_order("pay-first")
    with CaptureQueriesContext(connection) as one:
        client.get(url)
    for i in range(5):
        paid_order(f"pay-more-{i}")
    with CaptureQueriesContext(connection) as six:
        client.get(url)

    assert len(six) == len(one)


# Refund


def test_staff_with_refund_permission_refunds_a_paid_order_through_the_reason_form(
    client: Client, make_staff: MakeStaff
) -> None:
    make_staff("view_order", "change_order", "refund_order")
    order = paid_order()

    page = client.get(change_url(order)).content.decode()
    assert has_button(page, "refund")
    assert not has_button(page, "cancel"), "a paid order cannot be cancelled"

    pressed = client.post(change_url(order), {"_fsm_transition_to": "refund", **NO_INLINE_ROWS})
    assert pressed.status_code == 302
    assert pressed["Location"] == transition_url(order, "refund")
    assertContains(client.get(transition_url(order, "refund")), 'name="reason"')

    response = client.post(
        transition_url(order, "refund"), {"reason": "damaged in transit"}, follow=True
    )

    assertContains(response, f"Order {order.pk} was refunded")
    assertContains(response, "<p>damaged in transit</p>")  # the history on the order's page
    order.refresh_from_db()
    assert order.status == Status.CANCELLED
    assert order.cancel_reason == CancelReason.REFUND
    assert history(order) == [
        PLACED,
        PAID,
        ("refund", "alice", "damaged in transit"),
        ("close", "system", "closed after refund"),
    ]
    assert Payment.objects.get(order_id=order.pk).refunded_at is not None


def test_staff_without_refund_permission_gets_no_button_and_forged_requests_are_refused(
    client: Client, make_staff: MakeStaff
) -> None:
    make_staff("view_order", "change_order")
    order = paid_order()
    refused = "You do not have permission to refund orders."

    assert not has_button(client.get(change_url(order)).content.decode(), "refund")
    forged_button = client.post(
        change_url(order), {"_fsm_transition_to": "refund", **NO_INLINE_ROWS}, follow=True
    )
    forged_get = client.get(transition_url(order, "refund"), follow=True)
    forged_post = client.post(transition_url(order, "refund"), {"reason": "x"}, follow=True)

    for response in (forged_button, forged_get, forged_post):
        assertContains(response, refused)
        assertNotContains(response, 'name="reason"')
    order.refresh_from_db()
    assert order.status == Status.PAID
    assert history(order) == [PLACED, PAID]


def test_the_admins_one_transition_path_refuses_a_user_without_the_permission(
    make_staff: MakeStaff,
) -> None:
    # Buttons, transition pages and bulk actions all move an order through
    # _run_transition: its own permission check is what stops a forged request.
    user = make_staff("view_order", "change_order")
    order = paid_order()
    request = RequestFactory().post(change_url(order))
    request.user = user

    with pytest.raises(Exception, match=r"You do not have permission to refund orders\.") as e:
        admin.site.get_model_admin(Order)._run_transition(  # type: ignore[attr-defined]
            request, order, "refund", reason="x"
        )

    assert type(e.value).__name__ == "_Refused"
    order.refresh_from_db()
    assert order.status == Status.PAID
    assert history(order) == [PLACED, PAID]


def test_staff_who_may_only_view_orders_gets_no_button_and_no_transition_page(
    client: Client, make_staff: MakeStaff
) -> None:
    make_staff("view_order", "refund_order")
    order = paid_order()

    assert not has_button(client.get(change_url(order)).content.decode(), "refund")
    assert client.get(transition_url(order, "refund")).status_code == 403
    assert client.post(transition_url(order, "refund"), {"reason": "x"}).status_code == 403
    order.refresh_from_db()
    assert order.status == Status.PAID


def test_refund_of_an_unpaid_order_is_refused_with_a_clear_message(admin_client: Client) -> None:
    order = services.place_order(amount="12.50")

    assert not has_button(admin_client.get(change_url(order)).content.decode(), "refund")
    response = admin_client.post(transition_url(order, "refund"), {"reason": "x"}, follow=True)

    assertContains(response, f"Order {order.pk} is awaiting payment: it cannot be refunded.")
    order.refresh_from_db()
    assert order.status == Status.CREATED
    assert history(order) == [PLACED]


def test_gateway_failure_leaves_the_order_paid_and_shows_the_error(
    admin_client: Client, settings: Settings
) -> None:
    settings.ORDERS = settings.ORDERS | {"PAYMENT_GATEWAY": f"{__name__}.FailingGateway"}
    order = paid_order()

    response = admin_client.post(
        transition_url(order, "refund"), {"reason": "customer asked"}, follow=True
    )

    assertContains(response, "The payment gateway did not refund order")
    assertContains(response, "card issuer unreachable")
    order.refresh_from_db()
    assert order.status == Status.PAID
    assert history(order) == [PLACED, PAID]
    assert Payment.objects.get(order_id=order.pk).refunded_at is None


# Cancel


def test_staff_with_cancel_permission_cancels_an_unpaid_order(
    client: Client, make_staff: MakeStaff
) -> None:
    make_staff("view_order", "change_order", "cancel_order")
    order = services.place_order(amount="12.50")

    page = client.get(change_url(order)).content.decode()
    assert has_button(page, "cancel")
    assert not has_button(page, "refund")
    response = client.post(
        transition_url(order, "cancel"), {"reason": "duplicate order"}, follow=True
    )

    assertContains(response, f"Order {order.pk} was cancelled.")
    order.refresh_from_db()
    assert order.status == Status.CANCELLED
    assert order.cancel_reason == CancelReason.STAFF
    assert history(order) == [PLACED, ("cancel", "alice", "duplicate order")]


@pytest.mark.parametrize(
    "reason",
    ["x" * 1001, "nul \x00 byte"],
    ids=["longer than 1000 characters", "NUL"],
)
def test_a_reason_too_long_or_with_a_nul_is_refused_by_the_form(
    client: Client, make_staff: MakeStaff, reason: str
) -> None:
    make_staff("view_order", "change_order", "cancel_order")
    order = services.place_order(amount="12.50")
    before = snapshot()

    response = client.post(transition_url(order, "cancel"), {"reason": reason})

    assert response.status_code == 200, "the form again, with its error"
    assert response.context["transition_form"].errors["reason"]
    assert snapshot() == before


# Nothing else is written from the admin


def test_hidden_or_unknown_transitions_cannot_be_posted(admin_client: Client) -> None:
    order = services.place_order(amount="12.50")

    hidden = admin_client.post(
        change_url(order), {"_fsm_transition_to": "pay", **NO_INLINE_ROWS}, follow=True
    )
    unknown = admin_client.post(
        change_url(order), {"_fsm_transition_to": "delete", **NO_INLINE_ROWS}
    )

    assertContains(hidden, "“pay” cannot be done from the admin.")
    assert unknown.status_code == 404
    assert admin_client.get(transition_url(order, "save")).status_code == 404
    assert Order.objects.get(pk=order.pk).status == Status.CREATED


def test_orders_cannot_be_added_deleted_or_edited_even_by_a_superuser(
    admin_client: Client,
) -> None:
    order = paid_order()

    assert admin_client.get(reverse(f"{ADMIN}_add")).status_code == 403
    assert admin_client.get(reverse(f"{ADMIN}_delete", args=[order.pk])).status_code == 403
    changelist = admin_client.get(reverse(f"{ADMIN}_changelist"))
    assertNotContains(changelist, reverse(f"{ADMIN}_add"))
    assertNotContains(changelist, "delete_selected")
    page = admin_client.get(change_url(order))
    assertNotContains(page, 'name="amount"')
    assertNotContains(page, 'name="_save"')
    assertNotContains(page, "deletelink")

    admin_client.post(change_url(order), {"amount": "1.00", "currency": "USD", **NO_INLINE_ROWS})

    order.refresh_from_db()
    assert (order.amount, order.currency, order.status) == (Decimal("12.50"), "CNY", Status.PAID)


# The list: live deadlines, filters


def changelist_url() -> str:
    return reverse(f"{ADMIN}_changelist")


def listed(client: Client, **params: str) -> set[Any]:
    response = client.get(changelist_url(), params)
    assert response.status_code == 200
    return {order.pk for order in response.context["cl"].result_list}


def messages_in(response: Any) -> list[str]:
    return [f"{message.level_tag}: {message}" for message in response.context["messages"]]


def late_payment(payment_ref: str, *, now: datetime | None = None) -> Payment:
    """A payment that arrives after its order's deadline: it expires the order, is kept
    as ``late`` and awaits its refund."""
    now = now or timezone.now()
    order = services.place_order(amount="12.50", now=now - timedelta(hours=1), timeout=60)
    return services.record_payment(
        order_id=order.pk, payment_ref=payment_ref, amount="12.50", now=now
    )


@pytest.mark.parametrize(
    "params",
    [
        {"created_at__year": "9999"},
        {"created_at__year": "9999", "created_at__month": "12"},
        {"created_at__year": "9999", "created_at__month": "12", "created_at__day": "31"},
        {"created_at__year": "2026", "created_at__month": "13"},
        {"created_at__year": "0"},
        {"created_at__year": "1" + "0" * 30},
    ],
    ids=["year 9999", "December 9999", "31 Dec 9999", "month 13", "year 0", "huge year"],
)
def test_a_date_outside_the_calendar_is_a_bad_lookup_not_a_server_error(
    client: Client, make_staff: MakeStaff, params: dict[str, str]
) -> None:
    make_staff("view_order")
    paid_order()
    before = snapshot()

    response = client.get(changelist_url(), params)

    # As the admin answers any other bad lookup: back to the list, with ?e=1.
    assert response.status_code == 302
    assert response["Location"] == f"{changelist_url()}?e=1"
    assert snapshot() == before


def test_the_last_valid_year_of_the_calendar_lists_no_order(
    client: Client, make_staff: MakeStaff
) -> None:
    make_staff("view_order")
    paid_order()

    assert listed(client, created_at__year="9998", created_at__month="12") == set()


def test_time_left_counts_down_in_the_page_from_the_deadline(
    client: Client, make_staff: MakeStaff
) -> None:
    make_staff("view_order")
    order = services.place_order(amount="12.50", timeout=750)

    content = client.get(changelist_url()).content.decode()

    deadline = order.expires_at.isoformat(timespec="milliseconds")
    assert re.search(
        rf'<span class="orders-time-left" data-deadline="{re.escape(deadline)}"', content
    )
    assert "/static/orders/time_left.js" in content
    assert finders.find("orders/time_left.js"), "the script ships with the app"


def test_expiring_within_the_hour_filter_lists_unpaid_orders_due_soon_or_overdue(
    client: Client, make_staff: MakeStaff
) -> None:
    make_staff("view_order")
    soon = services.place_order(amount="1.00", timeout=600)
    overdue = services.place_order(amount="2.00", now=timezone.now() - timedelta(hours=1))
    services.place_order(amount="3.00", timeout=2 * 3600)
    paid_order()  # due within the hour too, but paid

    assertContains(client.get(changelist_url()), "Expiring within the hour")
    assert listed(client, expiring="hour") == {soon.pk, overdue.pk}


def test_late_payments_filter_tells_refunded_from_awaiting_refund(
    client: Client, make_staff: MakeStaff
) -> None:
    make_staff("view_order")
    awaiting = late_payment("pay-late-1")
    refunded = services.refund_payment(payment_id=late_payment("pay-late-2").pk)
    surplus = paid_order("pay-first")
    services.record_payment(order_id=surplus.pk, payment_ref="pay-second", amount="12.50")
    paid_order("pay-fine")

    content = client.get(changelist_url()).content.decode()
    assert "By late payments" in content
    assert listed(client, late_payment="late") == {awaiting.order_id, refunded.order_id}
    assert listed(client, late_payment="any") == {awaiting.order_id, refunded.order_id, surplus.pk}
    assert listed(client, late_payment="refunded") == {refunded.order_id}
    assert listed(client, late_payment="awaiting") == {awaiting.order_id, surplus.pk}


# Bulk actions


@pytest.mark.parametrize(
    ("codenames", "offered"),
    [
        (("view_order",), set()),
        (("view_order", "cancel_order", "refund_order"), set()),  # may not change orders
        (("view_order", "change_order"), set()),
        (("view_order", "change_order", "cancel_order"), {"cancel_selected"}),
        (("view_order", "change_order", "refund_order"), {"refund_selected"}),
        (
            ("view_order", "change_order", "cancel_order", "refund_order"),
            {"cancel_selected", "refund_selected"},
        ),
    ],
)
def test_bulk_actions_are_offered_only_to_staff_holding_their_permission(
    client: Client, make_staff: MakeStaff, codenames: tuple[str, ...], offered: set[str]
) -> None:
    make_staff(*codenames)
    services.place_order(amount="12.50")

    form = client.get(changelist_url()).context["action_form"]

    choices = {value for value, _ in form.fields["action"].choices if value} if form else set()
    assert choices == offered


def test_a_forged_bulk_action_without_its_permission_changes_nothing(
    client: Client, make_staff: MakeStaff
) -> None:
    make_staff("view_order", "change_order", "cancel_order")
    order = paid_order()

    response = client.post(
        changelist_url(),
        {
            "action": "refund_selected",
            "_selected_action": [order.pk],
            "post": "yes",
            "reason": "x",
            "index": "0",
        },
        follow=True,
    )

    assert messages_in(response) == ["warning: No action selected."]
    assert Order.objects.get(pk=order.pk).status == Status.PAID


def test_bulk_cancel_cancels_the_unpaid_orders_and_reports_each_refused_one(
    client: Client, make_staff: MakeStaff
) -> None:
    make_staff("view_order", "change_order", "cancel_order")
    first = services.place_order(amount="1.00")
    second = services.place_order(amount="2.00")
    paid = paid_order()

    response = client.post(
        changelist_url(),
        {
            "action": "cancel_selected",
            "_selected_action": [first.pk, second.pk, paid.pk],
            "index": "0",
        },
        follow=True,
    )

    assert messages_in(response) == [
        f"success: Cancelled 2 orders: {first.pk}, {second.pk}.",
        f"error: Order {paid.pk} is paid, awaiting shipment: it cannot be cancelled.",
    ]
    for order in (first, second):
        order.refresh_from_db()
        assert (order.status, order.cancel_reason) == (Status.CANCELLED, CancelReason.STAFF)
        assert history(order) == [
            PLACED,
            ("cancel", "alice", "cancelled in bulk from the order list"),
        ]
    assert Order.objects.get(pk=paid.pk).status == Status.PAID


def test_an_order_paid_since_the_page_was_read_is_refused_by_the_service(
    make_staff: MakeStaff,
) -> None:
    # The permission check passes on the order as read; the service, under the row
    # lock, sees it paid and refuses. The message says which order.
    user = make_staff("view_order", "change_order", "cancel_order")
    stale = services.place_order(amount="12.50")
    services.record_payment(order_id=stale.pk, payment_ref="pay-1", amount="12.50")
    request = RequestFactory().post(changelist_url())
    request.user = user

    with pytest.raises(Exception) as refused:  # noqa: PT011 (matched exactly below)
        admin.site.get_model_admin(Order)._run_transition(  # type: ignore[attr-defined]
            request, stale, "cancel", reason="x"
        )

    assert str(refused.value) == (
        f"Order {stale.pk}: Only an unpaid order can be cancelled; this one is paid."
    )
    assert Order.objects.get(pk=stale.pk).status == Status.PAID


def test_bulk_refund_asks_for_one_reason_then_refunds_order_by_order(
    client: Client, make_staff: MakeStaff
) -> None:
    make_staff("view_order", "change_order", "refund_order")
    first, second = paid_order("pay-1"), paid_order("pay-2")
    unpaid = services.place_order(amount="12.50")
    selection = {"action": "refund_selected", "_selected_action": [first.pk, second.pk, unpaid.pk]}

    confirmation = client.post(changelist_url(), {**selection, "index": "0"})

    assert confirmation.status_code == 200
    assert confirmation.templates[0].name == "admin/orders/order/refund_selected_confirmation.html"
    page = confirmation.content.decode()
    assert 'name="reason"' in page
    assert '<input type="hidden" name="post" value="yes">' in page
    for order in (first, second, unpaid):
        assert f'name="_selected_action" value="{order.pk}"' in page
    assert page.count("will be refunded") == 2
    assert page.count("cannot be refunded</strong>") == 1
    assert 'value="Refund 2 orders"' in page
    assert Order.objects.filter(status=Status.PAID).count() == 2, "nothing done yet"

    no_reason = client.post(changelist_url(), {**selection, "post": "yes", "reason": "  "})
    assertContains(no_reason, "This field is required.")
    assert Order.objects.filter(status=Status.PAID).count() == 2

    response = client.post(
        changelist_url(), {**selection, "post": "yes", "reason": "warehouse fire"}, follow=True
    )

    assert messages_in(response) == [
        f"success: Refunded and closed 2 orders: {first.pk}, {second.pk}.",
        f"error: Order {unpaid.pk} is awaiting payment: it cannot be refunded.",
    ]
    for order in (first, second):
        order.refresh_from_db()
        assert (order.status, order.cancel_reason) == (Status.CANCELLED, CancelReason.REFUND)
        assert history(order) == [
            PLACED,
            PAID,
            ("refund", "alice", "warehouse fire"),
            ("close", "system", "closed after refund"),
        ]
        assert Payment.objects.get(order_id=order.pk).refunded_at is not None
    assert Order.objects.get(pk=unpaid.pk).status == Status.CREATED


def test_bulk_refund_reports_each_order_the_gateway_did_not_refund(
    admin_client: Client, settings: Settings
) -> None:
    settings.ORDERS = settings.ORDERS | {"PAYMENT_GATEWAY": f"{__name__}.FailingGateway"}
    order = paid_order()

    response = admin_client.post(
        changelist_url(),
        {
            "action": "refund_selected",
            "_selected_action": [order.pk],
            "post": "yes",
            "reason": "customer asked",
        },
        follow=True,
    )

    assert messages_in(response) == [
        f"error: The payment gateway did not refund order {order.pk}: card issuer "
        "unreachable. The order is unchanged; try again later."
    ]
    assert Order.objects.get(pk=order.pk).status == Status.PAID


def test_bulk_refund_of_more_orders_than_the_limit_refunds_none(
    client: Client,
    make_staff: MakeStaff,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings.ORDERS = settings.ORDERS | {"BULK_REFUND_LIMIT": 2}
    make_staff("view_order", "change_order", "refund_order")
    orders = [paid_order(f"pay-{i}") for i in range(3)]
    before = snapshot()
    selection = {"action": "refund_selected", "_selected_action": [o.pk for o in orders]}

    # Neither the confirmation page nor a forged final POST gets past the limit.
    for extra in ({"index": "0"}, {"post": "yes", "reason": "warehouse fire"}):
        response = client.post(changelist_url(), {**selection, **extra}, follow=True)

        assert response.status_code == 200
        assert messages_in(response) == [
            "error: 3 orders were selected, but a bulk refund takes at most 2 "
            "(ORDERS['BULK_REFUND_LIMIT']). Select fewer. Nothing was refunded."
        ]
    assert snapshot() == before
    assert [r.getMessage() for r in caplog.records if r.name == "orders.admin"] == [
        "Bulk refund by alice refused: 3 orders were selected, but a bulk refund takes at "
        "most 2 (ORDERS['BULK_REFUND_LIMIT']). Select fewer. Nothing was refunded."
    ] * 2


def test_bulk_refund_of_all_the_orders_of_the_list_is_refused(
    client: Client, make_staff: MakeStaff
) -> None:
    make_staff("view_order", "change_order", "refund_order")
    orders = [paid_order(f"pay-{i}") for i in range(2)]
    before = snapshot()

    # "Select all 2 orders" sends select_across=1 (with the page's ticked ids).
    for extra in ({"index": "0"}, {"post": "yes", "reason": "warehouse fire"}):
        response = client.post(
            changelist_url(),
            {
                "action": "refund_selected",
                "_selected_action": [orders[0].pk],
                "select_across": "1",
                **extra,
            },
            follow=True,
        )

        assert response.status_code == 200
        assert messages_in(response) == [
            "error: Refunds cannot be made for all the orders of the list at once. "
            "Tick the orders to refund (at most 50). Nothing was refunded."
        ]
    assert snapshot() == before


def test_bulk_refund_within_the_limit_logs_who_refunded_how_much_per_currency(
    client: Client,
    make_staff: MakeStaff,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings.ORDERS = settings.ORDERS | {"BULK_REFUND_LIMIT": 3}
    make_staff("view_order", "change_order", "refund_order")
    cny = [paid_order(f"pay-{i}") for i in range(2)]
    usd = services.place_order(amount="7.25", currency="USD")
    services.record_payment(order_id=usd.pk, payment_ref="pay-usd", amount="7.25")

    client.post(
        changelist_url(),
        {
            "action": "refund_selected",
            "_selected_action": [o.pk for o in (*cny, usd)],
            "post": "yes",
            "reason": "warehouse fire",
        },
    )

    assert Order.objects.filter(cancel_reason=CancelReason.REFUND).count() == 3
    (line,) = [r for r in caplog.records if getattr(r, "event", "") == "admin.bulk_refund"]
    assert line.getMessage() == (
        "Bulk refund by alice: 3 orders refunded (25.00 CNY, 7.25 USD), 0 refused."
    )
    assert (line.actor, line.refunded, line.refused, line.totals) == (  # type: ignore[attr-defined]
        "alice",
        3,
        0,
        {"CNY": "25.00", "USD": "7.25"},
    )


def test_refund_confirmation_with_nothing_refundable_offers_no_refund_button(
    admin_client: Client,
) -> None:
    unpaid = services.place_order(amount="12.50")

    response = admin_client.post(
        changelist_url(),
        {"action": "refund_selected", "_selected_action": [unpaid.pk], "index": "0"},
    )

    assertContains(response, "None of the selected orders can be refunded")
    assertNotContains(response, 'name="reason"')
    assertNotContains(response, 'value="Refund ')


# The order page


def test_order_page_shows_the_logistics_events(client: Client, make_staff: MakeStaff) -> None:
    make_staff("view_order")
    order = paid_order()
    order = services.ship_order(order_id=order.pk)
    services.record_parcel_status(
        order_id=order.pk,
        tracking_number=order.tracking_number,
        status=ParcelStatus.IN_TRANSIT,
        by="logistics webhook",
    )
    services.record_parcel_status(
        order_id=order.pk,
        tracking_number=order.tracking_number,
        status=ParcelStatus.DELIVERED,
        by="logistics poll",
    )

    response = client.get(change_url(order))

    assertContains(response, "Logistics events")
    content = response.content.decode()
    rows = re.findall(
        r'<td class="field-status">\s*<p>([^<]+)</p>\s*</td>\s*'
        r'<td class="field-source">\s*<p>([^<]+)</p>',
        content,
    )
    assert rows == [
        ("In transit", "logistics webhook"),
        ("Delivered to the customer", "logistics poll"),
    ]


# Payment attempts


ATTEMPTS = "admin:orders_paymentattempt"


def held_order(attempt_ref: str, *, method: str = "card", hold_for: int = 900) -> AbstractOrder:
    """An unpaid order due in ten minutes that a customer started paying: the attempt
    holds it ``hold_for`` seconds from now."""
    order = services.place_order(amount="12.50", timeout=600)
    services.start_payment(
        order_id=order.pk, attempt_ref=attempt_ref, method=method, hold_for=hold_for
    )
    return Order.objects.get(pk=order.pk)


def test_order_page_shows_its_payment_attempts_and_the_shops_deadline_when_held(
    client: Client, make_staff: MakeStaff
) -> None:
    make_staff("view_order")
    order = held_order("att-admin-1")
    assert order.original_expires_at is not None

    response = client.get(change_url(order))

    assertContains(response, "Payment attempts")
    content = response.content.decode()
    row = re.search(r'<td class="field-reference">\s*<p>att-admin-1</p>.*?</tr>', content, re.S)
    assert row, "the attempt's row"
    for cell in ("card", "Open: the customer is paying"):
        assert f"<p>{cell}</p>" in row[0]
    for column in ("hold_until", "cap_at", "closed_at", "detail", "closed_at_provider"):
        assert f'class="field-{column}"' in row[0]
    assertContains(response, "Shop&#x27;s deadline")
    shops = timezone.localtime(order.original_expires_at).strftime("%Y-%m-%d %H:%M:%S")
    assertContains(response, f"{shops}")
    assertContains(
        response, "a payment attempt held the order (expires at is the later of this and its hold)"
    )


def test_order_page_of_an_order_nobody_is_paying_shows_no_second_deadline(
    client: Client, make_staff: MakeStaff
) -> None:
    make_staff("view_order")
    order = services.place_order(amount="12.50", timeout=600)

    response = client.get(change_url(order))

    assertNotContains(response, "Shop&#x27;s deadline")
    assertNotContains(response, 'class="field-reference"')


def test_held_by_a_payment_filter_lists_the_unpaid_orders_a_customer_is_paying(
    client: Client, make_staff: MakeStaff
) -> None:
    make_staff("view_order")
    held = held_order("att-held")
    # An attempt shorter than the time left holds it too: the customer is paying.
    short = held_order("att-short", hold_for=60)
    paid = held_order("att-paid")
    services.record_payment(
        order_id=paid.pk, payment_ref="pay-held", amount="12.50", attempt_ref="att-paid"
    )
    cancelled = held_order("att-cancelled")
    services.cancel_order(order_id=cancelled.pk, by="customer")
    services.place_order(amount="12.50", timeout=600)

    assertContains(client.get(changelist_url()), "Held by a payment attempt")
    assert listed(client, held="yes") == {held.pk, short.pk}
    assert len(listed(client)) == 5


def test_payment_attempts_list_filters_by_outcome_and_method(admin_client: Client) -> None:
    held_order("att-card")
    held_order("att-qr", method="qr_code")
    paid = held_order("att-paid-card")
    services.record_payment(
        order_id=paid.pk, payment_ref="pay-card", amount="12.50", attempt_ref="att-paid-card"
    )
    url = reverse(f"{ATTEMPTS}_changelist")

    def listed_refs(**params: str) -> set[str]:
        response = admin_client.get(url, params)
        assert response.status_code == 200
        return {attempt.reference for attempt in response.context["cl"].result_list}

    response = admin_client.get(url)
    for title in ("By outcome", "By method"):
        assertContains(response, title)
    assertContains(response, reverse(f"{ADMIN}_change", args=[paid.pk]))
    assert listed_refs() == {"att-card", "att-qr", "att-paid-card"}
    assert listed_refs(outcome__exact="open") == {"att-card", "att-qr"}
    assert listed_refs(method__exact="card") == {"att-card", "att-paid-card"}
    assert listed_refs(outcome__exact="paid", method__exact="card") == {"att-paid-card"}
    assert listed_refs(q="att-qr") == {"att-qr"}
    assert listed_refs(q=str(paid.pk)) == {"att-paid-card"}


@pytest.mark.parametrize(
    "query",
    [{"method__exact": "\x00"}, {"outcome__exact": "\x00"}, {"q": "\x00"}, {"o": "99"}],
    ids=["method-NUL", "outcome-NUL", "search-NUL", "bad-ordering"],
)
def test_hostile_query_strings_on_the_payment_attempts_list_are_not_a_server_error(
    admin_client: Client, query: dict[str, str]
) -> None:
    held_order("att-hostile")
    before = snapshot()

    response = admin_client.get(reverse(f"{ATTEMPTS}_changelist"), query)

    assert response.status_code in (200, 302, 400), response.status_code
    assert snapshot() == before


def test_payment_attempts_cannot_be_added_changed_or_deleted_even_by_a_superuser(
    admin_client: Client,
) -> None:
    order = held_order("att-readonly")
    attempt = PaymentAttempt.objects.get(reference="att-readonly")
    change = reverse(f"{ATTEMPTS}_change", args=[attempt.pk])
    before = snapshot()

    assert admin_client.get(reverse(f"{ATTEMPTS}_add")).status_code == 403
    assert admin_client.get(reverse(f"{ATTEMPTS}_delete", args=[attempt.pk])).status_code == 403
    assert admin_client.post(reverse(f"{ATTEMPTS}_delete", args=[attempt.pk]), {"post": "yes"})
    changelist = admin_client.get(reverse(f"{ATTEMPTS}_changelist"))
    assertNotContains(changelist, reverse(f"{ATTEMPTS}_add"))
    assertNotContains(changelist, "delete_selected")
    page = admin_client.get(change)
    assert page.status_code == 200
    assertContains(page, "att-readonly")
    assertContains(page, reverse(f"{ADMIN}_change", args=[order.pk]))
    assertNotContains(page, 'name="outcome"')
    assertNotContains(page, 'name="_save"')
    admin_client.post(change, {"outcome": "paid", "hold_until": "2099-01-01 00:00:00"})

    assert snapshot() == before


def test_staff_see_payment_attempts_only_with_the_view_permission(
    client: Client, django_user_model: Any
) -> None:
    attempt = PaymentAttempt.objects.get(order_id=held_order("att-perm").pk)
    user = django_user_model.objects.create_user(username="bob", is_staff=True)
    client.force_login(user)
    url = reverse(f"{ATTEMPTS}_changelist")

    assert client.get(url).status_code == 403

    user.user_permissions.add(
        Permission.objects.get(content_type__app_label="orders", codename="view_paymentattempt")
    )
    assert client.get(url).status_code == 200
    assert client.get(reverse(f"{ATTEMPTS}_change", args=[attempt.pk])).status_code == 200
    assert client.get(reverse(f"{ATTEMPTS}_add")).status_code == 403


# The overview


def overview_url() -> str:
    return reverse(f"{ADMIN}_overview")


def chart(content: str) -> dict[str, tuple[int, int]]:
    bars = re.findall(
        r'data-hour="([^"]+)" data-expiries="(\d+)" data-late-payments="(\d+)"', content
    )
    return {hour: (int(expiries), int(late)) for hour, expiries, late in bars}


def hour_of(at: datetime) -> str:
    return at.replace(minute=0, second=0, microsecond=0).isoformat()


def test_changelist_links_to_the_overview(client: Client, make_staff: MakeStaff) -> None:
    make_staff("view_order")

    assertContains(client.get(changelist_url()), f'href="{overview_url()}"')


def test_overview_needs_the_view_permission(client: Client, make_staff: MakeStaff) -> None:
    make_staff("cancel_order")

    assert client.get(overview_url()).status_code == 403


def test_overview_counts_orders_charts_expiries_and_late_payments_and_warns_of_lost_timers(
    client: Client, make_staff: MakeStaff
) -> None:
    make_staff("view_order")
    now = timezone.now()
    soon = services.place_order(amount="1.00", timeout=600)
    services.place_order(amount="2.00", timeout=2 * 3600)
    paid_order()
    late_payment("pay-late", now=now)  # an expiry and a late payment, now
    earlier = services.place_order(amount="3.00", now=now - timedelta(hours=3), timeout=60)
    services.expire_order(order_id=earlier.pk, now=now - timedelta(hours=2))
    too_old = services.place_order(amount="4.00", now=now - timedelta(hours=31), timeout=60)
    services.expire_order(order_id=too_old.pk, now=now - timedelta(hours=30))
    services.place_order(amount="5.00", now=now - timedelta(hours=3), timeout=60)
    swept_at = now - timedelta(minutes=10)
    assert services.sweep(now=swept_at).expired == 1  # its timer was lost

    response = client.get(overview_url())

    assert response.status_code == 200
    content = response.content.decode()
    counts = dict(re.findall(r'data-status-count="([^"]+)">(\d+)<', content))
    assert counts == {
        "Awaiting payment": "2",
        "Paid, awaiting shipment": "1",
        "Shipped": "0",
        "Refunded": "0",
        "Cancelled": "4",
    }
    assert re.search(r'id="expiring-count">1<', content)
    assert str(soon.pk)[:12] in content
    bars = chart(content)
    assert len(bars) == 24
    expected: dict[str, list[int]] = {}
    for at, kind in ((now, 0), (now, 1), (now - timedelta(hours=2), 0), (swept_at, 0)):
        expected.setdefault(hour_of(at), [0, 0])[kind] += 1
    assert {hour: bar for hour, bar in bars.items() if bar != (0, 0)} == {
        hour: (e, late) for hour, (e, late) in expected.items()
    }
    assert re.search(r'class="bar expiries" style="height:100%"', content)
    assert "The last sweep expired 1 overdue order, up to" in content
    assert "their timers were lost" in content
    assert "The last sweep ran 10m 0s ago" in content
    assert "Is Celery beat running?" in content
    assert re.search(r'id="sweep-expired">1<', content)
    # The link to the late payments and its count are the filter's own query.
    link = re.search(r'href="([^"]+)" id="late-orders-link"', content)
    assert link is not None
    late_orders = re.search(r'id="late-orders">(\d+)<', content)
    assert late_orders is not None
    assert int(late_orders[1]) == len(listed(client, **dict([link[1].split("?")[1].split("=")])))
    assert int(late_orders[1]) == 1


def test_overview_says_when_no_sweep_has_run_and_when_all_is_well(
    client: Client, make_staff: MakeStaff
) -> None:
    make_staff("view_order")

    assertContains(client.get(overview_url()), "No sweep has run yet.")

    services.sweep()
    response = client.get(overview_url())

    assertContains(response, "All well")
    assertNotContains(response, 'class="warning"')
    assert SweepRun.objects.count() == 1


def test_overview_queries_do_not_grow_with_the_number_of_orders(
    client: Client, make_staff: MakeStaff
) -> None:
    make_staff("view_order")
    late_payment("pay-late-0")
    with CaptureQueriesContext(connection) as few:
        client.get(overview_url())
    for i in range(1, 6):
        late_payment(f"pay-late-{i}")
        services.place_order(amount="1.00", timeout=600)
    services.sweep()
    with CaptureQueriesContext(connection) as more:
        client.get(overview_url())

    assert len(more) == len(few)
