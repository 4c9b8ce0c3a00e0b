"""The order admin: a read-only page whose Refund and Cancel buttons go through the services,
and only for staff holding the transition's permission."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib import admin
from django.contrib.auth.models import Permission
from django.contrib.messages.storage.fallback import FallbackStorage
from django.db import connection
from django.test import Client, RequestFactory
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from pytest_django.asserts import assertContains, assertNotContains
from pytest_django.fixtures import Settings

from orders import services
from orders.gateways import GatewayError
from orders.models import CancelReason, Order, Payment, Status

pytestmark = pytest.mark.django_db

MakeStaff = Callable[..., Any]
# The change form's inline formsets ("payments", "history") need their management data
# for a posted button to get past form validation to the transition.
NO_INLINE_ROWS = {
    f"{prefix}-{key}": "0"
    for prefix in ("payments", "history")
    for key in ("TOTAL_FORMS", "INITIAL_FORMS")
}


class FailingGateway:
    def refund(
        self, *, payment_ref: str, amount: Decimal, currency: str, idempotency_key: str
    ) -> str:
        raise GatewayError("card issuer unreachable")


@pytest.fixture
def make_staff(django_user_model: Any, client: Client) -> MakeStaff:
    """Log in a staff user holding the given ``orders`` permissions."""

    def make(*codenames: str, username: str = "alice") -> Any:
        user = django_user_model.objects.create_user(username=username, is_staff=True)
        user.user_permissions.set(
            Permission.objects.filter(content_type__app_label="orders", codename__in=codenames)
        )
        client.force_login(user)
        return user

    return make


def paid_order(payment_ref: str = "pay-1") -> Order:
    order = services.place_order(amount="12.50")
    services.record_payment(order_id=order.pk, payment_ref=payment_ref, amount="12.50")
    return Order.objects.get(pk=order.pk)


def change_url(order: Order) -> str:
    return reverse("admin:orders_order_change", args=[order.pk])


def transition_url(order: Order, name: str) -> str:
    return reverse(
        "admin:orders_order_transition", kwargs={"object_id": order.pk, "transition_name": name}
    )


def history(order: Order) -> list[tuple[str, str, str]]:
    return list(order.history.values_list("transition", "actor", "reason"))


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

    response = client.get(reverse("admin:orders_order_changelist"))

    content = response.content.decode()
    assert response.status_code == 200
    assert re.search(r'<span style="background:[^"]+">Awaiting payment</span>', content)
    assert re.search(r'<span style="background:[^"]+">Paid, awaiting shipment</span>', content)
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
        response = client.get(reverse("admin:orders_order_changelist"), {"q": query})
        return {order.pk for order in response.context["cl"].result_list}

    assert found("pay-wanted") == {wanted.pk}
    assert found(str(wanted.pk)) == {wanted.pk}
    assert found(str(other.pk).upper()) == {other.pk}


def test_changelist_queries_do_not_grow_with_the_number_of_orders(
    client: Client, make_staff: MakeStaff
) -> None:
    make_staff("view_order")
    url = reverse("admin:orders_order_changelist")
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
    assert history(order)[1:] == [
        ("refund", "alice", "damaged in transit"),
        ("close", "system", "closed after refund"),
    ]
    assert Payment.objects.get(order=order).refunded_at is not None


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
    assert [row[0] for row in history(order)] == ["pay"]


def test_transition_without_permission_is_refused_even_when_the_mixin_would_run_it(
    make_staff: MakeStaff,
) -> None:
    # django-fsm-2 runs a transition posted to the change form when it has no form, and
    # checks no permission there: the admin's own check is what stops it.
    user = make_staff("view_order", "change_order")
    order = paid_order()
    request = RequestFactory().post(change_url(order))
    request.user = user
    request.session = {}  # type: ignore[assignment]
    request._messages = FallbackStorage(request)  # type: ignore[attr-defined]

    applied = admin.site.get_model_admin(Order)._apply_fsm_transition(  # type: ignore[attr-defined]
        obj=order, transition_name="refund", request=request, kwargs={"reason": "x"}
    )

    assert applied is False
    assert [str(m) for m in request._messages] == [  # type: ignore[attr-defined]
        "You do not have permission to refund orders."
    ]
    order.refresh_from_db()
    assert order.status == Status.PAID
    assert [row[0] for row in history(order)] == ["pay"]


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
    assert history(order) == []


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
    assert [row[0] for row in history(order)] == ["pay"]
    assert Payment.objects.get(order=order).refunded_at is None


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
    assert history(order) == [("cancel", "alice", "duplicate order")]


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

    assert admin_client.get(reverse("admin:orders_order_add")).status_code == 403
    assert (
        admin_client.get(reverse("admin:orders_order_delete", args=[order.pk])).status_code == 403
    )
    changelist = admin_client.get(reverse("admin:orders_order_changelist"))
    assertNotContains(changelist, reverse("admin:orders_order_add"))
    assertNotContains(changelist, "delete_selected")
    page = admin_client.get(change_url(order))
    assertNotContains(page, 'name="amount"')
    assertNotContains(page, 'name="_save"')
    assertNotContains(page, "deletelink")

    admin_client.post(change_url(order), {"amount": "1.00", "currency": "USD", **NO_INLINE_ROWS})

    order.refresh_from_db()
    assert (order.amount, order.currency, order.status) == (Decimal("12.50"), "CNY", Status.PAID)
