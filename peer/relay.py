"""A reachable peer relays calls to peers behind NAT, within limits: streams per peer, time, data.

A peer behind NAT keeps a connection open to its relays (it dialled them; its NAT lets the answers
in). A client that cannot dial that peer opens a `relay` stream to one of its relays; the relay
opens the call to the peer over the peer's own connection and copies messages both ways, counting
them. Past a limit the relay ends the stream with an error, as a failed peer would: the client
opens a new one, or another route, and replays (client/session.py), so no token changes.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import AsyncIterator

from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from swarm import protocol
from swarm.dht import SwarmDHT
from swarm.membership import NOT_MEMBER, admits_call

logger = logging.getLogger("swarm-serve")


@dataclass(frozen=True)
class RelayLimits:
    streams: int  # relayed streams open at once, per peer behind NAT
    seconds: float  # the life of one relayed stream
    mebibytes: int  # data one relayed stream carries, both ways together


class RelayService:
    """The `relay` RPC of a reachable peer."""

    def __init__(self, dht: SwarmDHT, limits: RelayLimits):
        self.dht, self.limits = dht, limits
        self.open: Counter[str] = Counter()  # relayed streams per target

    async def register(self, p2p: P2P) -> None:
        await p2p.add_protobuf_handler(protocol.RELAY, self.relay, runtime_pb2.ExpertRequest,
                                       stream_input=True, stream_output=True)

    async def relay(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                    context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        try:
            message, _ = protocol.unpack_request(await anext(requests))
        except Exception as e:  # no message at all (StopAsyncIteration) or a malformed one
            yield _refusal(f"bad relay request: {e}")
            return
        if not isinstance(message, protocol.RelayOpen):
            yield _refusal("a relay stream starts with a relay message")
            return
        if not admits_call(self.dht.swarm_key, message.member):
            yield protocol.pack_response(protocol.ErrorReply(code="not_member", message=NOT_MEMBER))
            return
        target = message.target
        if self.open[target] >= self.limits.streams:
            yield _refusal(f"relay limit: {self.limits.streams} streams to {target[-8:]} are open already")
            return
        self.open[target] += 1
        budget = Budget(self.limits)
        try:
            if message.rpc in protocol.UNARY:
                yield await self.dht.call(target, message.rpc, await anext(requests))
                return
            forwarded = budget.counted(requests) if message.rpc == protocol.INFERENCE else await anext(requests)
            async for reply in await self.dht.iterate(target, message.rpc, forwarded):
                if not budget.allows(reply.ByteSize()):
                    break
                yield reply
        except StopAsyncIteration:
            return
        except Exception as e:
            if not budget.exceeded:  # a stream that broke after its limit ended it says nothing about the peer
                yield _refusal(f"peer {target[-8:]} cannot be reached through this relay: {e or type(e).__name__}",
                               "unreachable")
                return
        finally:
            self.open[target] -= 1
        if budget.exceeded:  # the peer saw its requests end and closed the session
            logger.info(f"relayed stream to {target[-8:]} ended: {budget.exceeded}")
            yield _refusal(budget.exceeded)


class Budget:
    """Time and bytes left to one relayed stream; past either, its requests end."""

    def __init__(self, limits: RelayLimits):
        self.limits, self.deadline, self.left = limits, time.monotonic() + limits.seconds, limits.mebibytes << 20
        self.exceeded = ""  # which limit ended the stream

    def allows(self, size: int) -> bool:
        self.left -= size
        if self.left < 0:
            self.exceeded = f"relay limit: {self.limits.mebibytes} MiB per stream"
        elif time.monotonic() > self.deadline:
            self.exceeded = f"relay limit: {self.limits.seconds:g} s per stream"
        return not self.exceeded

    async def counted(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        async for request in requests:
            if not self.allows(request.ByteSize()):
                return
            yield request


def _refusal(message: str, code: protocol.ErrorCode = "relay") -> runtime_pb2.ExpertResponse:
    return protocol.pack_response(protocol.ErrorReply(code=code, message=message))


async def keep_connected(dht: SwarmDHT, relays: list[str], period: float) -> None:
    """A peer behind NAT: call its relays every PERIOD, so its connection to them (the only way in) stays
    open, and is dialled again if it dropped."""
    while True:
        for relay in relays:
            if await dht.ping(relay, timeout=10) is None:
                logger.warning(f"relay {relay[-8:]} does not answer: clients cannot reach this peer through it")
        await asyncio.sleep(period)
