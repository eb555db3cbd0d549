"""Whether strangers can connect to this peer, and if not, the relays they reach it through.

A joining peer asks the peers it joins through to open a plain TCP connection to its addresses,
as anyone on the internet would: behind a home NAT or a firewall those connections never arrive.
libp2p's AutoNAT would tell the same, but it needs several public peers to decide, which a young
swarm does not have. A peer nobody can reach joins again as a DHT client, through the checkers that
relay for others, and announces them as its relays (peer/relay.py).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from swarm import protocol
from swarm.dht import SwarmDHT
from swarm.errors import SwarmError
from swarm.membership import NOT_MEMBER, SwarmKey, admits_call

logger = logging.getLogger("swarm-serve")
CONNECT_TIMEOUT = 3.0  # seconds a checker waits for each TCP connection
CHECK_TIMEOUT = 15.0  # seconds a joining peer waits for one checker's answer
MAX_CHECKERS = 3
MAX_RELAYS = 3  # relays a peer behind NAT stays connected to and announces


@dataclass(frozen=True)
class Reach:
    """How others reach this peer: directly (no relays), or through relays."""

    relays: list[str]  # peer ids
    maddrs: list[str]  # what the records announce: our own addresses, or the relays' (`.../p2p/RELAY`)

    @property
    def direct(self) -> bool:
        return not self.relays


async def serve_checks(p2p: P2P, relays: bool, swarm_key: SwarmKey | None = None) -> None:
    """Answer other peers' reachability checks; RELAYS: whether this peer relays for peers behind NAT.
    In a private swarm (SWARM_KEY), only members' checks."""
    one_at_a_time = asyncio.Semaphore(1)  # a check costs little, but nobody may turn us into a port scanner

    async def check(request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            message, _ = protocol.unpack_request(request)
        except Exception as e:
            return protocol.pack_response(protocol.ErrorReply(code="bad_request", message=str(e)))
        if not isinstance(message, protocol.ReachabilityCheck):
            return protocol.pack_response(protocol.ErrorReply(code="bad_request", message="expected a reachability check"))
        if not admits_call(swarm_key, message.member):
            return protocol.pack_response(protocol.ErrorReply(code="not_member", message=NOT_MEMBER))
        async with one_at_a_time:
            results = await asyncio.gather(*(_connects(m) for m in message.maddrs))
        reachable = [m for m, ok in zip(message.maddrs, results) if ok]
        return protocol.pack_response(protocol.Reachability(reachable=reachable, relays=relays))

    await p2p.add_protobuf_handler(protocol.REACHABILITY, check, runtime_pb2.ExpertRequest)


async def _connects(maddr: str) -> bool:
    parts = maddr.strip("/").split("/")
    if len(parts) < 4 or parts[0] != "ip4" or parts[2] != "tcp" or not parts[3].isdigit():
        return False
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(parts[1], int(parts[3])), CONNECT_TIMEOUT)
    except (OSError, asyncio.TimeoutError, ValueError):
        return False
    writer.close()
    return True


@dataclass(frozen=True)
class Verdict:
    """What the checkers said: None if none answered."""

    reachable: bool | None
    checked_by: str | None  # the peer id that found an address reachable
    relays: list[str]  # maddrs of checkers that relay for others


async def check_reachability(dht: SwarmDHT, initial_peers: list[str], maddrs: list[str]) -> Verdict:
    """Ask up to MAX_CHECKERS of the peers we joined through to connect to MADDRS."""
    addresses = [m for m in maddrs if m.startswith("/ip4/") and "/p2p-circuit" not in m][:protocol.MAX_CHECKED_ADDRS]
    checkers = [m for m in initial_peers if "/p2p/" in m and "/p2p-circuit" not in m][:MAX_CHECKERS]
    if not addresses or not checkers:
        return Verdict(None, None, [])
    answers = await asyncio.gather(*(_ask(dht, checker, addresses) for checker in checkers))
    relays = [checker for checker, answer in zip(checkers, answers) if answer is not None and answer.relays]
    for checker, answer in zip(checkers, answers):
        if answer is not None and answer.reachable:
            return Verdict(True, checker.rsplit("/p2p/", 1)[1], relays)
    return Verdict(False if any(a is not None for a in answers) else None, None, relays)


async def _ask(dht: SwarmDHT, checker: str, addresses: list[str]) -> protocol.Reachability | None:
    request = protocol.pack_request(protocol.ReachabilityCheck(maddrs=addresses, member=dht.member_token))
    try:
        reply = await asyncio.wait_for(dht.call(checker.rsplit("/p2p/", 1)[1], protocol.REACHABILITY, request),
                                       CHECK_TIMEOUT)
        message, _ = protocol.unpack_response(reply)
    except Exception as e:
        logger.debug(f"reachability check by {checker} failed: {e!r}")
        return None
    if isinstance(message, protocol.ErrorReply) and message.code == "not_member":
        raise SwarmError(f"peer {checker.rsplit('/p2p/', 1)[1][-8:]} refused us: {message.message}")
    return message if isinstance(message, protocol.Reachability) else None
