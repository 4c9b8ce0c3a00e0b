"""The JSON API, the webhooks, and the operators' metrics and health check; the host
project includes these at its root."""

from django.urls import URLPattern, path

from orders import api, health, metrics, openapi, webhooks

app_name = "orders"

urlpatterns: list[URLPattern] = [
    # The OpenAPI description of the API and the webhooks (open, like docs/openapi.json).
    path("api/schema/", openapi.schema_view, name="api-schema"),
    path("api/orders/", api.create_order, name="api-orders"),
    # str, not uuid: a malformed id gets the API's JSON 404, not the host's HTML one.
    path("api/orders/<str:order_id>/", api.order_detail, name="api-order"),
    path("api/orders/<str:order_id>/cancel/", api.cancel_order, name="api-order-cancel"),
    path("api/orders/<str:order_id>/extend/", api.extend_order, name="api-order-extend"),
    path("api/orders/<str:order_id>/ship/", api.ship_order, name="api-order-ship"),
    path(
        "api/orders/<str:order_id>/payment-attempts/",
        api.start_payment,
        name="api-order-payment-attempts",
    ),
    path("webhooks/payment/", webhooks.payment, name="webhook-payment"),
    path("webhooks/logistics/", webhooks.logistics, name="webhook-logistics"),
    # For Prometheus (Bearer API token, or a staff login) and for uptime probes (open).
    path("metrics", metrics.metrics_view, name="metrics"),
    path("health/", health.health_view, name="health"),
]
