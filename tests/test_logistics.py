"""The parcel after shipping: events from webhooks and the poller, refunds of returned
parcels, backing off from a provider that fails, and the sweep's own record."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import ClassVar

import pytest
from pytest_django import Settings

from orders import get_order_model, services
from orders.gateways import GatewayError
from orders.models import AbstractOrder, CancelReason, ParcelEvent, ParcelStatus, Status, SweepRun

Order = get_order_model()

pytestmark = pytest.mark.django_db

T0 = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)
HOUR = 3600


class ScriptedProvider:
    """Answers parcel statuses from a class-level script; raises GatewayError on "fail"."""

    answers: ClassVar[dict[str, str]] = {}

    def create_shipment(self, *, order_id: str, idempotency_key: str) -> str:
        return f"TRK-{order_id}"

    def parcel_status(self, *, tracking_number: str) -> str:
        answer = self.answers.get(tracking_number, "in_transit")
        if answer == "fail":
            raise GatewayError("carrier API timed out")
        return answer


@pytest.fixture(autouse=True)
def scripted(settings: Settings) -> type[ScriptedProvider]:
    settings.ORDERS = settings.ORDERS | {
        "LOGISTICS_PROVIDER": "tests.test_logistics.ScriptedProvider",
        "PARCEL_CHECK_INTERVAL": HOUR,
        "PARCEL_MAX_BACKOFF": 8 * HOUR,
        "PARCEL_POLL_BATCH": 100,
    }
    ScriptedProvider.answers = {}
    return ScriptedProvider


def shipped_order(now: datetime = T0) -> AbstractOrder:
    order = services.place_order(amount="10.00", timeout=600, now=now)
    services.record_payment(
        order_id=order.pk, payment_ref=f"pay-{order.pk}", amount="10.00", now=now
    )
    return services.ship_order(order_id=order.pk, now=now)


def test_shipping_schedules_the_first_parcel_check() -> None:
    order = shipped_order()

    assert order.status == Status.DELIVERED
    assert order.parcel_next_check_at == T0 + timedelta(seconds=HOUR)


def test_poller_checks_only_parcels_that_are_due() -> None:
    order = shipped_order()

    early = services.poll_parcels(now=T0 + timedelta(minutes=30))
    due = services.poll_parcels(now=T0 + timedelta(seconds=HOUR))

    assert (early.checked, due.checked) == (0, 1)
    order.refresh_from_db()
    assert order.parcel_status == ParcelStatus.IN_TRANSIT
    assert order.parcel_next_check_at == T0 + timedelta(seconds=2 * HOUR)


def test_each_status_change_is_recorded_once() -> None:
    order = shipped_order()
    for hours in (1, 2, 3):
        services.poll_parcels(now=T0 + timedelta(seconds=hours * HOUR))
    services.record_parcel_status(
        order_id=order.pk,
        tracking_number=order.tracking_number,
        status="in_transit",
        by="logistics webhook",
    )

    events = list(ParcelEvent.objects.filter(order_id=order.pk).values_list("status", "source"))
    assert events == [("in_transit", "logistics poll")]


def test_returned_parcel_found_by_the_poller_is_refunded_once(
    scripted: type[ScriptedProvider],
) -> None:
    order = shipped_order()
    scripted.answers[order.tracking_number] = "returned"

    report = services.poll_parcels(now=T0 + timedelta(seconds=HOUR))
    services.record_parcel_status(
        order_id=order.pk,
        tracking_number=order.tracking_number,
        status="returned",
        by="logistics webhook",
    )

    order.refresh_from_db()
    assert report.changed == 1
    assert order.status == Status.CANCELLED
    assert order.cancel_reason == CancelReason.REFUND
    assert list(order.history.values_list("transition", "actor")) == [
        ("place", "shop"),
        ("pay", "payment gateway"),
        ("ship", "shipping"),
        ("refund", "logistics poll"),
        ("close", "system"),
    ]
    assert order.parcel_next_check_at is None, "a returned parcel is not polled again"
    assert ParcelEvent.objects.filter(order_id=order.pk, status="returned").count() == 1


def test_delivered_parcel_is_not_polled_again(scripted: type[ScriptedProvider]) -> None:
    order = shipped_order()
    scripted.answers[order.tracking_number] = "delivered"

    services.poll_parcels(now=T0 + timedelta(seconds=HOUR))

    order.refresh_from_db()
    assert order.parcel_status == ParcelStatus.DELIVERED
    assert order.parcel_next_check_at is None
    assert order.status == Status.DELIVERED


def test_failing_provider_backs_off_exponentially_up_to_the_cap(
    scripted: type[ScriptedProvider],
) -> None:
    order = shipped_order()
    scripted.answers[order.tracking_number] = "fail"
    now = T0 + timedelta(seconds=HOUR)
    waits = []
    for _ in range(5):
        report = services.poll_parcels(now=now)
        assert report.failed == 1
        order.refresh_from_db()
        assert order.parcel_next_check_at is not None
        waits.append((order.parcel_next_check_at - now).total_seconds() / HOUR)
        now = order.parcel_next_check_at

    assert waits == [2, 4, 8, 8, 8]
    assert order.parcel_check_failures == 5
    assert not ParcelEvent.objects.filter(order_id=order.pk).exists()

    scripted.answers[order.tracking_number] = "in_transit"
    services.poll_parcels(now=now)
    order.refresh_from_db()
    assert order.parcel_check_failures == 0
    assert order.parcel_next_check_at == now + timedelta(seconds=HOUR)


def test_poller_is_bounded_per_run(settings: Settings) -> None:
    settings.ORDERS = settings.ORDERS | {"PARCEL_POLL_BATCH": 2}
    for _ in range(3):
        shipped_order()
    later = T0 + timedelta(seconds=HOUR)

    assert [services.poll_parcels(now=later).checked for _ in range(3)] == [2, 1, 0]


def test_parcel_still_travelling_after_the_give_up_age_is_no_longer_polled(
    settings: Settings,
) -> None:
    settings.ORDERS = settings.ORDERS | {"PARCEL_GIVE_UP_AFTER": 3 * HOUR}
    order = shipped_order()

    for hours in (1, 2, 3, 4):
        services.poll_parcels(now=T0 + timedelta(seconds=hours * HOUR))

    order.refresh_from_db()
    assert order.parcel_next_check_at is None
    assert services.poll_parcels(now=T0 + timedelta(days=1)).checked == 0


def test_bad_parcel_status_is_refused_and_nothing_is_recorded() -> None:
    order = shipped_order()

    with pytest.raises(services.InvalidInput, match="status must be one of"):
        services.record_parcel_status(
            order_id=order.pk, tracking_number=order.tracking_number, status="lost"
        )

    assert not ParcelEvent.objects.exists()


def test_each_sweep_records_its_findings() -> None:
    services.place_order(amount="10.00", timeout=60, now=T0)

    services.sweep(now=T0 + timedelta(seconds=120))
    services.sweep(now=T0 + timedelta(seconds=150))

    runs = list(SweepRun.objects.order_by("at").values_list("expired", "errors"))
    assert runs == [(1, 0), (0, 0)]
    assert SweepRun.objects.latest().max_lateness == 0.0


def test_sweep_records_older_than_a_week_are_pruned() -> None:
    services.sweep(now=T0)
    services.sweep(now=T0 + timedelta(days=8))

    assert list(SweepRun.objects.values_list("at", flat=True)) == [T0 + timedelta(days=8)]


def test_returned_parcel_whose_refund_failed_is_refunded_at_the_next_poll(
    scripted: type[ScriptedProvider], settings: Settings
) -> None:
    order = shipped_order()
    scripted.answers[order.tracking_number] = "returned"
    working = settings.ORDERS
    settings.ORDERS = settings.ORDERS | {"PAYMENT_GATEWAY": "tests.test_webhooks.FailingGateway"}

    report = services.poll_parcels(now=T0 + timedelta(seconds=HOUR))

    order.refresh_from_db()
    assert report.failed == 1
    assert (order.status, order.parcel_status) == (Status.DELIVERED, ParcelStatus.RETURNED)
    assert order.parcel_next_check_at == T0 + timedelta(seconds=2 * HOUR), "asked again"

    settings.ORDERS = working
    # Even if the carrier now says something else: the parcel came back, the refund is owed.
    scripted.answers[order.tracking_number] = "in_transit"
    services.poll_parcels(now=T0 + timedelta(seconds=2 * HOUR))

    order.refresh_from_db()
    assert (order.status, order.cancel_reason) == (Status.CANCELLED, CancelReason.REFUND)
    assert order.parcel_status == ParcelStatus.RETURNED
    assert order.parcel_next_check_at is None
    assert list(ParcelEvent.objects.values_list("status", flat=True)) == ["returned"]


def test_the_poller_moves_no_parcel_back_after_a_terminal_status(
    scripted: type[ScriptedProvider],
) -> None:
    """A webhook said delivered; a poll that was already running reads the carrier's
    older answer. Delivered is the end of the journey: nothing changes."""
    order = shipped_order()
    services.record_parcel_status(
        order_id=order.pk, tracking_number=order.tracking_number, status="delivered"
    )
    Order.objects.filter(pk=order.pk).update(parcel_next_check_at=T0 + timedelta(seconds=HOUR))

    report = services.poll_parcels(now=T0 + timedelta(seconds=HOUR))

    order.refresh_from_db()
    assert report.checked == 1
    assert order.parcel_status == ParcelStatus.DELIVERED
    assert order.parcel_next_check_at is None
    assert list(ParcelEvent.objects.values_list("status", flat=True)) == ["delivered"]


def test_a_parcel_report_for_an_order_never_shipped_stores_nothing() -> None:
    order = services.place_order(amount="10.00", timeout=600, now=T0)
    services.record_payment(order_id=order.pk, payment_ref="pay-1", amount="10.00", now=T0)

    with pytest.raises(services.InvalidTransition, match="never shipped"):
        services.record_parcel_status(order_id=order.pk, tracking_number="", status="returned")

    order.refresh_from_db()
    assert (order.status, order.parcel_status) == (Status.PAID, "")
    assert not ParcelEvent.objects.exists()
