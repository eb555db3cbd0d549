"""What one gateway on a public address lets its callers take: requests per minute per caller, generations at
once, and seconds per request. Past a limit a request gets a clear 429, 503 or 504 at once, never a wait."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from client.gateway.errors import ApiError


@dataclass(frozen=True)
class Limits:
    rate_per_minute: int | None = None  # requests per caller (API key, else address); None: unlimited
    max_concurrent: int | None = None  # generations in flight over the whole gateway
    deadline: float | None = None  # seconds from a request's arrival to its last token


@dataclass
class Admission:
    """Admits a generation or refuses it; an admitted one must be released when it ends."""

    limits: Limits
    running: int = 0
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # caller -> (tokens, at)

    def admit(self, caller: str) -> None:
        self._take(caller)
        if self.limits.max_concurrent is not None and self.running >= self.limits.max_concurrent:
            raise ApiError(503, f"the gateway is busy: {self.limits.max_concurrent} generations are running; retry "
                                "shortly", "overloaded", headers={"Retry-After": "1"})
        self.running += 1

    def release(self) -> None:
        self.running -= 1

    def _take(self, caller: str) -> None:
        """A token bucket per caller: `rate_per_minute` tokens, refilled continuously."""
        rate = self.limits.rate_per_minute
        if rate is None:
            return
        now = time.monotonic()
        tokens, at = self._buckets.get(caller, (float(rate), now))
        tokens = min(float(rate), tokens + (now - at) * rate / 60)
        if tokens < 1:
            wait = math.ceil((1 - tokens) * 60 / rate)
            self._buckets[caller] = (tokens, now)
            raise ApiError(429, f"rate limit: {rate} requests per minute; retry in {wait} s", "rate_limited",
                           headers={"Retry-After": str(wait)})
        self._buckets[caller] = (tokens - 1, now)
        if len(self._buckets) > 100_000:  # forget callers whose buckets are full again
            self._buckets = {c: b for c, b in self._buckets.items() if b[0] + (now - b[1]) * rate / 60 < rate}

    def check_deadline(self, arrived: float) -> None:
        """Raise 504 once a request has run past the deadline (checked between tokens)."""
        deadline = self.limits.deadline
        if deadline is not None and time.perf_counter() - arrived > deadline:
            raise ApiError(504, f"the request ran past the gateway's deadline of {deadline:g} s", "deadline_exceeded")
