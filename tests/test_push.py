"""The peer's pusher: the pushes of one pass travel in one call per next peer (peer/push.py).

End to end, pushes run in every multi-peer test (test_peer.py checks one directly); this checks the
batching, with the p2p call replaced by a recorder that answers like a peer would.
"""
from __future__ import annotations

import asyncio

import torch

from peer.metrics import PeerMetrics
from peer.push import Pusher
from swarm import protocol

PEER_A, PEER_B = "12D3KooWA" + "a" * 44, "12D3KooWB" + "b" * 44


class _Peers:
    """Answers push calls: accepts every item except those for session 'gone'; peer B's calls fail."""

    member_token = None  # an open swarm

    def __init__(self):
        self.calls: list[tuple[str, protocol.Push, int]] = []

    async def call(self, peer_id, rpc, request, relay=None):
        message, tensors = protocol.unpack_request(request)
        self.calls.append((peer_id, message, len(tensors)))
        if peer_id == PEER_B:
            raise ConnectionError("peer B is gone")
        return protocol.pack_response(protocol.PushReply(accepted=[item.session_id != "gone" for item in message.items]))


def _target(peer: str, session: str) -> list[protocol.NextHop]:
    return [protocol.NextHop(peer_id=peer, session_id=session, step=3, token="0" * 32)]


def test_pushes_of_one_pass_share_one_call_per_next_peer():
    async def scenario():
        peers = _Peers()
        pusher = Pusher(peers, PeerMetrics())
        small = torch.randn(1, 1, 16)
        futures = [
            pusher.push(_target(PEER_A, "s1"), small, None),
            pusher.push(_target(PEER_A, "s2"), small, torch.ones(1, 1, dtype=torch.long)),
            pusher.push(_target(PEER_A, "gone"), small, None),
            pusher.push(_target(PEER_B, "s4"), small, None),
            pusher.push(_target(PEER_A, "big"), torch.randn(1, protocol.MAX_PUSH_BYTES // 64 + 1, 16), None),
        ]
        results = await asyncio.wait_for(asyncio.gather(*futures), 10)
        return peers.calls, results

    calls, results = asyncio.run(scenario())
    assert results == [True, True, False, False, False]  # refused item, failed call, too big to push
    assert [(peer, [i.session_id for i in push.items], tensors) for peer, push, tensors in calls] == [
        (PEER_A, ["s1", "s2", "gone"], 4),  # one call; s2's mask travels with it
        (PEER_B, ["s4"], 1),
    ]
    assert [i.masked for i in calls[0][1].items] == [False, True, False]
