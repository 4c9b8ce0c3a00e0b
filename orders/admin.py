"""The order page for staff: an order to look at, its history, and Refund / Cancel buttons
that go through ``orders.services`` like every other write."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import TYPE_CHECKING, Any, cast

import django_fsm as fsm
from django.contrib import admin, messages
from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import PermissionDenied
from django.db import models
from django.forms import ModelForm
from django.http import Http404, HttpRequest, HttpResponse
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _
from django_fsm.admin import FSMAdminMixin, FSMObjectTransition

from orders import services
from orders.gateways import GatewayError
from orders.models import CancelReason, Order, OrderTransition, Payment, Status

if TYPE_CHECKING:
    # Django's admin classes are generic only in django-stubs, not at run time. The
    # mixin is a ModelAdmin[Model], so the methods it shares with ours take any Model.
    _ModelAdmin = admin.ModelAdmin[Order]
    _Inline = admin.TabularInline[Any, Order]
else:
    _ModelAdmin, _Inline = admin.ModelAdmin, admin.TabularInline

STATUS_COLOURS = {
    Status.CREATED: "#b26a00",
    Status.PAID: "#1f6fd1",
    Status.DELIVERED: "#2e7d32",
    Status.REFUNDED: "#7b1fa2",
    Status.CANCELLED: "#6b6b6b",
}
# The transitions the admin may run, each through its service; the past tense is for messages.
_ADMIN_TRANSITIONS = {"refund": "refunded", "cancel": "cancelled"}


def format_duration(seconds: float) -> str:
    """``"1d 3h"``, ``"2h 5m"``, ``"12m 30s"``, ``"45s"``: as precise as a glance needs."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


class _ReadOnlyInline(_Inline):
    """Rows that only services write: shown, never added, changed or deleted here."""

    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Order | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Order | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Order | None = None) -> bool:
        return False

    def has_view_permission(self, request: HttpRequest, obj: Order | None = None) -> bool:
        # Part of the order's page, which already requires a permission on orders:
        # whoever may see an order may see its history without a permission of its own.
        return True


class OrderTransitionInline(_ReadOnlyInline):
    model = OrderTransition
    verbose_name_plural = "history"
    fields = readonly_fields = ("transition", "source", "target", "actor", "reason", "at")


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


@admin.register(Order)
class OrderAdmin(FSMAdminMixin, _ModelAdmin):
    fsm_fields = ["status"]
    # Shown by the mixin's transition page, which checks only the permission.
    fsm_transition_not_allowed_msg = _("You do not have permission to {transition_name} orders.")

    list_display = (
        "id",
        "status_badge",
        "amount_with_currency",
        "expires_at",
        "time_left_display",
        "created_at",
    )
    list_filter = ("status", "cancel_reason", "currency")
    # "id" uses icontains, which Django's UUIDField accepts with or without hyphens on
    # every database, so a full id and a pasted fragment both find the order.
    search_fields = ("id", "payment_ref", "tracking_number")
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    list_per_page = 50
    # No column follows a relation: nothing to join, no query per row.
    list_select_related = False
    # Spare every filtered or searched page a COUNT(*) of the whole table.
    show_full_result_count = False

    fieldsets = (
        (None, {"fields": ("id", "status", "cancel_reason", ("amount", "currency"))}),
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
                    "cancelled_at",
                    "updated_at",
                )
            },
        ),
    )
    readonly_fields = (*(f.name for f in Order._meta.fields), "time_left_display")
    inlines = (PaymentInline, OrderTransitionInline)

    # Columns

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: Order) -> SafeString:
        return format_html(
            '<span style="background:{};color:#fff;padding:2px 8px;border-radius:9px;'
            'white-space:nowrap">{}</span>',
            STATUS_COLOURS.get(obj.status, "#333"),
            obj.get_status_display(),
        )

    @admin.display(description="amount", ordering="amount")
    def amount_with_currency(self, obj: Order) -> str:
        return f"{obj.amount} {obj.currency}"

    @admin.display(description="time left")
    def time_left_display(self, obj: Order) -> str:
        seconds = obj.time_left()
        if seconds is None:
            return "—"
        return format_duration(seconds) if seconds > 0 else "overdue"

    # Orders are created and changed only by orders.services.

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: models.Model | None = None) -> bool:
        return False

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
        context = {"show_save": False, "show_save_and_continue": False, **(extra_context or {})}
        return super().change_view(request, object_id, form_url, context)

    # Transitions

    def _get_fsm_extra_context(
        self, *, request: HttpRequest, obj: models.Model | None
    ) -> Generator[FSMObjectTransition]:
        # A button is a change: a user who may only view orders gets none.
        if self.has_change_permission(request, obj):
            yield from super()._get_fsm_extra_context(request=request, obj=obj)

    def _get_fsm_transition_func(self, *, obj: models.Model, transition_name: str) -> Any:
        # The name comes from the request: an unknown one is a 404, not a 500.
        try:
            return super()._get_fsm_transition_func(obj=obj, transition_name=transition_name)
        except (AttributeError, TypeError, ValueError) as exc:
            raise Http404(str(exc)) from exc

    def fsm_transition_view(
        self, request: HttpRequest, object_id: str, transition_name: str, **kwargs: Any
    ) -> HttpResponse:
        if not self.has_change_permission(request):
            raise PermissionDenied
        return super().fsm_transition_view(request, object_id, transition_name, **kwargs)

    def _apply_fsm_transition(
        self,
        *,
        obj: models.Model,
        transition_name: str,
        request: HttpRequest,
        kwargs: Mapping[str, Any] | None = None,
    ) -> bool:
        """Run a button's transition through its service, never ``obj.save()``: the
        service takes the row lock, calls the gateway, closes after a refund and sends
        the signals."""
        order, user = cast(Order, obj), request.user
        if transition_name not in _ADMIN_TRANSITIONS or not isinstance(user, AbstractBaseUser):
            return self._refuse(request, f"“{transition_name}” cannot be done from the admin.")
        method = getattr(order, transition_name)
        # django-fsm-2 runs a posted transition name without checking its permission.
        if not fsm.has_transition_perm(method, user):
            if fsm.can_proceed(method):
                return self._refuse(
                    request,
                    self.fsm_transition_not_allowed_msg.format(transition_name=transition_name),
                )
            return self._refuse(
                request,
                f"Order {order.pk} is {order.get_status_display().lower()}"
                f": it cannot be {_ADMIN_TRANSITIONS[transition_name]}.",
            )
        reason = str((kwargs or {}).get("reason", ""))
        try:
            if transition_name == "refund":
                order = services.refund_order(order_id=order.pk, by=user, reason=reason)
                done = f"Order {order.pk} was refunded ({order.refund_ref}) and closed."
            else:
                order = services.cancel_order(
                    order_id=order.pk, by=user, reason=reason, cancel_reason=CancelReason.STAFF
                )
                done = f"Order {order.pk} was cancelled."
        except services.OrderError as exc:
            return self._refuse(request, str(exc))
        except GatewayError as exc:
            return self._refuse(
                request,
                f"The payment gateway did not refund order {order.pk}: "
                f"{exc}. The order is unchanged; try again later.",
            )
        self.message_user(request, done, level=messages.SUCCESS)
        return True

    def _refuse(self, request: HttpRequest, message: str) -> bool:
        self.message_user(request, message, level=messages.ERROR)
        return False
