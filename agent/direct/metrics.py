"""Prometheus metrics of browser calls (registered in the server's registry under `sg2 serve`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 1.0, 1.5, 2.0, 5.0)
_TRACK_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5)


class DirectMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.offers = Counter(
            "sg2_direct_offers",
            "SDP offers received, by outcome (answered or the error code)",
            ["outcome"],
            registry=r,
        )
        self.active = Gauge("sg2_direct_active_calls", "Browser calls in progress", registry=r)
        self.ended = Counter(
            "sg2_direct_calls_ended", "Browser calls ended, by reason", ["reason"], registry=r
        )
        self.input_audio = Counter("sg2_direct_input_audio_seconds", "Caller audio received", registry=r)
        self.output_audio = Counter("sg2_direct_output_audio_seconds", "Agent audio sent", registry=r)
        self.first_audio = Histogram(
            "sg2_direct_first_audio_seconds",
            "End of the caller's speech (as received) to the reply's first frame sent",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.track_delay = Histogram(
            "sg2_direct_track_delay_seconds",
            "A reply's first audio out of the engine to its first frame sent (the transport's own share)",
            buckets=_TRACK_BUCKETS,
            registry=r,
        )
