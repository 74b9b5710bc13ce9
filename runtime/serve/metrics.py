"""Prometheus metrics of the speech server (``GET /metrics``), with ``prometheus_client``.

Each app has its own ``CollectorRegistry`` unless given one, so several apps in one process (tests,
Ray replicas sharing a worker) do not collide. Counters and histograms are updated by the routes;
the engine's state (queue depth, running requests, KV slots in use) is read from
``Engine.stats()`` when the endpoint is scraped, so it is never stale.
"""
from __future__ import annotations

from typing import Optional

# Seconds: first audio on a GPU is ~0.1 s, a long request on a CPU minutes.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
SAMPLE_RATE = 24000
PREFIX = "chatterbox_rt"


class ServerMetrics:
    def __init__(self, state, registry=None):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.state = state
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests by route and status code",
                                ("route", "status"), registry=r)
        self.latency = Histogram(f"{PREFIX}_http_request_duration_seconds",
                                 "HTTP request time to the end of the response body, by route", ("route",),
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.first_audio = Histogram(f"{PREFIX}_first_audio_seconds",
                                     "time from submission to the request's first audio chunk",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.speech = Counter(f"{PREFIX}_speech_requests", "speech requests by outcome and response format",
                              ("outcome", "format"), registry=r)
        self.tokens = Counter(f"{PREFIX}_speech_tokens", "speech tokens generated", registry=r)
        self.audio = Counter(f"{PREFIX}_audio_seconds", "seconds of audio produced", registry=r)
        r.register(_EngineCollector(state))

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def observe_speech(self, req, outcome: str, fmt: str) -> None:
        self.speech.labels(outcome=outcome, format=fmt).inc()
        m = req.metrics
        if m.first_audio_ms is not None:
            self.first_audio.observe(m.first_audio_ms / 1e3)
        if m.n_tokens:
            self.tokens.inc(int(m.n_tokens))
        if m.n_samples:
            self.audio.inc(m.n_samples / SAMPLE_RATE)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector:
    """Gauges read from ``Engine.stats()`` at scrape time."""

    def __init__(self, state):
        self.state = state

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        st: Optional[dict] = None
        try:
            st = self.state.engine.stats()
        except Exception:  # noqa: BLE001 - a closed engine has no stats; the gauges are left out
            st = None
        g = GaugeMetricFamily
        yield g(f"{PREFIX}_inflight_requests", "speech requests the server holds (queued, running or sending)",
                value=self.state.inflight)
        yield g(f"{PREFIX}_ready", "1 when warmed up and not draining",
                value=float(self.state.ready.is_set() and not self.state.draining))
        if st is None:
            return
        yield g(f"{PREFIX}_queue_depth", "requests waiting for KV slots", value=st.get("queued", 0))
        yield g(f"{PREFIX}_running_requests", "requests in the engine's T3 or S3Gen stages", value=st.get("running", 0))
        yield g(f"{PREFIX}_kv_slots_in_use", "KV-cache rows held by requests", value=st.get("slots_in_use", 0))
        yield g(f"{PREFIX}_kv_slots_total", "KV-cache rows of the engine", value=st.get("slots_total", 0))
        yield g(f"{PREFIX}_t3_tokens_per_second", "T3 tokens per second over the last steps",
                value=st.get("tokens_per_s", 0.0))
