"""Routing: the cheapest chain of peers that covers every block, by estimated time per decode step."""
from __future__ import annotations

import random
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from swarm.dht import PeerRecord
from swarm.errors import RouteError

DEFAULT_RTT = 0.05  # seconds assumed for a peer whose round trip we could not measure yet
JITTER = 0.1  # routes within ~10% of the best cost are chosen at random, to spread load


@dataclass(frozen=True)
class Hop:
    peer_id: str
    start: int
    end: int


def build_route(
    num_blocks: int,
    peers: dict[str, PeerRecord],
    rtts: dict[str, float],
    banned: AbstractSet[str] = frozenset(),
    first: int = 0,
    last: int | None = None,
    rng: random.Random | None = None,
) -> list[Hop]:
    """Shortest path over block boundaries; an edge is one peer running blocks [i, j) of its span.

    Cost of an edge: the peer's round trip plus (j - i) / its announced throughput. Fewer hops win
    when peers are alike, because every hop pays a round trip.
    """
    last = num_blocks if last is None else last
    rng = rng or random.Random()
    unusable = set(banned) | {p for p in peers if rtts.get(p) == float("inf")}  # banned or not answering
    best: list[tuple[float, Hop | None]] = [(float("inf"), None)] * (last + 1)
    best[first] = (0.0, None)
    candidates = [  # jitter drawn once per peer, so one peer's span is never split into several hops
        (
            peer_id,
            record.announcement,
            rtts.get(peer_id, DEFAULT_RTT) * (1 + JITTER * rng.random()),
            max(record.announcement.throughput, 1e-3) * (1 + JITTER * rng.random()),
        )
        for peer_id, record in peers.items()
        if peer_id not in unusable
    ]
    for i in range(first, last):
        if best[i][0] == float("inf"):
            continue
        for peer_id, record, rtt, speed in candidates:
            if not record.start <= i < record.end:
                continue
            for j in range(i + 1, min(record.end, last) + 1):
                cost = best[i][0] + rtt + (j - i) / speed
                if cost < best[j][0]:
                    best[j] = (cost, Hop(peer_id, i, j))
    if best[last][0] == float("inf"):
        raise RouteError(_explain_gap(first, last, peers, unusable))
    hops: list[Hop] = []
    position = last
    while position != first:
        hop = best[position][1]
        assert hop is not None  # every reached boundary but the first has the hop that reached it
        hops.append(hop)
        position = hop.start
    return hops[::-1]


def _explain_gap(first: int, last: int, peers: dict[str, PeerRecord], unusable: set[str]) -> str:
    usable = [r.announcement for p, r in peers.items() if p not in unusable]
    covered = {i for a in usable for i in range(a.start, a.end)}
    missing = [i for i in range(first, last) if i not in covered]
    spans = ", ".join(f"{a.start}:{a.end}" for a in sorted(usable, key=lambda a: (a.start, a.end))) or "nothing"
    count = len(unusable & set(peers))
    skipped = f" ({count} peers skipped as failed, unreachable or full)" if count else ""
    return f"blocks {format_ranges(missing) or '(unreachable)'} are served by nobody; the swarm has {spans}{skipped}"


def format_ranges(blocks: list[int]) -> str:
    parts, start = [], None
    for k, b in enumerate(blocks):
        if start is None:
            start = b
        if k + 1 == len(blocks) or blocks[k + 1] != b + 1:
            parts.append(f"{start}" if start == b else f"{start}-{b}")
            start = None
    return ", ".join(parts)
