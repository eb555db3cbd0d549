"""Raw RPC access to peers for tests: send any message, even a malformed one, and read the reply."""
from __future__ import annotations

import asyncio

from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from client import loop
from swarm import protocol
from swarm.dht import SwarmDHT


class RawStream:
    """An `inference` stream driven message by message from synchronous test code."""

    def __init__(self, dht: SwarmDHT, peer_id: str):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.responses = loop.run(self._open(dht, peer_id))

    async def _open(self, dht, peer_id):
        async def requests():
            while (item := await self.queue.get()) is not None:
                yield item

        return await dht.p2p.iterate_protobuf_handler(
            PeerID.from_base58(peer_id), protocol.INFERENCE, requests(), runtime_pb2.ExpertResponse
        )

    def send(self, request: runtime_pb2.ExpertRequest, timeout: float = 30):
        self.queue_only(request)
        return self.receive(timeout)

    def queue_only(self, request: runtime_pb2.ExpertRequest) -> None:
        """Send without waiting for a reply (for messages that get none)."""
        loop.event_loop().call_soon_threadsafe(self.queue.put_nowait, request)

    def receive(self, timeout: float = 30):
        async def next_response():
            return protocol.unpack_response(await asyncio.wait_for(anext(self.responses), timeout))

        return loop.run(next_response())

    def close(self) -> None:
        loop.event_loop().call_soon_threadsafe(self.queue.put_nowait, None)


def forward(dht: SwarmDHT, peer_id: str, request: runtime_pb2.ExpertRequest):
    async def call():
        responses = await dht.p2p.iterate_protobuf_handler(
            PeerID.from_base58(peer_id), protocol.FORWARD, request, runtime_pb2.ExpertResponse
        )
        return protocol.unpack_response(await anext(responses))

    return loop.run(call(), timeout=60)


def info(dht: SwarmDHT, peer_id: str) -> protocol.PeerInfo:
    async def call():
        return await dht.p2p.call_protobuf_handler(
            PeerID.from_base58(peer_id), protocol.INFO, protocol.pack_request(protocol.InfoRequest()), runtime_pb2.ExpertResponse
        )

    message, _ = protocol.unpack_response(loop.run(call(), timeout=30))
    return message
