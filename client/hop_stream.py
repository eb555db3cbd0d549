"""One open stream to one peer for a hop of a route, and the inputs it was sent, kept for replay."""
from __future__ import annotations

import asyncio
import secrets
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, NamedTuple, Sequence, TypeVar

import torch
from hivemind.proto import runtime_pb2

from client.route import Hop
from client.swarm_view import Placement, SwarmView
from swarm import protocol
from swarm.errors import ProtocolError, SwarmError

Reply = TypeVar("Reply", protocol.Opened, protocol.StepResult)


class HopFailed(SwarmError):
    """A peer failed us: error reply, lost connection, timeout, or it is leaving."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code  # the peer's ErrorReply code, if it sent one


class HopStream:
    """One open `inference` stream to one peer, for blocks [hop.start, hop.end)."""

    def __init__(self, hop: Hop, placement: Placement | None = None):
        self.hop, self.placement = hop, placement  # the placement counts this stream in the peer's load until closed
        self.relay: str | None = None  # the relay this stream goes through, for a peer behind NAT
        self.session_id = uuid.uuid4().hex  # per stream: a retried open never collides with a slow first one
        self.push_token = secrets.token_hex(16)  # told only to the hops before this one, so only they can push here
        self.steps = 0  # steps this peer has answered: the number of the next one
        self._queue: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue()
        self._responses: AsyncIterator[runtime_pb2.ExpertResponse] | None = None  # once opened

    async def open(self, view: SwarmView, max_length: int, batch_size: int, timeout: float) -> None:
        async def requests():
            while (item := await self._queue.get()) is not None:
                yield item

        message = protocol.OpenSession(
            session_id=self.session_id, start=self.hop.start, end=self.hop.end, max_length=max_length,
            batch_size=batch_size, push_token=self.push_token, member=view.dht.member_token)
        self._queue.put_nowait(protocol.pack_request(message))
        self.relay = await view.reach(self.hop.peer_id)
        try:
            self._responses = await asyncio.wait_for(
                view.dht.iterate(self.hop.peer_id, protocol.INFERENCE, requests(), self.relay), timeout)
        except Exception as e:
            raise HopFailed(f"cannot reach peer {self.hop.peer_id[-8:]}: {e or type(e).__name__}") from None
        await self._receive(protocol.Opened, timeout)

    async def step(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        timeout: float,
        probe: "Probe | None" = None,
        next_streams: Sequence[HopStream] = (),
        send: bool = True,
        trace_id: str | None = None,
        reorder: list[int] | None = None,
    ) -> tuple[torch.Tensor, bool]:
        """This hop's output for new positions, and whether the peer pushed it to the next hop.

        With `next_streams`, the peer also pushes its output to those later hops. If the previous hop
        pushed this input here, `send=False` only waits for the answer. `reorder` (beam search) rearranges
        the rows of the peer's cache before the step, and travels with the push to later hops.
        """
        if send:
            targets = [protocol.NextHop(peer_id=s.hop.peer_id, session_id=s.session_id, step=s.steps,
                                        token=s.push_token, relay=s.relay) for s in next_streams]
            request = protocol.Step(session_id=self.session_id, step=self.steps, next_hops=targets, trace_id=trace_id,
                                    reorder=reorder)
            self._queue.put_nowait(protocol.pack_request(request, *protocol.input_tensors(hidden, mask)))
        message, tensors = await self._receive(protocol.StepResult, timeout, probe)
        if message.step != self.steps or len(tensors) != 1 or tensors[0].shape != hidden.shape:
            raise HopFailed(f"peer {self.hop.peer_id[-8:]} answered with a malformed result")
        self.steps += 1
        return tensors[0], message.pushed and bool(next_streams)

    async def _receive(self, expected: type[Reply], timeout: float,
                       probe: Probe | None = None) -> tuple[Reply, list[torch.Tensor]]:
        """The next reply. While waiting, `probe()` (if given) is awaited every so often and must say the
        peer is alive: a killed peer's p2pd may keep the stream open, a probe notices at once."""
        try:
            proto = await self._next_reply(timeout, probe)
            message, tensors = protocol.unpack_response(proto)
        except asyncio.TimeoutError:
            raise HopFailed(f"peer {self.hop.peer_id[-8:]} did not answer within {timeout:.0f} s") from None
        except StopAsyncIteration:
            raise HopFailed(f"peer {self.hop.peer_id[-8:]} closed the session") from None
        except Exception as e:
            raise HopFailed(f"peer {self.hop.peer_id[-8:]} failed: {e or type(e).__name__}") from None
        if isinstance(message, protocol.ErrorReply):
            if message.code in ("bad_request", "not_member"):  # ours to mend: no other peer would take it either
                raise ProtocolError(f"peer {self.hop.peer_id[-8:]} rejected our request: {message.message}")
            raise HopFailed(f"peer {self.hop.peer_id[-8:]} refused: {message.message}", message.code)
        if isinstance(message, protocol.Leaving):
            raise HopFailed(f"peer {self.hop.peer_id[-8:]} is leaving")
        if not isinstance(message, expected):
            raise HopFailed(f"peer {self.hop.peer_id[-8:]} sent {message.type!r}, expected {expected.__name__}")
        return message, tensors

    async def _next_reply(self, timeout: float, probe: "Probe | None") -> runtime_pb2.ExpertResponse:
        if self._responses is None:
            raise HopFailed(f"the stream to peer {self.hop.peer_id[-8:]} is not open")
        reply = asyncio.ensure_future(anext(self._responses))
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while True:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                interval = remaining if probe is None else min(remaining, probe.after)
                done, _ = await asyncio.wait({reply}, timeout=interval)
                if done:
                    return reply.result()
                if probe is not None and not await probe(self.hop.peer_id, self.relay):
                    raise HopFailed(f"peer {self.hop.peer_id[-8:]} stopped answering (liveness probe failed)")
        finally:
            reply.cancel()

    async def replay(self, inputs: Sequence[StepInput], timeout: float, probe: Probe | None) -> list[StepInput]:
        """Send `inputs` one step each, without pushes; returns this hop's output of each, as the next hop's input."""
        outputs = []
        for sent in inputs:
            output, _ = await self.step(sent.hidden, sent.mask, timeout, probe, reorder=sent.reorder)
            outputs.append(StepInput(output, sent.mask, sent.reorder))
        return outputs

    def close(self) -> None:
        """End the request stream (the peer frees the cache) and read out what the peer still sends."""
        if self.placement is not None:
            self.placement.release()
        self._queue.put_nowait(None)
        if self._responses is not None:
            asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        if self._responses is None:
            return
        try:
            async with asyncio.timeout(10):
                async for _ in self._responses:
                    pass
        except BaseException:
            pass  # the peer may be gone already: nothing to free then


