"""The admin that staff live in: the order list with live deadlines, filters and bulk
cancel / refund, the order page with its Refund / Cancel buttons, and an overview of what
is expiring and whether the timers are healthy. Every write goes through
``orders.services``, with the transition's permission checked here."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast

import django_fsm as fsm
from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.utils import quote, unquote
from django.contrib.admin.views.main import ChangeList
from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import PermissionDenied
from django.db import models
from django.db.models import OuterRef, QuerySet, Subquery
from django.forms import ModelForm
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import dateformat, timezone
from django.utils.html import format_html, format_html_join
from django.utils.module_loading import import_string
from django.utils.safestring import SafeString

from orders import events, get_order_model, outbound, selectors, services
from orders.conf import get_settings
from orders.forms import ReasonForm, WebhookEndpointForm
from orders.gateways import GatewayError
from orders.logging import log_event
from orders.models import (
    AbstractOrder,
    CancelReason,
    EventDelivery,
    OrderTransition,
    ParcelEvent,
    Payment,
    PaymentAttempt,
    Status,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    permission_name,
)

if TYPE_CHECKING:
    # Django's admin classes are generic only in django-stubs, not at run time. The
    # mixin is a ModelAdmin[Model], so the methods it shares with ours take any Model.
    _ModelAdmin = admin.ModelAdmin[AbstractOrder]
    _Inline = admin.TabularInline[Any, AbstractOrder]
    _EventDeliveryAdmin = admin.ModelAdmin[EventDelivery]
    _PaymentAttemptAdmin = admin.ModelAdmin[PaymentAttempt]
else:
    _ModelAdmin, _Inline, _EventDeliveryAdmin, _PaymentAttemptAdmin = (
        admin.ModelAdmin,
        admin.TabularInline,
        admin.ModelAdmin,
        admin.ModelAdmin,
    )

STATUS_COLOURS = {
    Status.CREATED: "#b26a00",
    Status.PAID: "#1f6fd1",
    Status.DELIVERED: "#2e7d32",
    Status.REFUNDED: "#7b1fa2",
    Status.CANCELLED: "#6b6b6b",
}
logger = logging.getLogger("orders.admin")

# The transitions the admin may run, each through its service; the past tense is for messages.
_ADMIN_TRANSITIONS = {"refund": "refunded", "cancel": "cancelled"}
# A bulk action over hundreds of orders reports this many one by one, then a count.
MAX_REPORTED = 25
#: The change form's button field, naming the transition whose page to open.
TRANSITION_PARAM = "_fsm_transition_to"
NOT_ALLOWED = "You do not have permission to {transition_name} orders."


def _done_message(order: AbstractOrder, name: str) -> str:
    if name == "refund":
        return f"Order {order.pk} was refunded ({order.refund_ref}) and closed."
    return f"Order {order.pk} was cancelled."


class _Refused(Exception):
    """Why the admin did not run a transition on an order, said to the staff member."""


class _ReadOnlyInline(_Inline):
    """Rows that only services write: shown, never added, changed or deleted here."""

    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: AbstractOrder | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AbstractOrder | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AbstractOrder | None = None) -> bool:
        return False

    def has_view_permission(self, request: HttpRequest, obj: AbstractOrder | None = None) -> bool:
        # Part of the order's page, which already requires a permission on orders:
        # whoever may see an order may see its history without a permission of its own.
        return True


class OrderTransitionInline(_ReadOnlyInline):
    model = OrderTransition
    verbose_name_plural = "history"
    fields = readonly_fields = (
        "transition",
        "source",
        "target",
        "actor",
        "reason",
        "at",
        "event_type",
        "delivered",
    )

    @admin.display(description="heard")
    def delivered(self, row: OrderTransition) -> str:
        # What the shop's receivers made of the event (orders.events): a parked delivery
        # leaves the event not owed, yet not heard either.
        if row.next_dispatch_at is not None:
            return "owed"
        if any(delivery.parked_at is not None for delivery in row.deliveries.all()):
            return "parked"
        return "yes" if row.owed_to else "no receiver"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        return super().get_queryset(request).prefetch_related("deliveries")


class PaymentInline(_ReadOnlyInline):
    model = Payment
    fields = readonly_fields = (
        "reference",
        "amount",
        "currency",
        "outcome",
        "received_at",
        "refunded_at",
        "refund_ref",
    )


#: A payment attempt's columns, on its order's page and in its own list.
ATTEMPT_FIELDS = (
    "reference",
    "method",
    "outcome",
    "started_at",
    "hold_until",
    "cap_at",
    "closed_at",
    "detail",
    "closed_at_provider",
)


class PaymentAttemptInline(_ReadOnlyInline):
    """The customer's attempts to pay (``services.start_payment``), oldest first: an open
    one holds the order until its hold ends, then the provider is asked until its cap."""

    model = PaymentAttempt
    fields = readonly_fields = ATTEMPT_FIELDS


class ParcelEventInline(_ReadOnlyInline):
    model = ParcelEvent
    verbose_name = "logistics event"
    verbose_name_plural = "logistics events"
    fields = readonly_fields = ("status", "source", "at")


class OrderChangeList(ChangeList):
    """The admin's order list (and the payment attempts'), except that two kinds of filter
    are bad lookups like any other, answered with the list and ``?e=1`` instead of a 500:
    a date-hierarchy link
    outside the calendar (``?created_at__year=9999``, whose next year does not exist, or
    a day past the last one: a ValueError or an OverflowError), and a value with a NUL
    (``?status__exact=%00``: a DataError on PostgreSQL when the list is read)."""

    def get_filters(self, request: HttpRequest) -> Any:
        values = self.get_filters_params().values()
        if any("\x00" in value for given in values for value in given):
            raise IncorrectLookupParameters("A filter value contains a NUL character.")
        try:
            return super().get_filters(request)
        except (ValueError, OverflowError) as exc:
            raise IncorrectLookupParameters(exc) from exc


def _selected_across(request: HttpRequest) -> bool:
    """Whether the action was asked for "all N orders" of the list rather than the ticked
    ones, read as Django's action form reads it."""
    return bool(forms.BooleanField(required=False).clean(request.POST.get("select_across")))


