"""An example logistics provider for a carrier with a JSON HTTP API.

Copy it into your project and adapt the paths, the status names and the settings to
your carrier; then select it with ``ORDERS["LOGISTICS_PROVIDER"] = "yourshop.carrier.
HttpCarrier"``. It is tested against a stub carrier in ``tests/test_carrier_example.py``.

The carrier here offers the two calls most do:

    POST {base}/shipments   {"reference": "<order id>"}      -> {"tracking_number": "..."}
         with an Idempotency-Key header, so that a retried booking books once
    GET  {base}/parcels/<tracking number>                     -> {"status": "IN_TRANSIT"}

Errors become ``GatewayError``: the shipping task retries with backoff, and the parcel
poller backs that order off.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from django.conf import settings

from orders.gateways import GatewayError

# The carrier's words for where a parcel is, in ours; anything else is still travelling.
STATUSES = {"DELIVERED": "delivered", "RETURNED": "returned", "RETURNED_TO_SENDER": "returned"}


class HttpCarrier:
    def __init__(self) -> None:
        # settings.CARRIER = {"BASE_URL": ..., "API_KEY": ..., "TIMEOUT": 5}
        options: dict[str, Any] = getattr(settings, "CARRIER", {})
        self.base_url = options["BASE_URL"].rstrip("/")
        self.api_key = options["API_KEY"]
        self.timeout = options.get("TIMEOUT", 5)

    def create_shipment(self, *, order_id: str, idempotency_key: str) -> str:
        answer = self._call(
            "POST", "/shipments", {"reference": order_id}, {"Idempotency-Key": idempotency_key}
        )
        return str(answer["tracking_number"])

    def parcel_status(self, *, tracking_number: str) -> str:
        answer = self._call("GET", f"/parcels/{tracking_number}")
        return STATUSES.get(str(answer.get("status", "")).upper(), "in_transit")

    def _call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        request = urllib.request.Request(
            self.base_url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {self.api_key}",
                "Content-Type": "application/json",
                **(headers or {}),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.load(response)
        except (urllib.error.URLError, TimeoutError, ValueError) as exc:
            raise GatewayError(f"carrier {method} {path} failed: {exc}") from exc
        if not isinstance(answer, dict):
            raise GatewayError(f"carrier {method} {path} answered {answer!r}")
        return answer
