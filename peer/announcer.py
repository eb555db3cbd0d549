"""Keeps this peer's records in the DHT fresh: its blocks, its state, its model in the registry."""
from __future__ import annotations

import asyncio
import logging

from hivemind.utils import get_dht_time

import swarm
from swarm.dht import SwarmDHT
from swarm.records import BlockAnnouncement, ModelRegistration, PeerState
from swarm.reference import ResolvedModel

logger = logging.getLogger(__name__)
EXPIRY_PERIODS = 3  # a record outlives a few missed re-announcements, not more


class Announcer:
    def __init__(self, dht: SwarmDHT, model: ResolvedModel, dtype: str, public_name: str | None, period: float):
        self.dht, self.model, self.dtype, self.public_name, self.period = dht, model, dtype, public_name, period
        self.state = PeerState.joining
        self.start = self.end = 0
        self.throughput = 0.0
        self.cache_tokens_left = lambda: 0

    def record(self, state: PeerState | None = None) -> BlockAnnouncement:
        return BlockAnnouncement(
            state=state or self.state,
            start=self.start,
            end=self.end,
            throughput=self.throughput,
            cache_tokens_left=max(0, self.cache_tokens_left()),
            version=swarm.__version__,
            public_name=self.public_name,
            dtype=self.dtype,
        )

    async def announce(self, state: PeerState | None = None) -> None:
        if state is not None:
            self.state = state
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

    async def withdraw(self, start: int, end: int) -> None:
        """Mark blocks this peer no longer serves as offline (after moving to other blocks)."""
        record = self.record(PeerState.offline).model_copy(update={"start": start, "end": end})
        await self.dht.announce_blocks(self.model.dht_prefix, record, get_dht_time() + EXPIRY_PERIODS * self.period)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            try:
                await self.announce()
            except Exception as e:  # a DHT hiccup must not stop future announcements
                logger.warning(f"announcement failed, will retry: {e}")