# Filters


class ExpiringSoonFilter(admin.SimpleListFilter):
    title = "deadline"
    parameter_name = "expiring"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("hour", "Expiring within the hour")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "hour":
            return selectors.expiring_orders(queryset)
        return queryset


class HeldByPaymentFilter(admin.SimpleListFilter):
    """Unpaid orders a customer is paying right now: an open payment attempt holds them
    (their deadline may be the hold's end; past it the provider is asked first)."""

    title = "payment in progress"
    parameter_name = "held"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Held by a payment attempt")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "yes":
            return selectors.held_orders(queryset)
        return queryset


class LatePaymentFilter(admin.SimpleListFilter):
    """Orders that received a payment that did not pay them: late (after the order was
    cancelled, what the overview counts), or any such (late, surplus or mismatched).
    Each is refunded by a task; "awaiting refund" lists those whose refund has not run."""

    title = "late payments"
    parameter_name = "late_payment"
    _choices: dict[str, dict[str, Any]] = {
        "late": {"outcome": Payment.Outcome.LATE},
        "any": {},
        "refunded": {"refunded": True},
        "awaiting": {"refunded": False},
    }

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [
            ("late", "Arrived after the order was cancelled"),
            ("any", "Any payment that did not pay its order"),
            ("refunded", "Refunded"),
            ("awaiting", "Awaiting refund"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value not in self._choices:
            return queryset
        return selectors.with_unaccepted_payments(queryset, **self._choices[value])


def _shop_fields() -> tuple[str, ...]:
    """The fields a shop's own order model adds to the lifecycle's (a customer, a channel)."""
    lifecycle = {field.name for field in AbstractOrder._meta.local_fields}
    return tuple(f.name for f in get_order_model()._meta.fields if f.name not in lifecycle)


class OrderAdmin(_ModelAdmin):
    change_form_template = "admin/orders/order/change_form.html"
    change_list_template = "admin/orders/order/change_list.html"
    # Short enough to fit beside the filters on a laptop: a short id and times of day
    # (the full values are in the cells' titles and on the order's page).
    list_display = (
        "short_id",
        "status_badge",
        "amount_with_currency",
        "deadline",
        "time_left_display",
        "placed",
    )
    list_filter = (
        "status",
        "cancel_reason",
        ExpiringSoonFilter,
        HeldByPaymentFilter,
        LatePaymentFilter,
        "currency",
    )
    # "id" uses icontains, which Django's UUIDField accepts with or without hyphens on
    # every database, so a full id and a pasted fragment both find the order.
    # The shop's reference and metadata too: a shop that keeps its own order table finds
    # ours by its own id.
    search_fields = ("id", "reference", "payment_ref", "tracking_number", "metadata")
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    list_per_page = 50
    # No column follows a relation: nothing to join, no query per row.
    list_select_related = False
    # Spare every filtered or searched page a COUNT(*) of the whole table.
    show_full_result_count = False
    actions = ("cancel_selected", "refund_selected")

    fieldsets = (
        (None, {"fields": ("id", "status", "cancel_reason", ("amount", "currency"))}),
        ("Shop's link", {"fields": ("reference", "metadata")}),
        (
            "Deadline",
            {
                "fields": (
                    "created_at",
                    "expires_at",
                    "time_left_display",
                    "timer_armed_for",
                )
            },
        ),
        (
            "Payment, shipment, refund",
            {
                "fields": (
                    ("paid_at", "payment_ref"),
                    ("delivered_at", "tracking_number"),
                    ("refunded_at", "refund_ref"),
                    "parcel_status",
                    "cancelled_at",
                    "updated_at",
                )
            },
        ),
        ("Webhooks", {"fields": ("webhook_deliveries",)}),
    )
    readonly_fields = (
        *(f.name for f in get_order_model()._meta.fields),
        "time_left_display",
        "shops_deadline",
        "webhook_deliveries",
    )
    inlines = (PaymentInline, PaymentAttemptInline, ParcelEventInline, OrderTransitionInline)

    class Media:
        # Counts every unpaid order's time left down, once a second.
        js = ("orders/time_left.js",)
        css = {"all": ("orders/admin.css",)}

    # Columns

    @admin.display(description="order", ordering="id")
    def short_id(self, obj: AbstractOrder) -> SafeString:
        # Eight hex digits tell orders apart at a glance; search finds a pasted fragment.
        return format_html('<span class="orders-id" title="{}">{}</span>', obj.pk, str(obj.pk)[:8])

    @admin.display(description="deadline", ordering="expires_at")
    def deadline(self, obj: AbstractOrder) -> SafeString:
        return _time_cell(obj.expires_at)

    @admin.display(description="placed", ordering="created_at")
    def placed(self, obj: AbstractOrder) -> SafeString:
        return _time_cell(obj.created_at, seconds=False)

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: AbstractOrder) -> SafeString:
        return format_html(
            '<span class="orders-badge" style="background:{}">{}</span>',
            STATUS_COLOURS.get(obj.status, "#333"),
            obj.get_status_display(),
        )

    @admin.display(description="amount", ordering="amount")
    def amount_with_currency(self, obj: AbstractOrder) -> str:
        return f"{obj.amount} {obj.currency}"

    @admin.display(description="time left")
    def time_left_display(self, obj: AbstractOrder, now: datetime | None = None) -> str:
        now = now or timezone.now()
        seconds = obj.time_left(now)
        if seconds is None:
            return "—"
        # The page's script counts down from the deadline, against the server's clock.
        return format_html(
            '<span class="orders-time-left" data-deadline="{}" data-now="{}">{}</span>',
            obj.expires_at.isoformat(timespec="milliseconds"),
            now.isoformat(timespec="milliseconds"),
            selectors.format_duration(seconds) if seconds > 0 else "overdue",
        )

    @admin.display(description="shop's deadline")
    def shops_deadline(self, obj: AbstractOrder) -> str:
        if obj.original_expires_at is None:
            return "—"
        local = timezone.localtime(obj.original_expires_at)
        return (
            f"{dateformat.format(local, 'Y-m-d H:i:s T')}: a payment attempt held the order "
            "(expires at is the later of this and its hold)"
        )

    @admin.display(description="deliveries")
    def webhook_deliveries(self, obj: AbstractOrder) -> SafeString:
        return order_webhook_deliveries(self.admin_site, obj)

    # Orders are created and changed only by orders.services.

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: models.Model | None = None) -> bool:
        return False

    # A bulk action, like a button, is a change that needs its transition's permission.

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        return self.has_change_permission(request) and request.user.has_perm(
            permission_name(self.model, "cancel_order")
        )

    def has_refund_permission(self, request: HttpRequest) -> bool:
        return self.has_change_permission(request) and request.user.has_perm(
            permission_name(self.model, "refund_order")
        )

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        fieldsets = list(super().get_fieldsets(request, obj))
        if obj is not None and obj.original_expires_at is not None:
            # Held by a payment attempt: the shop's own deadline beside the effective one.
            fieldsets = [
                (
                    name,
                    {
                        **options,
                        "fields": tuple(
                            ("expires_at", "shops_deadline") if f == "expires_at" else f
                            for f in options["fields"]
                        ),
                    },
                )
                for name, options in fieldsets
            ]
        # A shop's own order model shows its own fields too, below the lifecycle's.
        shop = [("Shop", {"fields": _shop_fields()})] if _shop_fields() else []
        return [*fieldsets, *shop]

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return OrderChangeList

    def save_model(
        self, request: HttpRequest, obj: models.Model, form: ModelForm[Any], change: bool
    ) -> None:
        # Pressing a transition button submits the change form. Every field is read-only,
        # and saving here would write back the row as this request read it, outside the
        # services' row lock, over whatever a timer or a payment did since.
        pass

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        # Nothing on the page can be saved: leave only the transition buttons.
        order = self.get_object(request, unquote(object_id))
        context = {
            "show_save": False,
            "show_save_and_continue": False,
            "transition_param": TRANSITION_PARAM,
            "transitions": [
                {
                    "name": t.name,
                    "label": t.custom["label"],
                    "help_text": t.custom.get("help_text", ""),
                }
                for t in (self.admin_transitions(request, order) if order is not None else [])
            ],
            **(extra_context or {}),
        }
        return super().change_view(request, object_id, form_url, context)

    # The overview

    def get_urls(self) -> list[URLPattern]:
        # Before the model's own URLs, whose "<path:object_id>/" would take ours.
        name = f"{self.opts.app_label}_{self.opts.model_name}"
        return [
            path(
                "overview/",
                self.admin_site.admin_view(self.overview_view),
                name=f"{name}_overview",
            ),
            path(
                "<path:object_id>/transition/<str:transition_name>/",
                self.admin_site.admin_view(self.transition_view),
                name=f"{name}_transition",
            ),
            *super().get_urls(),
        ]

    def overview_view(self, request: HttpRequest) -> HttpResponse:
        """Counts per status, what expires within the hour, expiries and late payments per
        hour over the last day, and what the last sweep found."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        now = timezone.now()
        changelist = reverse(
            f"{self.admin_site.name}:{self.opts.app_label}_{self.opts.model_name}_changelist"
        )
        counts = selectors.status_counts()
        expiring = selectors.expiring_orders(now=now)
        activity = selectors.hourly_activity(now=now)
        context = {
            **self.admin_site.each_context(request),
            "title": "Orders overview",
            "opts": self.opts,
            "media": self.media,
            "changelist_url": changelist,
            "statuses": [
                {
                    "label": Status(status).label,
                    "count": count,
                    "colour": STATUS_COLOURS[Status(status)],
                    "url": f"{changelist}?status__exact={status}",
                }
                for status, count in counts.items()
            ],
            "total": sum(counts.values()),
            "expiring_count": expiring.count(),
            "expiring_next": [
                (order, self.time_left_display(order, now)) for order in expiring[:10]
            ],
            "expiring_url": f"{changelist}?{ExpiringSoonFilter.parameter_name}=hour",
            # The link and its count are one query: what the filter lists.
            "late_url": f"{changelist}?{LatePaymentFilter.parameter_name}=late",
            "late_orders": selectors.with_unaccepted_payments(outcome=Payment.Outcome.LATE).count(),
            "chart": _chart(activity),
            "chart_peak": max((max(h.expiries, h.late_payments) for h in activity), default=0),
            "chart_totals": {
                "expiries": sum(h.expiries for h in activity),
                "late_payments": sum(h.late_payments for h in activity),
            },
            "sweep": selectors.sweep_health(now=now),
            "sweep_interval": get_settings().SWEEP_INTERVAL,
            "events": selectors.event_backlog(now=now),
            "deliveries_url": reverse(f"{self.admin_site.name}:orders_eventdelivery_changelist"),
        }
        return TemplateResponse(request, "admin/orders/order/overview.html", context)

    # Bulk actions

    @admin.action(description="Cancel selected unpaid orders", permissions=["cancel"])
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[AbstractOrder]) -> None:
        done, refused = self._run_each(
            request, queryset, "cancel", reason="cancelled in bulk from the order list"
        )
        self._report(request, done, refused, "Cancelled")

    @admin.action(description="Refund selected orders", permissions=["refund"])
    def refund_selected(
        self, request: HttpRequest, queryset: QuerySet[AbstractOrder]
    ) -> TemplateResponse | None:
        """Ask for one reason on a confirmation page (as "delete selected" asks for a
        confirmation), then refund the orders one by one.

        Money leaves with each one, so a bulk refund takes at most ``BULK_REFUND_LIMIT``
        orders, ticked one by one: never "all N orders" of a filter, whose N nobody saw."""
        limit = get_settings().BULK_REFUND_LIMIT
        refusal = None
        if _selected_across(request):
            refusal = (
                "Refunds cannot be made for all the orders of the list at once. "
                f"Tick the orders to refund (at most {limit}). Nothing was refunded."
            )
        elif (count := queryset.count()) > limit:
            refusal = (
                f"{count} orders were selected, but a bulk refund takes at most {limit} "
                "(ORDERS['BULK_REFUND_LIMIT']). Select fewer. Nothing was refunded."
            )
        if refusal is not None:
            log_event(
                logger,
                "admin.bulk_refund_refused",
                "Bulk refund by {actor} refused: {refusal}",
                level=logging.WARNING,
                actor=str(request.user),
                refusal=refusal,
            )
            self.message_user(request, refusal, level=messages.ERROR)
            return None
        form = ReasonForm(request.POST if "post" in request.POST else None)
        if form.is_valid():
            done, refused = self._run_each(
                request, queryset, "refund", reason=form.cleaned_data["reason"]
            )
            _log_bulk_refund(request, done, refused)
            self._report(request, done, refused, "Refunded and closed")
            return None
        orders = [
            (order, fsm.can_proceed(order.refund)) for order in queryset.order_by("-created_at")
        ]
        context = {
            **self.admin_site.each_context(request),
            "title": "Refund the selected orders",
            "subtitle": None,
            "opts": self.opts,
            "media": self.media,
            "orders": orders,
            "refundable": sum(ok for _, ok in orders),
            "form": form,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(
            request, "admin/orders/order/refund_selected_confirmation.html", context
        )

    def _run_each(
        self, request: HttpRequest, queryset: QuerySet[AbstractOrder], name: str, *, reason: str
    ) -> tuple[list[AbstractOrder], list[str]]:
        # One service call, so one transaction, per order: a refused order leaves the
        # others done, as a staff member doing them one by one would have.
        done, refused = [], []
        for order in queryset.order_by("created_at"):
            try:
                done.append(self._run_transition(request, order, name, reason=reason))
            except _Refused as exc:
                refused.append(str(exc))
        return done, refused

    def _report(
        self, request: HttpRequest, done: Sequence[AbstractOrder], refused: Sequence[str], verb: str
    ) -> None:
        if done:
            ids = ", ".join(str(order.pk) for order in done[:MAX_REPORTED])
            more = f" and {len(done) - MAX_REPORTED} more" if len(done) > MAX_REPORTED else ""
            self.message_user(
                request,
                f"{verb} {len(done)} order{'s' if len(done) != 1 else ''}: {ids}{more}.",
                level=messages.SUCCESS,
            )
        for message in refused[:MAX_REPORTED]:
            self.message_user(request, message, level=messages.ERROR)
        if len(refused) > MAX_REPORTED:
            self.message_user(
                request,
                f"{len(refused) - MAX_REPORTED} more orders were refused as well.",
                level=messages.ERROR,
            )

    # Transitions: two views of our own behind get_urls(), as Django's UserAdmin does
    # for passwords, so that only public APIs are used and every button goes through
    # the permission check and the service in _run_transition().

    def admin_transitions(self, request: HttpRequest, order: AbstractOrder) -> list[fsm.Transition]:
        """The buttons this user gets on this order: the admin's transitions that the
        state machine allows now and the user has the permission for."""
        if not self.has_change_permission(request, order):
            return []
        return [
            transition
            for transition in order.get_available_user_status_transitions(  # type: ignore[attr-defined]
                user=request.user
            )
            if transition.name in _ADMIN_TRANSITIONS
        ]

    def response_change(self, request: HttpRequest, obj: AbstractOrder) -> HttpResponse:
        # A transition button submits the change form; its page asks for the reason.
        name = request.POST.get(TRANSITION_PARAM)
        if not name:
            return super().response_change(request, obj)
        return redirect(self._transition_url(obj, self._transition_named(obj, name).name))

    def transition_view(
        self, request: HttpRequest, object_id: str, transition_name: str
    ) -> HttpResponse:
        """The page of one transition: its reason form, then the service."""
        order = self.get_object(request, unquote(object_id))
        if order is None:
            raise Http404(f"No order with id {object_id!r}.")
        if not self.has_change_permission(request, order):
            raise PermissionDenied
        transition = self._transition_named(order, transition_name)
        change_url = reverse(
            f"{self.admin_site.name}:{self.opts.app_label}_{self.opts.model_name}_change",
            args=[quote(order.pk)],
        )
        try:
            self._check_transition(request, order, transition.name)
            form = import_string(transition.custom["form"])(
                request.POST if request.method == "POST" else None
            )
            if form.is_valid():
                order = self._run_transition(
                    request, order, transition.name, reason=form.cleaned_data["reason"]
                )
                self.message_user(request, _done_message(order, transition.name), messages.SUCCESS)
                return redirect(change_url)
        except _Refused as exc:
            self.message_user(request, str(exc), level=messages.ERROR)
            return redirect(change_url)
        context = {
            **self.admin_site.each_context(request),
            "title": f"{transition.custom['label']} order {order.pk}",
            "opts": self.opts,
            "original": order,
            "transition": {
                "name": transition.name,
                "label": transition.custom["label"],
                "help_text": transition.custom.get("help_text"),
            },
            "transition_form": form,
        }
        return TemplateResponse(request, "admin/orders/order/transition_form.html", context)

    def _transition_named(self, order: AbstractOrder, name: str) -> fsm.Transition:
        # The name comes from the request: only a transition of the lifecycle is one.
        for transition in order.get_all_status_transitions():  # type: ignore[attr-defined]
            if transition.name == name:
                return transition
        raise Http404(f"Orders have no transition named {name!r}.")

    def _transition_url(self, order: AbstractOrder, name: str) -> str:
        return reverse(
            f"{self.admin_site.name}:{self.opts.app_label}_{self.opts.model_name}_transition",
            kwargs={"object_id": quote(order.pk), "transition_name": name},
        )

    def _check_transition(self, request: HttpRequest, order: AbstractOrder, name: str) -> None:
        """Raise ``_Refused`` unless this user may run ``name`` on ``order`` now."""
        user = request.user
        if name not in _ADMIN_TRANSITIONS or not isinstance(user, AbstractBaseUser):
            raise _Refused(f"“{name}” cannot be done from the admin.")
        method = getattr(order, name)
        if not fsm.has_transition_perm(method, user):
            if fsm.can_proceed(method):
                raise _Refused(NOT_ALLOWED.format(transition_name=name))
            raise _Refused(
                f"Order {order.pk} is {order.get_status_display().lower()}"
                f": it cannot be {_ADMIN_TRANSITIONS[name]}."
            )

    def _run_transition(
        self, request: HttpRequest, order: AbstractOrder, name: str, *, reason: str
    ) -> AbstractOrder:
        """The one way the admin moves an order, from a button or a bulk action: check the
        transition's permission, then call its service. Raises ``_Refused`` with the reason."""
        self._check_transition(request, order, name)
        user = cast(AbstractBaseUser, request.user)
        try:
            if name == "refund":
                return services.refund_order(order_id=order.pk, by=user, reason=reason)
            return services.cancel_order(
                order_id=order.pk, by=user, reason=reason, cancel_reason=CancelReason.STAFF
            )
        except services.OrderError as exc:
            # Most service messages speak of "this one"; say which, for the bulk actions.
            message = str(exc)
            raise _Refused(
                message if str(order.pk) in message else f"Order {order.pk}: {message}"
            ) from exc
        except GatewayError as exc:
            raise _Refused(
                f"The payment gateway did not refund order {order.pk}: "
                f"{exc}. The order is unchanged; try again later."
            ) from exc


