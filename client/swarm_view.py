"""What the client knows about the swarm: who serves which blocks of its model, and how far away they are."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from hivemind.utils import get_dht_time

from swarm.dht import PeerRecord, SwarmDHT
from swarm.dtypes import DTypeName, QuantName
from swarm.errors import RouteError
from swarm.records import PeerState
from swarm.reference import ResolvedModel

logger = logging.getLogger(__name__)
PING_TIMEOUT = 3.0  # seconds a peer gets to answer the info call that measures its round trip
PING_SAMPLES = 3


@dataclass(eq=False)
class Placement:
    """A session this client opened on a peer, counted in that peer's load until the peer's own record shows it."""

    view: "SwarmView"
    peer_id: str
    at: float  # DHT time

    def release(self) -> None:
        placements = self.view._placements.get(self.peer_id, [])
        if self in placements:
            placements.remove(self)


class SwarmView:
    """A fresh-enough copy of the model's block records plus measured round-trip times.

    A client that requires a precision (dtype, quant) sees only the peers that compute in it, so its
    route is homogeneous.
    """

    def __init__(self, dht: SwarmDHT, model: ResolvedModel, refresh_period: float = 3.0, rtt_ttl: float = 60.0,
                 dtype: DTypeName | None = None, quant: QuantName | None = None):
        self.dht, self.model = dht, model
        self.dtype, self.quant = dtype, quant
        self.refresh_period, self.rtt_ttl = refresh_period, rtt_ttl
        self.blocks: list[dict[str, PeerRecord]] = [{} for _ in range(model.num_blocks)]
        self.updated_at = 0.0
        self._rtt: dict[str, tuple[float, float]] = {}  # peer -> (seconds, measured at)
        self._refresher: asyncio.Task | None = None
        self._placements: dict[str, list[Placement]] = {}  # sessions this client opened, by peer

    async def refresh(self) -> None:
        """Re-read every block; a block whose lookup found nothing keeps its records that have not expired.

        A lookup that times out (a hung peer on the DHT path) must not make live peers vanish from the view.
        """
        fresh = await self.dht.read_blocks(self.model.dht_prefix, self.model.num_blocks)
        now = get_dht_time()
        self.blocks = [
            new or {peer: record for peer, record in old.items() if record.expiration_time > now}
            for new, old in zip(fresh, self.blocks)
        ]
        self.updated_at = time.monotonic()

    async def ensure_fresh(self) -> None:
        """Block on the first read only; afterwards the background refresh keeps the view fresh, and a
        reroute must not wait behind a DHT lookup that a hung peer slows down."""
        if self.updated_at == 0.0:
            await self.refresh()
        if self._refresher is None:
            self._refresher = asyncio.create_task(self._keep_fresh())

    async def _keep_fresh(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_period)
            try:
                await self.refresh()
            except Exception as e:
                logger.debug(f"swarm view refresh failed: {e}")

    def online_peers(self, any_precision: bool = False) -> dict[str, PeerRecord]:
        """Every peer announcing itself online for this model in the required precision, by peer id."""
        peers: dict[str, PeerRecord] = {}
        for block in self.blocks:
            for peer_id, record in block.items():
                if record.announcement.state == PeerState.online and (any_precision or self._wanted(record)):
                    peers[peer_id] = record
        return peers

    def record_of(self, peer_id: str) -> PeerRecord | None:
        """PEER_ID's record in any block, None if the view has none."""
        return next((block[peer_id] for block in self.blocks if peer_id in block), None)

    def dtype_of(self, peer_id: str) -> DTypeName | None:
        """The precision PEER_ID announces, None if the view has no record of it."""
        record = self.record_of(peer_id)
        return None if record is None else record.announcement.dtype

    def _wanted(self, record: PeerRecord) -> bool:
        announced = record.announcement
        return self.dtype in (None, announced.dtype) and self.quant in (None, announced.quant)

    def explained(self, error: RouteError) -> RouteError:
        """A route error that also names the peers left out for their precision, if any."""
        others = len(self.online_peers(any_precision=True)) - len(self.online_peers())
        if not others:
            return error
        required = ", ".join(f"{name}={value}" for name, value in (("dtype", self.dtype), ("quant", self.quant)) if value)
        return RouteError(f"{error}; {others} online peers compute in another precision than the required {required} "
                          "(leave dtype/quant unset to accept any)")

    def place(self, peer_id: str) -> "Placement":
        """Count a session this client is opening on `peer_id` in that peer's load, until it closes."""
        placement = Placement(self, peer_id, get_dht_time())
        self._placements.setdefault(peer_id, []).append(placement)
        return placement

    def placed(self) -> dict[str, int]:
        """Per peer, the open sessions this client placed there after the peer measured its announced load."""
        measured: dict[str, float] = {}
        for block in self.blocks:
            for peer_id, record in block.items():
                if record.announcement.load is not None:
                    measured[peer_id] = max(measured.get(peer_id, 0.0), record.announcement.load.at)
        return {peer_id: sum(p.at > measured.get(peer_id, 0.0) for p in placements)
                for peer_id, placements in self._placements.items() if placements}

    async def rtts(self, peer_ids: list[str], recheck_unreachable: bool = False) -> dict[str, float]:
        """Round-trip times in seconds (the fastest of a few info calls), cached; unreachable peers get infinity.

        RECHECK_UNREACHABLE pings again the peers that did not answer last time: a route that waits for
        missing blocks must not wait out a verdict from one slow moment (a relay still opening its circuit).
        """
        now = time.monotonic()
        stale = [p for p in peer_ids if p not in self._rtt or now - self._rtt[p][1] > self.rtt_ttl
                 or (recheck_unreachable and self._rtt[p][0] == float("inf"))]
        if stale:
            results = await asyncio.gather(*(self._fastest_ping(p) for p in stale))
            for peer_id, rtt in zip(stale, results):
                # an unreachable peer is remembered as infinitely far, and asked again after a shorter while;
                # otherwise the lower of this and the previous sample: a ping to a busy peer waits for its event
                # loop too, and a sample from a busy moment must not outweigh the load the records announce
                previous = self._rtt.get(peer_id, (float("inf"), 0.0))[0]
                self._rtt[peer_id] = (min(rtt, previous), now) if rtt is not None else \
                    (float("inf"), now - self.rtt_ttl * 0.8)
        return {p: self._rtt[p][0] for p in peer_ids if p in self._rtt}

    async def reach(self, peer_id: str) -> str | None:
        """The relay to call PEER_ID through if it is behind NAT (swarm/dht.py), else None."""
        record = self.record_of(peer_id)
        return None if record is None else await self.dht.relay_to(record.announcement, PING_TIMEOUT)

    async def _fastest_ping(self, peer_id: str) -> float | None:
        """The fastest of PING_SAMPLES info calls in a row: each also waits for the peer's busy event loop."""
        relay = await self.reach(peer_id)
        fastest: float | None = None
        for _ in range(PING_SAMPLES):
            rtt = await self.dht.ping(peer_id, PING_TIMEOUT, relay)
            if rtt is None:
                return fastest
            fastest = rtt if fastest is None else min(fastest, rtt)
        return fastest

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
