"""Which blocks a peer should serve: where the swarm is weakest, and when moving is worth it.

A peer moves into a gap (blocks nobody serves), or, when every block is served, towards hot blocks:
where the open sessions per replica, counting the mover, are HOT_FACTOR times those where it is,
and at least MIN_HOT_SESSIONS. It never moves off a block that only it serves.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from swarm.dht import PeerRecord
from swarm.records import PeerState


@dataclass(frozen=True)
class Coverage:
    """Per block: how many live peers serve it, their total throughput and their open sessions."""

    peers: list[int]
    throughput: list[float]
    sessions: list[int] = field(default_factory=list)  # empty: nobody announced a load

    @classmethod
    def from_records(cls, blocks: list[dict[str, PeerRecord]], exclude: str | None = None) -> "Coverage":
        live = [
            [r for pid, r in peers.items() if pid != exclude and r.announcement.state != PeerState.offline]
            for peers in blocks
        ]
        return cls([len(rs) for rs in live], [sum(r.announcement.throughput for r in rs) for rs in live],
                   [sum(r.announcement.load.sessions for r in rs if r.announcement.load) for rs in live])

    def heat(self, start: int, end: int, mover_sessions: int = 0) -> float:
        """Open sessions per replica over blocks [start, end) if one more peer (with its sessions) served them."""
        if not self.sessions:
            return 0.0
        return sum((self.sessions[i] + mover_sessions) / (self.peers[i] + 1) for i in range(start, end)) / (end - start)


def best_start(coverage: Coverage, length: int) -> int:
    """Uncovered blocks first, then the least total throughput; ties go to the lowest start."""
    num_blocks = len(coverage.peers)
    length = min(length, num_blocks)

    def score(start: int) -> tuple[int, float]:
        window = range(start, start + length)
        uncovered = sum(1 for i in window if coverage.peers[i] == 0)
        return (-uncovered, sum(coverage.throughput[i] for i in window))

    return min(range(num_blocks - length + 1), key=score)


HOT_FACTOR = 2.0
MIN_HOT_SESSIONS = 1.0


def should_move(coverage_without_me: Coverage, start: int, end: int) -> int | None:
    """A new start when moving clearly helps: I only duplicate others while some block has nobody, or
    while other blocks are much hotter. Only an idle peer moves (its caller checks): its own sessions are 0.

    Never moves off a block that only this peer serves.
    """
    coverage, length = coverage_without_me, end - start
    if any(coverage.peers[i] == 0 for i in range(start, end)):
        return None
    if any(count == 0 for count in coverage.peers):
        new_start = best_start(coverage, length)
        gaps_filled = sum(1 for i in range(new_start, new_start + length) if coverage.peers[i] == 0)
        return new_start if gaps_filled > 0 and new_start != start else None
    here = coverage.heat(start, end)
    hottest = max(range(len(coverage.peers) - length + 1), key=lambda s: (coverage.heat(s, s + length), -s))
    there = coverage.heat(hottest, hottest + length)
    if hottest != start and there >= MIN_HOT_SESSIONS and there > HOT_FACTOR * here:
        return hottest
    return None
