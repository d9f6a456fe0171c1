"""Prometheus metrics of ``swarm-api`` (GET /metrics), in a registry of their own: one per server, so that two
servers in one process (tests) count apart."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# 5 ms .. 60 s: a token through a swarm of local CPUs to a wide-area one with a long prompt
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Status of a request whose client went away before its answer was complete (nginx's convention).
CLIENT_CLOSED = 499


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "swarm_api_requests",
            "HTTP requests answered, by endpoint and status (499: the client left before the end)",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "swarm_api_prompt_tokens", "prompt tokens of generation requests", registry=self.registry
        )
        self.generated_tokens = Counter("swarm_api_generated_tokens", "tokens generated", registry=self.registry)
        self.time_to_first_token = Histogram(
            "swarm_api_time_to_first_token_seconds",
            "from a request's arrival to its first generated token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_per_token = Histogram(
            "swarm_api_time_per_output_token_seconds",
            "between two generated tokens of one request",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.active = Gauge("swarm_api_active_requests", "requests generating now", registry=self.registry)

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
