"""Keeps this peer's records in the DHT fresh: its blocks, its state, its model in the registry."""
from __future__ import annotations

import asyncio
import logging

from hivemind.utils import get_dht_time

import swarm
from peer.sessions import SessionRegistry
from swarm.dht import SwarmDHT
from swarm.dtypes import DTypeName, QuantName
from swarm.records import BlockAnnouncement, ModelRegistration, PeerState
from swarm.reference import ResolvedModel

logger = logging.getLogger(__name__)
EXPIRY_PERIODS = 3  # a record outlives a few missed re-announcements, not more


class Announcer:
    """What this peer says about itself: its span, state and throughput, with the free cache read at each announcement."""

    def __init__(self, dht: SwarmDHT, model: ResolvedModel, sessions: SessionRegistry, start: int, end: int,
                 dtype: DTypeName, quant: QuantName, public_name: str | None, period: float):
        self.dht, self.model, self.sessions = dht, model, sessions
        self.start, self.end = start, end
        self.dtype, self.quant, self.public_name, self.period = dtype, quant, public_name, period
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
        )

    async def announce(self, state: PeerState | None = None, throughput: float | None = None) -> None:
        """Store the records now, with a new state or throughput if given."""
        if state is not None:
            self.state = state
        if throughput is not None:
            self.throughput = throughput
        expiration = get_dht_time() + EXPIRY_PERIODS * self.period
        await self.dht.announce_blocks(self.model.dht_prefix, self.record(), expiration)
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
        while True:
            await asyncio.sleep(self.period)
            try:
                await self.announce()
            except Exception as e:  # a DHT hiccup must not stop future announcements
                logger.warning(f"announcement failed, will retry: {e}")
