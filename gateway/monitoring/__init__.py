"""What the gateway shows about itself and the cluster: its Prometheus metrics (`metrics`),
model and worker status for the management API (`model_status`), and the live feed of
model events (`model_events`)."""

from __future__ import annotations

from gateway.monitoring.metrics import GatewayMetrics
from gateway.monitoring.model_events import StatusFeed

__all__ = ["GatewayMetrics", "StatusFeed"]
