"""Routing: the cheapest chain of peers that covers every block, by estimated time per decode step."""
from __future__ import annotations

import random
import time
from collections.abc import Mapping, Set as AbstractSet
from dataclasses import dataclass, field

from swarm.dht import PeerRecord
from swarm.records import BlockAnnouncement
from swarm.errors import RouteError

DEFAULT_RTT = 0.05  # seconds assumed for a peer whose round trip we could not measure yet
# Round trips count from this many seconds up: below it a ping times the peer's busy event loop more than
# the network, and must not send every session of a client to the replica that answered in a quiet moment.
RTT_FLOOR = 0.01
JITTER = 0.1  # routes within ~10% of the best cost are chosen at random, to spread load
# How much one more open session slows a peer's steps: 8 sessions share passes at about 4x one
# session's throughput (docs/performance.md), so each session's step takes about 2x: 1 + 8 x 0.125.
SESSION_SHARE = 0.125
# A peer's recent passes count only when this much slower than the prediction: they also carry a pass's
# fixed costs, which the throughput measured at start leaves out, and must not make a used replica
# look slower than an idle one.
SLOWED = 1.5


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
    placed: Mapping[str, int] | None = None,
) -> list[Hop]:
    """Shortest path over block boundaries; an edge is one peer running blocks [i, j) of its span.

    Cost of an edge: the peer's round trip plus (j - i) x its expected seconds per block for a new
    session (`step_seconds`). Fewer hops win when peers are alike, because every hop pays a round
    trip; of equivalent replicas, the less loaded wins. `placed`: sessions this client put on a peer
    since the peer measured its announced load, which that load cannot show yet.
    """
    placed = placed or {}
    last = num_blocks if last is None else last
    rng = rng or random.Random()
    unusable = set(banned) | {p for p in peers if rtts.get(p) == float("inf")}  # banned or not answering
    best: list[tuple[float, Hop | None]] = [(float("inf"), None)] * (last + 1)
    best[first] = (0.0, None)
    candidates = [  # jitter drawn once per peer, so one peer's span is never split into several hops
        (
            peer_id,
            record.announcement,
            max(rtts.get(peer_id, DEFAULT_RTT), RTT_FLOOR) * (1 + JITTER * rng.random()),
            step_seconds(record.announcement, placed.get(peer_id, 0)) / (1 + JITTER * rng.random()),
        )
        for peer_id, record in peers.items()
        if peer_id not in unusable
    ]
    for i in range(first, last):
        if best[i][0] == float("inf"):
            continue
        for peer_id, record, rtt, per_block in candidates:
            if not record.start <= i < record.end:
                continue
            for j in range(i + 1, min(record.end, last) + 1):
                cost = best[i][0] + rtt + (j - i) * per_block
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


def step_seconds(announcement: BlockAnnouncement, placed: int = 0) -> float:
    """Expected seconds per block of a new session's step on this peer, under its load.

    From the idle throughput, slowed by the open sessions (those announced and those this client
    placed since); a peer whose recent passes were much slower than that says so with its step time.
    """
    load = announcement.load
    sessions = (load.sessions if load else 0) + placed
    predicted = (1 + SESSION_SHARE * sessions) / max(announcement.throughput, 1e-3)
    recent = load.step_seconds if load and load.step_seconds else 0.0
    return recent if recent > SLOWED * predicted else predicted


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


@dataclass
class Bans:
    """Peers that failed recently, each banned for longer every time it fails again; liars for good."""

    base: float
    limit: float
    until: dict[str, float] = field(default_factory=dict)
    strikes: dict[str, int] = field(default_factory=dict)
    forever: set[str] = field(default_factory=set)  # caught lying (client/verification.py)

    def ban(self, peer_id: str) -> None:
        self.strikes[peer_id] = self.strikes.get(peer_id, 0) + 1
        seconds = min(self.base * 2 ** (self.strikes[peer_id] - 1), self.limit)
        self.until[peer_id] = time.monotonic() + seconds

    def active(self) -> set[str]:
        now = time.monotonic()
        return {p for p, t in self.until.items() if t > now} | self.forever
