"""The server's Prometheus metrics, in a registry of their own (one per server, so several can share a process)."""

from __future__ import annotations

from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    """Requests, errors and latency per endpoint; tokens, audio seconds and images per adapter version; batch sizes
    and attached adapters per base; route decisions; adapter version changes."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("polyadapt_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.errors = Counter("polyadapt_errors", "Requests answered with an error", ["endpoint", "status"], registry=r)
        self.latency = Histogram(
            "polyadapt_request_seconds", "Request latency (to the last byte)", ["endpoint"], buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("polyadapt_prompt_tokens", "Prompt tokens", ["adapter"], registry=r)
        self.completion_tokens = Counter("polyadapt_completion_tokens", "Generated tokens", ["adapter"], registry=r)
        self.audio_seconds = Counter("polyadapt_audio_seconds", "Seconds of audio transcribed", ["adapter"], registry=r)
        self.images = Counter("polyadapt_images", "Images generated", ["adapter"], registry=r)
        self.batch_rows = Histogram(
            "polyadapt_batch_rows", "Rows (requests) per forward pass", ["base"], buckets=BATCH_BUCKETS, registry=r
        )
        self.loaded_adapters = Gauge("polyadapt_loaded_adapters", "Adapters attached to the base", ["base"], registry=r)
        self.adapter_loads = Counter("polyadapt_adapter_loads", "Adapter versions attached", ["base"], registry=r)
        self.route_decisions = Counter("polyadapt_route_decisions", "Route decisions", ["route", "target"], registry=r)
        self.adapter_version = Gauge(
            "polyadapt_adapter_version", "Registry version served per adapter (0: a run directory)", ["adapter"],
            registry=r,
        )  # fmt: skip
        self.version_changes = Counter(
            "polyadapt_adapter_version_changes", "Adapter versions swapped in without a restart", ["adapter"], registry=r
        )  # fmt: skip

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def count_usage(self, label: str, usage: dict[str, Any]) -> None:
        if usage.get("prompt_tokens"):
            self.prompt_tokens.labels(label).inc(usage["prompt_tokens"])
        if usage.get("completion_tokens"):
            self.completion_tokens.labels(label).inc(usage["completion_tokens"])
