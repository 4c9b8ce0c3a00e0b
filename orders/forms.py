"""Forms the admin shows for transitions that need input."""

from django import forms

from orders.models import REASON_MAX_LENGTH


class ReasonForm(forms.Form):
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3}),
        max_length=REASON_MAX_LENGTH,
        help_text="Recorded in the order's history.",
    )
