"""Forms the admin shows: for transitions that need input, and for webhook endpoints."""

from typing import TYPE_CHECKING, Any

from django import forms

from orders.models import REASON_MAX_LENGTH, WebhookEndpoint
from orders.outbound import RefusedURL, check_url
from orders.signals import SIGNALS

if TYPE_CHECKING:  # ModelForm is generic only in django-stubs, not at run time
    _EndpointModelForm = forms.ModelForm[WebhookEndpoint]
else:
    _EndpointModelForm = forms.ModelForm


class ReasonForm(forms.Form):
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3}),
        max_length=REASON_MAX_LENGTH,
        help_text="Recorded in the order's history.",
    )


class WebhookEndpointForm(_EndpointModelForm):
    """An endpoint as staff type it: the event types ticked from the app's own list, and
    a URL this server may call (``orders.outbound.check_url``)."""

    url = forms.URLField(label="URL", max_length=2000, assume_scheme="https")
    event_types = forms.MultipleChoiceField(
        choices=[(event_type, event_type) for event_type in SIGNALS],
        widget=forms.CheckboxSelectMultiple,
        required=False,
        help_text="The events it hears; none ticked means all of them, including any added later.",
    )

    class Meta:
        model = WebhookEndpoint
        fields = ("url", "description", "event_types", "active")

    def clean_url(self) -> Any:
        url = self.cleaned_data["url"]
        try:
            check_url(url)
        except RefusedURL as exc:
            raise forms.ValidationError(str(exc), code="refused") from exc
        return url