def _log_bulk_refund(
    request: HttpRequest, done: Sequence[AbstractOrder], refused: Sequence[str]
) -> None:
    """One line per bulk refund: who refunded how many orders, and how much per currency."""
    totals: defaultdict[str, Decimal] = defaultdict(Decimal)
    for order in done:
        totals[order.currency] += order.amount
    amounts = {currency: str(total) for currency, total in sorted(totals.items())}
    log_event(
        logger,
        "admin.bulk_refund",
        "Bulk refund by {actor}: {refunded} orders refunded ({shown}), {refused} refused.",
        actor=str(request.user),
        refunded=len(done),
        refused=len(refused),
        totals=amounts,
        shown=", ".join(f"{total} {currency}" for currency, total in amounts.items()) or "nothing",
    )


def _time_cell(at: datetime, *, seconds: bool = True) -> SafeString:
    """The time of day for today, else the date and time; the full moment in the title."""
    local, today = timezone.localtime(at), timezone.localdate()
    time_format = "H:i:s" if seconds else "H:i"
    short = dateformat.format(local, time_format if local.date() == today else "M j, H:i")
    return format_html(
        '<span title="{}">{}</span>', dateformat.format(local, "Y-m-d H:i:s T"), short
    )


def _chart(activity: Sequence[selectors.HourlyActivity]) -> list[dict[str, Any]]:
    """The overview's bars, as heights in percent of the busiest hour."""
    peak = max((max(h.expiries, h.late_payments) for h in activity), default=0)

    def height(n: int) -> int:
        # A non-zero hour stays visible however busy the busiest one was.
        return max(2, round(100 * n / peak)) if n else 0

    return [
        {
            "hour": h.hour,
            "label": f"{h.hour:%H}",
            "expiries": h.expiries,
            "late_payments": h.late_payments,
            "expiries_height": height(h.expiries),
            "late_height": height(h.late_payments),
        }
        for h in activity
    ]


