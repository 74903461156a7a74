"""Prometheus metrics of one engine (own registry, so several engines can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
_STEP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.5, 1.0)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.active_sessions = Gauge("sg2_active_sessions", "Live sessions", registry=r)
        self.capacity = Gauge("sg2_session_capacity", "Maximum live sessions", registry=r)
        self.queue_depth = Gauge(
            "sg2_command_queue_depth", "Commands waiting for the engine thread", registry=r
        )
        self.sessions_opened = Counter("sg2_sessions_opened", "Sessions opened", registry=r)
        self.sessions_refused = Counter("sg2_sessions_refused", "Sessions refused (capacity)", registry=r)
        self.session_errors = Counter("sg2_session_errors", "Sessions ended by an error", registry=r)
        self.tick_seconds = Histogram(
            "sg2_tick_seconds", "Scheduler tick time", buckets=_STEP_BUCKETS, registry=r
        )
        self.lm_step_seconds = Histogram(
            "sg2_lm_step_seconds", "Batched LM step time", buckets=_STEP_BUCKETS, registry=r
        )
        self.lm_step_batch = Histogram(
            "sg2_lm_step_batch", "Sessions per LM step", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.prefill_positions = Counter("sg2_prefill_positions", "LM positions prefilled", registry=r)
        self.commit_to_first_audio = Histogram(
            "sg2_commit_to_first_audio_seconds",
            "Turn commit to first reply audio",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.endpointing = Histogram(
            "sg2_endpointing_seconds", "End of speech to turn commit", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.first_step = Histogram(
            "sg2_first_step_seconds", "First LM step of a reply", buckets=_STEP_BUCKETS, registry=r
        )
        self.realtime_factor = Gauge(
            "sg2_realtime_factor",
            "Engine busy time / audio time over the last second (<1 is real time)",
            registry=r,
        )
        self.replies = Counter("sg2_replies", "Replies finished, by status", ["status"], registry=r)
