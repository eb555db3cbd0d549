"""How busy and how fast this peer is now, from its own passes: what it announces besides its throughput.

Two averages of decode passes (one new position per row), in seconds per block: over every pass,
what a session's step waits here now; and over one-row passes, the peer's own speed when nobody
shares a pass with it, which corrects the throughput measured at start when the machine's speed
drifts (a figure measured on a busy moment must not stick).
"""
from __future__ import annotations

import time

AVERAGING = 0.2  # weight of the newest pass in the averages
STALE_SECONDS = 60.0  # no decode pass for this long: the recent step time says nothing any more
MIN_ALONE_PASSES = 20  # one-row passes seen before their speed may replace the measured throughput


class PeerLoad:
    def __init__(self) -> None:
        self.queued = 0  # steps waiting for a pass, kept by the scheduler
        self._recent: float | None = None
        self._alone: float | None = None
        self.alone_passes = 0
        self._last_pass = 0.0

    def passed(self, seconds: float, blocks: int, rows: int) -> None:
        """A decode pass of `rows` rows through `blocks` blocks took `seconds`."""
        per_block = seconds / blocks
        self._recent = per_block if self._recent is None else (1 - AVERAGING) * self._recent + AVERAGING * per_block
        if rows == 1:
            self._alone = per_block if self._alone is None else (1 - AVERAGING) * self._alone + AVERAGING * per_block
            self.alone_passes += 1
        self._last_pass = time.monotonic()

    def forget_speed(self) -> None:
        """The peer's speed changed (another thread count): one-row passes start counting again."""
        self._alone, self.alone_passes = None, 0

    def step_seconds(self) -> float | None:
        """Seconds per block of the recent decode passes, or None if there was none lately."""
        return self._recent if time.monotonic() - self._last_pass < STALE_SECONDS else None

    def alone_throughput(self) -> float | None:
        """Decode steps per second through one block, from recent one-row passes, once there were enough."""
        if self.alone_passes < MIN_ALONE_PASSES or not self._alone:
            return None
        return round(1.0 / self._alone, 2)
