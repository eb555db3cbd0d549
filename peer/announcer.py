"""Keeps this peer's records in the DHT fresh: its blocks, its state, its load, its model in the registry.

Records are re-announced every period, and sooner when the load changed enough to matter to a
client choosing between replicas (a session opened or closed, the step time moved by a quarter),
at most every LOAD_CHECK seconds. When the speed of one-row passes drifts from the announced
throughput by more than DRIFT, that speed is announced instead and kept for the next start.
"""
from __future__ import annotations

import asyncio
import logging

from hivemind.utils import get_dht_time

import swarm
from peer.load import PeerLoad
from peer.reachability import Reach
from peer.sessions import SessionRegistry
from peer.throughput import store
from swarm.dht import SwarmDHT
from swarm.dtypes import DTypeName, QuantName
from swarm.records import BlockAnnouncement, Load, ModelRegistration, PeerState
from swarm.reference import ResolvedModel

logger = logging.getLogger(__name__)
EXPIRY_PERIODS = 3  # a record outlives a few missed re-announcements, not more
LOAD_CHECK = 2.0  # seconds between looks at the load
STEP_CHANGE = 0.25  # relative change of the recent step time worth a re-announcement
DRIFT = 0.3  # relative difference between observed and announced throughput that replaces it


class Announcer:
    """What this peer says about itself: its span, state and throughput, with the free cache read at each announcement."""

    def __init__(self, dht: SwarmDHT, model: ResolvedModel, sessions: SessionRegistry, load: PeerLoad, start: int,
                 end: int, dtype: DTypeName, quant: QuantName, cache_dtype: DTypeName | None, public_name: str | None,
                 period: float, throughput_key: str, reach: Reach):
        self.dht, self.model, self.sessions, self.load, self.reach = dht, model, sessions, load, reach
        self.throughput_key = throughput_key
        self.announced_load: Load | None = None
        self.start, self.end = start, end
        self.dtype, self.quant, self.public_name, self.period = dtype, quant, public_name, period
        self.cache_dtype = cache_dtype if cache_dtype != dtype else None
        self.state = PeerState.joining
        self.throughput = 0.0  # decode steps per second through one block; known once the blocks are loaded

    def record(self, state: PeerState | None = None) -> BlockAnnouncement:
        return BlockAnnouncement(
            state=state or self.state,
            start=self.start,
            end=self.end,
            throughput=self.throughput,
            cache_tokens_left=max(0, self.sessions.tokens_left),
            version=swarm.__version__,
            public_name=self.public_name,
            dtype=self.dtype,
            quant=self.quant,
            cache_dtype=self.cache_dtype,
            load=self.current_load(),
            relays=self.reach.relays,
            maddrs=self.reach.maddrs,
        )

    def current_load(self) -> Load:
        return Load(sessions=len(self.sessions.sessions), queued=self.load.queued, step_seconds=self.load.step_seconds(),
                    at=get_dht_time())

    async def announce(self, state: PeerState | None = None, throughput: float | None = None) -> None:
        """Store the records now, with a new state or throughput if given."""
        if state is not None:
            self.state = state
        if throughput is not None:
            self.throughput = throughput
        expiration = get_dht_time() + EXPIRY_PERIODS * self.period
        record = self.record()
        self.announced_load = record.load
        await self.dht.announce_blocks(self.model.dht_prefix, record, expiration)
        if self.state != PeerState.offline:
            registration = ModelRegistration(
                name=self.model.name,
                dht_prefix=self.model.dht_prefix,
                num_blocks=self.model.num_blocks,
                model_type=self.model.config.model_type,
            )
            await self.dht.register_model(registration, expiration)

    async def move(self, start: int, end: int) -> None:
        """Announce the new span online and mark the blocks left behind offline."""
        old = self.record(PeerState.offline)
        self.start, self.end = start, end
        await self.dht.announce_blocks(self.model.dht_prefix, old, get_dht_time() + EXPIRY_PERIODS * self.period)
        await self.announce(PeerState.online)

    async def run(self) -> None:
        last = asyncio.get_running_loop().time()
        while True:
            await asyncio.sleep(min(LOAD_CHECK, self.period))
            self._follow_drift()
            if asyncio.get_running_loop().time() - last < self.period and not self._load_changed():
                continue
            last = asyncio.get_running_loop().time()
            try:
                await self.announce()
            except Exception as e:  # a DHT hiccup must not stop future announcements
                logger.warning(f"announcement failed, will retry: {e}")

    async def rethreaded(self, throughput: float, throughput_key: str) -> None:
        """The peer computes on another number of threads now: announce their throughput."""
        self.throughput_key = throughput_key
        self.load.forget_speed()
        await self.announce(throughput=throughput)

    def _load_changed(self) -> bool:
        before, now = self.announced_load, self.current_load()
        if before is None or before.sessions != now.sessions:
            return True
        if (before.step_seconds is None) != (now.step_seconds is None):
            return True
        return before.step_seconds is not None and now.step_seconds is not None and \
            abs(now.step_seconds - before.step_seconds) > STEP_CHANGE * before.step_seconds

    def _follow_drift(self) -> None:
        observed = self.load.alone_throughput()
        if observed is None or not self.throughput or abs(observed - self.throughput) <= DRIFT * self.throughput:
            return
        logger.info(f"one-session passes run {observed:.1f} block-steps/s, not the {self.throughput:.1f} measured "
                    "before: announcing that from now on")
        self.throughput = observed
        store(self.throughput_key, observed)
