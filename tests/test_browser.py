"""Staff at work in a real browser: Debian's Chromium, driven by Playwright, against the
admin on a live server. The screenshots go to var/screenshots/, or with
UPDATE_SCREENSHOTS=1 to docs/screenshots/ for the README.

Skipped, with the reason printed, when /usr/bin/chromium or the playwright package is
missing (``.ci/browser`` installs Chromium where it can). Playwright never downloads a
browser here: it launches the system's Chromium by its path."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import kombu.exceptions
import pytest
from django.contrib.auth.models import Permission
from django.utils import timezone
from pytest_django.live_server_helper import LiveServer

from config import embedded_redis
from orders import get_order_model, scheduling, services
from orders.models import AbstractOrder, Status

Order = get_order_model()

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = (
    Path(__file__).resolve().parent.parent / "docs"
    if os.environ.get("UPDATE_SCREENSHOTS")
    else embedded_redis.VAR_DIR
) / "screenshots"
PASSWORD = "correct horse battery staple"


def _skip(reason: str) -> NoReturn:
    print(f"\nbrowser tests skipped: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        _skip(f"{CHROMIUM} is missing (run .ci/browser, or apt-get install chromium)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError as exc:
        _skip(f"playwright is not importable ({exc}); install the dev extra")
    # Playwright's sync API runs an event loop in this thread, and Django refuses ORM
    # calls from a thread with a running loop. The tests' own setup calls are plain
    # synchronous code that only looks async to Django.
    with pytest.MonkeyPatch.context() as env, sync_playwright() as playwright:
        env.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        # Generous waits: CI machines run other suites beside this one.
        expect.set_options(timeout=15_000)
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser, live_server: LiveServer) -> Iterator[Page]:
    context = browser.new_context(
        base_url=live_server.url,
        viewport={"width": 1280, "height": 860},
        locale="en-US",
        timezone_id="UTC",
    )
    context.set_default_timeout(15_000)
    yield context.new_page()
    context.close()


def staff(django_user_model: Any, username: str, *codenames: str) -> Any:
    user = django_user_model.objects.create_user(
        username=username, password=PASSWORD, is_staff=True
    )
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="orders", codename__in=codenames)
    )
    return user


def log_in(page: Page, username: str) -> None:
    page.goto("/admin/login/?next=/admin/orders/order/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url("**/admin/orders/order/")


def refuse_publish(task: Any, **options: Any) -> NoReturn:
    raise kombu.exceptions.OperationalError("the broker is down (in this test)")


def paid_order(payment_ref: str, amount: str = "12.50") -> AbstractOrder:
    order = services.place_order(amount=amount)
    services.record_payment(order_id=order.pk, payment_ref=payment_ref, amount=amount)
    return Order.objects.get(pk=order.pk)


def screenshot(page: Page, name: str, *, full_page: bool = False) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / name), full_page=full_page)


def row_of(page: Page, order: AbstractOrder) -> Any:
    # The list shows a short id, with the full one in its title.
    return page.locator("#result_list tbody tr", has=page.locator(f'[title="{order.pk}"]'))


def test_staff_finds_an_order_by_its_payment_reference_and_refunds_it(
    page: Page, django_user_model: Any
) -> None:
    from playwright.sync_api import expect

    staff(django_user_model, "alice", "view_order", "change_order", "refund_order")
    services.place_order(amount="49.90", timeout=20 * 60)
    services.place_order(amount="8.00", timeout=3 * 60)
    paid_order("pay-5310", "120.00")
    order = paid_order("pay-7781", "35.00")
    order = services.ship_order(order_id=order.pk)
    services.record_parcel_status(
        order_id=order.pk,
        tracking_number=order.tracking_number,
        status="in_transit",
        by="logistics webhook",
    )
    services.place_order(amount="15.00", timeout=45)

    log_in(page, "alice")
    expect(page.locator("#result_list tbody tr")).to_have_count(5)
    screenshot(page, "order-list.png")

    page.fill("#searchbar", "pay-7781")
    page.press("#searchbar", "Enter")
    expect(page.locator("#result_list tbody tr")).to_have_count(1)
    page.click(f'#result_list a span[title="{order.pk}"]')

    expect(page.locator("#parcel_events-group")).to_contain_text("logistics webhook")
    refund = page.locator("button[name=_fsm_transition_to][value=refund]")
    expect(refund).to_be_visible()
    screenshot(page, "order-page-refund.png", full_page=True)
    refund.click()

    page.fill("textarea[name=reason]", "Parcel arrived damaged; customer sent photos.")
    screenshot(page, "refund-form.png")
    page.click("#transition-form input[type=submit][value=Refund]")

    expect(page.locator(".messagelist .success")).to_contain_text(f"Order {order.pk} was refunded")
    history = page.locator("#history-group tbody tr.has_original")
    expect(history).to_have_count(5)  # place, pay, ship, refund, close
    expect(history.nth(0)).to_contain_text("place")
    expect(history.nth(3)).to_contain_text("refund")
    expect(history.nth(3)).to_contain_text("alice")
    expect(history.nth(3)).to_contain_text("Parcel arrived damaged; customer sent photos.")
    expect(history.nth(4)).to_contain_text("close")
    expect(history.nth(4)).to_contain_text("closed after refund")
    screenshot(page, "order-refunded.png", full_page=True)
    order.refresh_from_db()
    assert order.status == Status.CANCELLED


def test_staff_without_the_refund_permission_sees_no_refund_button(
    page: Page, django_user_model: Any
) -> None:
    from playwright.sync_api import expect

    staff(django_user_model, "bob", "view_order", "change_order", "cancel_order")
    order = paid_order("pay-4242")

    log_in(page, "bob")
    page.goto(f"/admin/orders/order/{order.pk}/change/")

    expect(page.locator("#history-group")).to_contain_text("pay")
    expect(page.locator("button[name=_fsm_transition_to]")).to_have_count(0)
    expect(page.get_by_role("button", name="Refund")).to_have_count(0)


def test_staff_cancels_several_unpaid_orders_from_the_list(
    page: Page, django_user_model: Any
) -> None:
    from playwright.sync_api import expect

    staff(django_user_model, "carol", "view_order", "change_order", "cancel_order")
    unpaid = [services.place_order(amount=f"{n}.00", timeout=n * 60) for n in (5, 10, 15)]
    # Refunded and closed, so that its status cannot move under the test (a paid order
    # would be shipped by the suite's worker at any moment).
    closed = paid_order("pay-0099")
    services.refund_order(order_id=closed.pk, by="customer service", reason="changed mind")

    log_in(page, "carol")
    for order in (*unpaid, closed):
        row_of(page, order).locator("input.action-select").check()
    page.select_option("select[name=action]", "cancel_selected")
    page.click("button[name=index]")

    success = page.locator(".messagelist .success")
    expect(success).to_contain_text("Cancelled 3 orders")
    for order in unpaid:
        expect(success).to_contain_text(str(order.pk))
    expect(page.locator(".messagelist .error")).to_have_text(
        f"Order {closed.pk} is cancelled: it cannot be cancelled."
    )
    screenshot(page, "bulk-cancel.png")
    statuses = set(Order.objects.filter(pk__in=[o.pk for o in unpaid]).values_list("status"))
    assert statuses == {(Status.CANCELLED,)}


def test_the_overview_shows_what_expires_and_the_list_counts_down(
    page: Page, django_user_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from playwright.sync_api import expect

    staff(django_user_model, "dora", "view_order")
    now = timezone.now()
    for hours_ago, expiries, late in ((20, 2, 0), (13, 5, 1), (7, 1, 0), (3, 3, 2), (1, 1, 0)):
        at = now - timedelta(hours=hours_ago, minutes=10)
        for i in range(expiries):
            order = services.place_order(amount="10.00", now=at - timedelta(minutes=40))
            if i < late:
                services.record_payment(
                    order_id=order.pk, payment_ref=f"late-{hours_ago}-{i}", amount="10.00", now=at
                )
            else:
                services.expire_order(order_id=order.pk, now=at)
    for minutes in (4, 18, 42):
        services.place_order(amount="25.00", timeout=minutes * 60)
    paid_order("pay-1001")
    with monkeypatch.context() as broker_down:
        # Its timer is lost: the broker refuses the publish (a running worker would
        # otherwise expire this overdue order at once, before the sweep finds it).
        broker_down.setattr(scheduling, "publish", refuse_publish)
        services.place_order(amount="19.00", now=now - timedelta(minutes=5), timeout=60)
    services.sweep(now=now - timedelta(seconds=20))  # finds the one whose timer was lost

    log_in(page, "dora")
    countdown = page.locator(".orders-time-left").first
    before = countdown.inner_text()
    expect(countdown).not_to_have_text(before, timeout=5_000)
    assert re.fullmatch(r"\d+m \d+s|\d+s|overdue", countdown.inner_text())

    page.click("text=Overview")
    page.wait_for_url("**/admin/orders/order/overview/")
    expect(page.locator("#expiring-count")).to_have_text("3")
    expect(page.locator(".orders-chart .hour")).to_have_count(24)
    expect(page.locator("#last-sweep .warning")).to_contain_text("their timers were lost")
    screenshot(page, "overview.png", full_page=True)


def test_staff_refunds_several_orders_with_one_reason_from_the_list(
    page: Page, django_user_model: Any
) -> None:
    from playwright.sync_api import expect

    staff(django_user_model, "erin", "view_order", "change_order", "refund_order")
    paid = [paid_order(f"pay-31{n}", f"{n}9.00") for n in (1, 2)]
    unpaid = services.place_order(amount="7.00")

    log_in(page, "erin")
    for order in (*paid, unpaid):
        row_of(page, order).locator("input.action-select").check()
    page.select_option("select[name=action]", "refund_selected")
    page.click("button[name=index]")

    expect(page.locator("h1")).to_have_text("Refund the selected orders")
    expect(page.locator("#refund-selection tbody tr")).to_have_count(3)
    page.fill("textarea[name=reason]", "Supplier recalled the batch.")
    screenshot(page, "bulk-refund.png")
    page.click("input[type=submit][value='Refund 2 orders']")

    expect(page.locator(".messagelist .success")).to_contain_text("Refunded and closed 2 orders")
    expect(page.locator(".messagelist .error")).to_have_text(
        f"Order {unpaid.pk} is awaiting payment: it cannot be refunded."
    )
    reasons = Order.objects.filter(pk__in=[o.pk for o in paid], history__transition="refund")  # type: ignore[misc]  # reverse relation
    assert set(reasons.values_list("history__reason", "history__actor")) == {  # type: ignore[misc]  # reverse relation
        ("Supplier recalled the batch.", "erin")
    }
