"""What the gateway shows about itself and the cluster: its Prometheus metrics (`metrics`),
model and worker status for the management API (`model_status`), the live feed of model
events (`model_events`), request telemetry (`telemetry`), and the status page's view of the
cluster (`overview`) and its shared live feed (`board`)."""

from __future__ import annotations

from gateway.monitoring.metrics import GatewayMetrics
from gateway.monitoring.model_events import StatusFeed

__all__ = ["GatewayMetrics", "StatusFeed"]