# The project's order model, whichever it is (ORDERS_ORDER_MODEL).
admin.site.register(get_order_model(), OrderAdmin)


class OfAnEvent:
    """List columns of a delivery (to a receiver or an endpoint): its event, its order."""

    admin_site: admin.AdminSite

    @admin.display(description="event", ordering="event__event_type")
    def event_type(self, obj: EventDelivery | WebhookDelivery) -> str:
        return obj.event.event_type

    @admin.display(description="order")
    def order_link(self, obj: EventDelivery | WebhookDelivery) -> SafeString:
        opts = get_order_model()._meta
        url = reverse(
            f"{self.admin_site.name}:{opts.app_label}_{opts.model_name}_change",
            args=[quote(obj.event.order_id)],
        )
        return format_html('<a href="{}">{}</a>', url, str(obj.event.order_id)[:8])


# Outbound webhooks ---------------------------------------------------------------------------
# Endpoints (managed here, so that a shop in another language subscribes without a deploy),
# their deliveries with every attempt, and "Send again". Sending is orders.outbound's.

if TYPE_CHECKING:
    _EndpointAdmin = admin.ModelAdmin[WebhookEndpoint]
    _DeliveryAdmin = admin.ModelAdmin[WebhookDelivery]
else:
    _EndpointAdmin = _DeliveryAdmin = admin.ModelAdmin

