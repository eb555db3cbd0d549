"""Prometheus metrics of the OpenAI gateway: requests, tokens, latencies and errors, served at GET /metrics.

Labels only ever take values from fixed sets (our routes, our models, our error types), never from
what a request says, so a client cannot grow the number of series.
"""
from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# seconds: a health check takes milliseconds, a long generation minutes
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OTHER = "other"  # the endpoint label of paths we do not serve


class ApiMetrics:
    """One registry per app, so several gateways (or tests) in one process never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("swarm_api_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.in_progress = Gauge("swarm_api_requests_in_progress", "HTTP requests being answered now",
                                 ["endpoint"], registry=self.registry)
        self.latency = Histogram("swarm_api_request_duration_seconds",
                                 "Seconds from a request's arrival to the last byte of its answer (a stream's end)",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_token = Histogram("swarm_api_time_to_first_token_seconds",
                                     "Seconds from a generation request's arrival to its first piece of text",
                                     ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("swarm_api_tokens", "Tokens processed, by model and kind (prompt or completion)",
                              ["model", "kind"], registry=self.registry)
        self.errors = Counter("swarm_api_errors", "Errors answered, by OpenAI error type; "
                              "errors inside a stream that had started count too", ["type"], registry=self.registry)

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        self.tokens.labels(model, "prompt").inc(prompt)
        self.tokens.labels(model, "completion").inc(completion)

    def render(self) -> tuple[bytes, str]:
        """The text exposition format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts and times every HTTP request; a streamed answer is timed until its last chunk is sent."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics, endpoints: set[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in self.endpoints else OTHER
        status = 500  # if the app fails before it answers

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        self.metrics.in_progress.labels(endpoint).inc()
        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self.metrics.in_progress.labels(endpoint).dec()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
            self.metrics.requests.labels(endpoint, str(status)).inc()
