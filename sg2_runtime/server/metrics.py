"""Prometheus metrics of the network layer (own registry; ``/metrics`` serves it with the engine's)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .protocol import CLIENT_EVENT_TYPES

_LAG_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5)
_LATENCY_BUCKETS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.connections = Counter(
            "sg2_server_connections",
            "Realtime WebSocket connection attempts, by outcome",
            ["outcome"],
            registry=r,
        )
        self.active = Gauge("sg2_server_active_connections", "Open Realtime WebSocket calls", registry=r)
        self.client_events = Counter(
            "sg2_server_client_events", "Client events received, by type", ["type"], registry=r
        )
        self.errors = Counter("sg2_server_errors", "Error events sent, by code", ["code"], registry=r)
        self.closes = Counter("sg2_server_disconnects", "Calls ended, by reason", ["reason"], registry=r)
        self.input_audio = Counter("sg2_server_input_audio_seconds", "Caller audio received", registry=r)
        self.output_audio = Counter("sg2_server_output_audio_seconds", "Agent audio sent", registry=r)
        self.send_lag = Histogram(
            "sg2_server_send_lag_seconds",
            "Engine event to WebSocket write (the server's own latency)",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.first_audio = Histogram(
            "sg2_server_commit_to_first_audio_seconds",
            "Turn committed to the reply's first audio delta written",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._known_types = frozenset(CLIENT_EVENT_TYPES)

    def client_event(self, type_: object) -> None:
        label = type_ if isinstance(type_, str) and type_ in self._known_types else "other"
        self.client_events.labels(label).inc()