#: The deliveries shown on an endpoint's page and on an order's page, newest first.
RECENT_DELIVERIES = 20


def _with_last_attempt(deliveries: QuerySet[WebhookDelivery]) -> QuerySet[WebhookDelivery]:
    """Each delivery with its last attempt's status, error, latency and time (one query)."""
    last = WebhookAttempt.objects.filter(delivery=OuterRef("pk")).order_by("-at", "-id")
    return deliveries.annotate(
        last_status=Subquery(last.values("status_code")[:1]),
        last_error=Subquery(last.values("error")[:1]),
        last_latency=Subquery(last.values("latency_ms")[:1]),
        last_at=Subquery(last.values("at")[:1]),
    )


def _outcome(status: int | None, error: str | None, latency: float | None = None) -> str:
    """An attempt in a few words: ``HTTP 500 in 12 ms``, or its error."""
    if status is None and not error:
        return "—"
    said = f"HTTP {status}" if status is not None else (error or "")[:80]
    return f"{said} in {latency:.0f} ms" if latency is not None else said


def _delivery_state(delivery: WebhookDelivery) -> str:
    if delivery.delivered_at is not None:
        return "delivered"
    if delivery.gave_up_at is not None:
        return "given up"
    return f"retrying ({delivery.attempts} failed)" if delivery.attempts else "pending"


