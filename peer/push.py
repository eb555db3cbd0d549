"""Pushes: a peer hands its outputs straight to the next hop of each session's route.

The steps of one batched pass mostly continue to the same next peer, so their pushes travel
together: every push queued while the event loop hands out a pass's results leaves in one
`swarm.push` call per next peer, not one call per session. Each call costs both peers and both p2p
daemons a message, on CPUs that are busy computing.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Iterator

import torch
from peer.metrics import PeerMetrics
from swarm import protocol
from swarm.dht import SwarmDHT

logger = logging.getLogger(__name__)
PUSH_TIMEOUT = 10.0


@dataclass
class _Queued:
    item: protocol.PushItem
    tensors: tuple[torch.Tensor, ...]
    accepted: asyncio.Future

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


class Pusher:
    def __init__(self, dht: SwarmDHT, metrics: PeerMetrics):
        self.dht, self.metrics = dht, metrics
        self._queued: dict[str, list[_Queued]] = {}  # by next peer
        self._relays: dict[str, str | None] = {}  # by next peer: the relay to push to one behind NAT through
        self._calls: set[asyncio.Task] = set()  # in flight, kept so they are not garbage-collected

    def push(self, targets: list[protocol.NextHop], hidden: torch.Tensor, mask: torch.Tensor | None,
             trace_id: str | None = None, reorder: list[int] | None = None) -> asyncio.Future:
        """Queue an output for targets[0]; the future says whether that peer accepted it."""
        loop = asyncio.get_running_loop()
        target = targets[0]
        item = protocol.PushItem(session_id=target.session_id, step=target.step, token=target.token, next_hops=targets[1:],
                                 masked=mask is not None, trace_id=trace_id, reorder=reorder)
        queued = _Queued(item, protocol.input_tensors(hidden, mask), loop.create_future())
        if queued.bytes > protocol.MAX_PUSH_BYTES:  # a prefill chunk: the client sends it
            queued.accepted.set_result(False)
            return queued.accepted
        self._relays[target.peer_id] = target.relay
        waiting = self._queued.setdefault(target.peer_id, [])
        if not waiting:  # the other steps of this pass resume before this callback runs, and queue theirs
            loop.call_soon(self._send_queued, target.peer_id)
        waiting.append(queued)
        return queued.accepted

    def _send_queued(self, peer_id: str) -> None:
        for chunk in _chunks(self._queued.pop(peer_id, [])):
            task = asyncio.create_task(self._send(peer_id, chunk))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _send(self, peer_id: str, chunk: list[_Queued]) -> None:
        request = protocol.pack_request(protocol.Push(items=[q.item for q in chunk], member=self.dht.member_token),
                                        *(t for q in chunk for t in q.tensors))
        accepted = [False] * len(chunk)
        try:
            reply = await asyncio.wait_for(self.dht.call(peer_id, protocol.PUSH, request, self._relays.get(peer_id)),
                                           PUSH_TIMEOUT)
            message, _ = protocol.unpack_response(reply)
            if isinstance(message, protocol.PushReply) and len(message.accepted) == len(chunk):
                accepted = message.accepted
            else:
                logger.debug(f"push to {peer_id[-8:]} refused: {message}")
        except Exception as e:
            logger.debug(f"push to {peer_id[-8:]} failed: {e!r}")
        finally:  # also when cancelled by close(): nobody is left waiting
            for q, ok in zip(chunk, accepted):
                self.metrics.pushes.labels("sent", "accepted" if ok else "refused").inc()
                if not q.accepted.done():
                    q.accepted.set_result(ok)

    def close(self) -> None:
        """Stop the calls in flight: on shutdown their results can no longer reach anyone."""
        for call in self._calls:
            call.cancel()


def _chunks(queued: list[_Queued]) -> Iterator[list[_Queued]]:
    """Consecutive runs of pushes that fit one call."""
    chunk: list[_Queued] = []
    size = 0
    for q in queued:
        if chunk and (size + q.bytes > protocol.MAX_PUSH_BYTES or len(chunk) == protocol.MAX_PUSH_ITEMS):
            yield chunk
            chunk, size = [], 0
        chunk.append(q)
        size += q.bytes
    if chunk:
        yield chunk