class StepInput(NamedTuple):
    """What one step sent into a hop, kept for replay: a failover repeats the reorders as well as the inputs."""

    hidden: torch.Tensor
    mask: torch.Tensor | None
    reorder: list[int] | None


@dataclass
class Probe:
    """Asks a peer whether it is alive while one of its steps runs long (its event loop never computes)."""

    view: SwarmView
    after: float
    timeout: float

    async def __call__(self, peer_id: str, relay: str | None) -> bool:
        return await self.view.dht.ping(peer_id, self.timeout, relay) is not None


def merged(inputs: Sequence[StepInput]) -> list[StepInput]:
    """The same positions in as few steps as a message holds: consecutive steps join unless a reorder comes between.

    Only for a recomputation compared within a tolerance (client/verification.py): a longer step rounds
    differently, so a failover, which must reproduce the caches exactly, replays step by step.
    """
    joined: list[StepInput] = []
    for sent in inputs:
        last = joined[-1] if joined else None
        if last is None or sent.reorder is not None or \
                last.hidden.shape[0] * (last.hidden.shape[1] + sent.hidden.shape[1]) > protocol.MAX_STEP_TOKENS:
            joined.append(sent)
            continue
        mask = None
        if last.mask is not None or sent.mask is not None:
            mask = torch.cat([m if m is not None else torch.ones(s.hidden.shape[:2], dtype=torch.int64)
                              for m, s in ((last.mask, last), (sent.mask, sent))], dim=1)
        joined[-1] = StepInput(torch.cat([last.hidden, sent.hidden], dim=1), mask, last.reorder)
    return joined