def _deliveries_table(site: admin.AdminSite, deliveries: QuerySet[WebhookDelivery]) -> SafeString:
    """The most recent deliveries as a small table, each linked to its page."""
    rows = list(
        _with_last_attempt(deliveries)
        .select_related("event", "endpoint")
        .order_by("-created_at", "-id")[:RECENT_DELIVERIES]
    )
    if not rows:
        return format_html("<p>{}</p>", "No webhook deliveries.")
    body = format_html_join(
        "",
        '<tr><td><a href="{}">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>'
        "<td>{}</td></tr>",
        (
            (
                reverse(f"{site.name}:orders_webhookdelivery_change", args=[d.pk]),
                d.event.event_type,
                d.endpoint,
                _delivery_state(d),
                d.attempts,
                _outcome(d.last_status, d.last_error, d.last_latency),  # type: ignore[attr-defined]
                _time_cell(d.last_at) if d.last_at else "—",  # type: ignore[attr-defined]
            )
            for d in rows
        ),
    )
    return format_html(
        '<table class="orders-webhooks"><thead><tr><th>event</th><th>endpoint</th>'
        "<th>state</th><th>failed attempts</th><th>last attempt</th><th>at</th></tr></thead>"
        "<tbody>{}</tbody></table>",
        body,
    )


