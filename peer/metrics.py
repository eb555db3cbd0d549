"""The peer's Prometheus metrics: what an operator's monitoring scrapes at http://HOST:PORT/metrics (--metrics-port).

Labels only take values from fixed sets (directions, results, our error codes), never from what a
request says, so no client can grow the number of series.
"""
from __future__ import annotations

import asyncio
import logging

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


logger = logging.getLogger(__name__)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
MAX_REQUEST_BYTES = 8192  # a scrape is one short GET


class PeerMetrics:
    """One registry per peer; the session registry keeps the session and cache gauges current."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.steps = Counter("swarm_peer_steps", "Steps and forward calls computed (chunks of a long one count apart)",
                             registry=registry)
        self.passes = Counter("swarm_peer_passes", "Batched passes those steps took", registry=registry)
        self.rows_per_pass = Histogram("swarm_peer_rows_per_pass", "Rows (sessions x their batch) in one pass",
                                       buckets=ROWS_BUCKETS, registry=registry)
        self.queued = Gauge("swarm_peer_queued_steps", "Steps waiting for a pass", registry=registry)
        self.step_seconds = Histogram("swarm_peer_step_duration_seconds",
                                      "Seconds from a step's arrival to its output (waiting and computing)",
                                      buckets=LATENCY_BUCKETS, registry=registry)
        self.open_sessions = Gauge("swarm_peer_open_sessions", "Inference sessions open on this peer", registry=registry)
        self.cache_tokens = Gauge("swarm_peer_cache_tokens", "KV cache budget in tokens, used or left", ["state"],
                                  registry=registry)
        self.bytes = Counter("swarm_peer_bytes", "Bytes of RPC messages received (in) and sent (out)", ["direction"],
                             registry=registry)
        self.pushes = Counter("swarm_peer_pushes", "Pushes sent to next hops and received from previous ones, "
                              "by whether the receiving peer accepted them", ["direction", "result"], registry=registry)
        self.refusals = Counter("swarm_peer_refusals", "Error replies sent, by error code", ["reason"], registry=registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def serve_metrics(metrics: PeerMetrics, host: str, port: int) -> asyncio.Server:
    """A minimal HTTP server on the peer's event loop: GET /metrics, 404 for anything else."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            method, path = (request.split(b"\r\n", 1)[0].split(b" ") + [b"", b""])[:2]
            if method == b"GET" and path.split(b"?", 1)[0] == b"/metrics":
                status, kind, body = "200 OK", CONTENT_TYPE_LATEST, metrics.render()
            else:
                status, kind, body = "404 Not Found", "text/plain; charset=utf-8", b"only GET /metrics is served here\n"
            head = f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a client that sends no request, too much, or leaves: nothing to answer
        finally:
            writer.close()

    return await asyncio.start_server(answer, host, port, limit=MAX_REQUEST_BYTES)
