"""Which blocks a peer should serve: where the swarm is weakest, and when moving is worth it."""
from __future__ import annotations

from dataclasses import dataclass

from swarm.dht import PeerRecord
from swarm.records import PeerState


@dataclass(frozen=True)
class Coverage:
    """Per block: how many live peers serve it and their total throughput."""

    peers: list[int]
    throughput: list[float]

    @classmethod
    def from_records(cls, blocks: list[dict[str, PeerRecord]], exclude: str | None = None) -> "Coverage":
        live = [
            [r for pid, r in peers.items() if pid != exclude and r.announcement.state != PeerState.offline]
            for peers in blocks
        ]
        return cls([len(rs) for rs in live], [sum(r.announcement.throughput for r in rs) for rs in live])


def best_start(coverage: Coverage, length: int) -> int:
    """Uncovered blocks first, then the least total throughput; ties go to the lowest start."""
    num_blocks = len(coverage.peers)
    length = min(length, num_blocks)

    def score(start: int) -> tuple[int, float]:
        window = range(start, start + length)
        uncovered = sum(1 for i in window if coverage.peers[i] == 0)
        return (-uncovered, sum(coverage.throughput[i] for i in window))

    return min(range(num_blocks - length + 1), key=score)


def should_move(coverage_without_me: Coverage, start: int, end: int) -> int | None:
    """A new start when moving clearly helps: I only duplicate others while some block has nobody.

    Never moves off a block that only this peer serves (hysteresis: a peer moves at most into a gap).
    """
    mine = range(start, end)
    if any(coverage_without_me.peers[i] == 0 for i in mine):
        return None
    if all(count > 0 for count in coverage_without_me.peers):
        return None
    new_start = best_start(coverage_without_me, end - start)
    gaps_filled = sum(1 for i in range(new_start, new_start + end - start) if coverage_without_me.peers[i] == 0)
    return new_start if gaps_filled > 0 and new_start != start else None