def order_webhook_deliveries(site: admin.AdminSite, order: AbstractOrder) -> SafeString:
    """The section of the order's page with its webhook deliveries (``OrderAdmin``)."""
    return _deliveries_table(site, WebhookDelivery.objects.filter(event__order_id=order.pk))


class WebhookEndpointAdmin(_EndpointAdmin):
    form = WebhookEndpointForm
    list_display = ("url", "description", "active", "event_types_display", "last_attempt")
    list_filter = ("active",)
    search_fields = ("url", "description")
    list_select_related = False  # the last attempt is an annotation: no query per row

    def get_fields(self, request: HttpRequest, obj: WebhookEndpoint | None = None) -> Any:
        # The secret is made when the endpoint is saved; then shown, for staff to copy.
        fields = ["url", "description", "event_types", "active"]
        return fields if obj is None else [*fields, "secret", "recent_deliveries"]

    def get_readonly_fields(self, request: HttpRequest, obj: WebhookEndpoint | None = None) -> Any:
        return () if obj is None else ("secret", "recent_deliveries")

    def get_queryset(self, request: HttpRequest) -> QuerySet[WebhookEndpoint]:
        last = WebhookAttempt.objects.filter(delivery__endpoint=OuterRef("pk")).order_by(
            "-at", "-id"
        )
        return (
            super()
            .get_queryset(request)
            .annotate(
                last_status=Subquery(last.values("status_code")[:1]),
                last_error=Subquery(last.values("error")[:1]),
                last_at=Subquery(last.values("at")[:1]),
            )
        )

    @admin.display(description="event types")
    def event_types_display(self, obj: WebhookEndpoint) -> str:
        return ", ".join(obj.event_types) or "all"

    @admin.display(description="last attempt", ordering="last_at")
    def last_attempt(self, obj: WebhookEndpoint) -> str:
        if obj.last_at is None:  # type: ignore[attr-defined]
            return "—"
        return format_html(
            "{} ({})",
            _outcome(obj.last_status, obj.last_error),  # type: ignore[attr-defined]
            _time_cell(obj.last_at),  # type: ignore[attr-defined]
        )

    @admin.display(description="recent deliveries")
    def recent_deliveries(self, obj: WebhookEndpoint) -> SafeString:
        return _deliveries_table(self.admin_site, obj.deliveries.all())


class WebhookAttemptInline(_ReadOnlyInline):
    model = WebhookAttempt
    verbose_name_plural = "attempts"
    fields = readonly_fields = ("at", "status_code", "latency_ms", "error")


class DeliveryStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"
    _choices: dict[str, dict[str, Any]] = {
        "delivered": {"delivered_at__isnull": False},
        "failing": {"delivered_at__isnull": True, "gave_up_at__isnull": True, "attempts__gt": 0},
        "given_up": {"gave_up_at__isnull": False},
        "pending": {"delivered_at__isnull": True, "gave_up_at__isnull": True, "attempts": 0},
    }

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [
            ("delivered", "Delivered"),
            ("failing", "Failing, will be retried"),
            ("given_up", "Given up"),
            ("pending", "Not tried yet"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(**self._choices.get(self.value() or "", {}))


class WebhookDeliveryAdmin(OfAnEvent, _DeliveryAdmin):
    list_display = (
        "id",
        "event_type",
        "order_link",
        "endpoint",
        "state",
        "attempts",
        "last_attempt",
        "next_attempt_at",
        "created_at",
    )
    list_filter = (DeliveryStateFilter, "endpoint")
    search_fields = ("=event__event_id", "=event__order_id", "endpoint__url")
    list_select_related = ("event", "endpoint")
    show_full_result_count = False
    actions = ("send_again",)
    fields = readonly_fields = (
        "webhook_id",
        "event_type",
        "order_link",
        "endpoint",
        "state",
        "attempts",
        "next_attempt_at",
        "delivered_at",
        "gave_up_at",
        "created_at",
    )
    inlines = (WebhookAttemptInline,)

    def get_queryset(self, request: HttpRequest) -> QuerySet[WebhookDelivery]:
        return _with_last_attempt(super().get_queryset(request))

    # Written by orders.outbound only; staff look, and send again.

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(
        self, request: HttpRequest, obj: WebhookDelivery | None = None
    ) -> bool:
        return False

    def has_delete_permission(
        self, request: HttpRequest, obj: WebhookDelivery | None = None
    ) -> bool:
        return False

    def has_send_again_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(permission_name(WebhookDelivery, "change_webhookdelivery"))

    @admin.display(description="webhook-id")
    def webhook_id(self, obj: WebhookDelivery) -> str:
        return str(obj.event.event_id)

    @admin.display(description="state")
    def state(self, obj: WebhookDelivery) -> str:
        return _delivery_state(obj)

    @admin.display(description="last attempt")
    def last_attempt(self, obj: WebhookDelivery) -> str:
        return _outcome(obj.last_status, obj.last_error, obj.last_latency)  # type: ignore[attr-defined]

    @admin.action(description="Send again", permissions=["send_again"])
    def send_again(self, request: HttpRequest, queryset: QuerySet[WebhookDelivery]) -> None:
        chosen = list(queryset.select_related(None).only("id"))
        queued = outbound.send_again(chosen)
        if queued:
            self.message_user(
                request,
                f"{queued} deliver{'y' if queued == 1 else 'ies'} will be sent again now, "
                "with the same webhook-id.",
                messages.SUCCESS,
            )
        if len(chosen) > queued:
            self.message_user(
                request,
                f"{len(chosen) - queued} deliver{'y' if len(chosen) - queued == 1 else 'ies'} "
                "not sent again: their endpoint is inactive. Activate it first.",
                messages.WARNING,
            )
        log_event(
            logger,
            "admin.webhooks_sent_again",
            "{actor} sent {queued} webhook deliveries again.",
            actor=str(request.user),
            queued=queued,
        )


admin.site.register(WebhookEndpoint, WebhookEndpointAdmin)
admin.site.register(WebhookDelivery, WebhookDeliveryAdmin)


# Events: what the shop's receivers were told ------------------------------------------


class EventDeliveryStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("parked", "Parked"), ("retrying", "Retrying"), ("delivered", "Delivered")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        undelivered = queryset.filter(delivered_at__isnull=True)
        return {
            "parked": undelivered.filter(parked_at__isnull=False),
            "retrying": undelivered.filter(parked_at__isnull=True),
            "delivered": queryset.filter(delivered_at__isnull=False),
        }.get(self.value() or "", queryset)


@admin.register(EventDelivery)
class EventDeliveryAdmin(OfAnEvent, _EventDeliveryAdmin):
    """Each event as each receiver took it (or did not). Read-only: the one thing staff
    do here is retry parked deliveries once the receiver is fixed."""

    list_display = (
        "event_type",
        "order_link",
        "receiver",
        "state",
        "attempts",
        "next_attempt_at",
        "short_error",
    )
    list_filter = (EventDeliveryStateFilter, "receiver")
    list_select_related = ("event",)
    search_fields = ("receiver", "=event__event_id", "=event__order__id")
    ordering = ("-id",)
    actions = ("retry_selected",)
    readonly_fields = (
        "event",
        "receiver",
        "attempts",
        "delivered_at",
        "next_attempt_at",
        "parked_at",
        "last_error",
        "created_at",
    )

    @admin.display(description="state")
    def state(self, delivery: EventDelivery) -> str:
        if delivery.delivered_at is not None:
            return "delivered"
        return "parked" if delivery.parked_at is not None else "retrying"

    @admin.display(description="last error")
    def short_error(self, delivery: EventDelivery) -> str:
        return delivery.last_error[:80]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.action(description="Retry selected parked deliveries", permissions=["change"])
    def retry_selected(self, request: HttpRequest, queryset: QuerySet[EventDelivery]) -> None:
        parked = queryset.filter(parked_at__isnull=False, delivered_at__isnull=True)
        retried = events.retry_parked(parked.select_related("event"))
        log_event(
            logger,
            "admin.retry_parked",
            "{actor} retried {retried} parked event deliveries.",
            actor=str(request.user),
            retried=retried,
        )
        skipped = queryset.count() - retried
        self.message_user(
            request,
            f"{retried} parked {'delivery' if retried == 1 else 'deliveries'} queued again"
            + (f"; {skipped} not parked, left alone." if skipped else "."),
            messages.SUCCESS if retried else messages.WARNING,
        )


# Payment attempts: what the customers started paying, and how each ended ----------------


class PaymentAttemptAdmin(_PaymentAttemptAdmin):
    """Every payment attempt, for finding one by its provider's reference and seeing what
    became of it. Read-only, as the history is: only ``orders.services`` writes them."""

    list_display = (
        "reference",
        "method",
        "outcome",
        "order_link",
        "started_at",
        "hold_until",
        "cap_at",
        "closed_at",
        "closed_at_provider",
    )
    list_filter = ("outcome", "method")
    search_fields = ("reference", "=order__id")
    ordering = ("-started_at", "-id")
    date_hierarchy = "started_at"
    # The order's column is its id, which the row has: nothing to join.
    list_select_related = False
    show_full_result_count = False
    fields = readonly_fields = ("order_link", *ATTEMPT_FIELDS, "payment")

    @admin.display(description="order")
    def order_link(self, obj: PaymentAttempt) -> SafeString:
        opts = get_order_model()._meta
        url = reverse(
            f"{self.admin_site.name}:{opts.app_label}_{opts.model_name}_change",
            args=[quote(obj.order_id)],
        )
        return format_html('<a href="{}">{}</a>', url, str(obj.order_id)[:8])

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return OrderChangeList

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(
        self, request: HttpRequest, obj: PaymentAttempt | None = None
    ) -> bool:
        return False

    def has_delete_permission(
        self, request: HttpRequest, obj: PaymentAttempt | None = None
    ) -> bool:
        return False


admin.site.register(PaymentAttempt, PaymentAttemptAdmin)
