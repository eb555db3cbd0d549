"""Inference sessions: one stream per hop of a route, KV caches kept by the peers.

The session keeps every input it sent to each hop. When a hop fails it bans the peer, routes
around the failed blocks and replays those inputs to the new peers, so their caches hold exactly
what the failed peer's did, and the caller sees nothing but a delay.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, NamedTuple, Sequence, TypeVar

import torch
from hivemind.proto import runtime_pb2
from pydantic import BaseModel, ConfigDict, Field

from client.route import Hop, build_route
from client.settings import ClientSettings
from client.swarm_view import Placement, SwarmView
from swarm import protocol
from swarm.errors import ProtocolError, RouteError, SwarmError

logger = logging.getLogger(__name__)
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


class HopTiming(BaseModel):
    """One hop of one step as the client saw it: from the previous hop's output (or the step's start) to this one's.

    A pydantic model because the gateway serves timelines as they are (client/gateway/console.py).
    """

    model_config = ConfigDict(frozen=True)

    peer_id: str
    start: int
    end: int
    began_ms: float = Field(description="since the step started, as the client saw it")
    ms: float = Field(description="from the previous hop's output (or the step's start) to this hop's")
    by_push: bool = Field(description="the previous hop's peer pushed this hop its input")


class StepTiming(BaseModel):
    """One step through the route: its number, new positions, the trace id every hop logs, and its hops."""

    step: int
    positions: int = Field(description="new positions: the prompt's length for a prefill, 1 for a decode step")
    trace_id: str = Field(description="the id every hop logs for this step")
    hops: list[HopTiming] = []


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


@dataclass
class Bans:
    """Peers that failed recently, each banned for longer every time it fails again."""

    base: float
    limit: float
    until: dict[str, float] = field(default_factory=dict)
    strikes: dict[str, int] = field(default_factory=dict)

    def ban(self, peer_id: str) -> None:
        self.strikes[peer_id] = self.strikes.get(peer_id, 0) + 1
        seconds = min(self.base * 2 ** (self.strikes[peer_id] - 1), self.limit)
        self.until[peer_id] = time.monotonic() + seconds

    def active(self) -> set[str]:
        now = time.monotonic()
        return {p for p, t in self.until.items() if t > now}


class InferenceSession:
    """A generation's path through the swarm. Opens its streams on the first step (when the batch size is known)."""

    def __init__(self, view: SwarmView, settings: ClientSettings, bans: Bans, max_length: int):
        self.view, self.settings, self.bans = view, settings, bans
        self.max_length = max_length
        self.streams: list[HopStream] = []
        self.history: dict[int, list[StepInput]] = {}  # what entered block b, step by step
        self.position = 0  # positions sent so far
        self.steps = 0
        self.batch_size: int | None = None
        self.closed = False
        self.pending_reorder: list[int] | None = None  # beam search's choice of rows, sent with the next step
        self.timings: list[StepTiming] = []  # per step, each hop's time as the client saw it
        self.probe = Probe(view, settings.probe_after, settings.probe_timeout)

    @property
    def route(self) -> list[Hop]:
        return [s.hop for s in self.streams]

    def reorder(self, rows: list[int]) -> None:
        """Beam search: from the next step on, row i continues what row rows[i] held (in every peer's cache)."""
        if self.batch_size is None:
            return  # nothing is cached yet
        protocol.check_reorder(rows, self.batch_size)
        if self.pending_reorder is not None:  # two reorders before a step: row i takes old row pending[rows[i]]
            rows = [self.pending_reorder[r] for r in rows]
        self.pending_reorder = None if rows == list(range(self.batch_size)) else rows

    async def step(
        self, hidden: torch.Tensor, mask: torch.Tensor | None = None, on_last_hop: Callable[[], None] = lambda: None
    ) -> torch.Tensor:
        """Send new positions through every hop; returns the hidden states after the last block.

        `on_last_hop` is called when the input's last chunk reaches the last hop: the caller's next use of the
        output is near.
        """
        if self.closed:
            raise SwarmError("the inference session is closed")
        if self.position + hidden.shape[1] > self.max_length:
            raise SwarmError(f"session max_length {self.max_length} exceeded: {self.position} + {hidden.shape[1]} positions")
        if not self.streams:  # first step, or the first open failed
            self.batch_size = hidden.shape[0]
            await self._open_route(0, self.view.model.num_blocks)
        elif hidden.shape[0] != self.batch_size:
            raise SwarmError(f"batch size {hidden.shape[0]} does not match the session's {self.batch_size}")
        chunk = max(1, protocol.MAX_STEP_TOKENS // self.batch_size)  # a long prompt goes in several messages
        outputs = []
        for offset in range(0, hidden.shape[1], chunk):
            part_mask = None if mask is None else mask[:, offset : offset + chunk]
            last_chunk = offset + chunk >= hidden.shape[1]  # an earlier chunk's output is not what the caller uses
            sent = StepInput(hidden[:, offset : offset + chunk], part_mask, self.pending_reorder)
            outputs.append(await self._through_route(sent, on_last_hop if last_chunk else lambda: None))
            self.pending_reorder = None
        self.position += hidden.shape[1]
        return torch.cat(outputs, dim=1)

    async def _through_route(self, sent: StepInput, on_last_hop: Callable[[], None]) -> torch.Tensor:
        index, retries = 0, 0
        pushed_to: HopStream | None = None  # the stream the previous hop's peer handed this input to
        hidden = sent.hidden
        timing = StepTiming(step=self.steps, positions=hidden.shape[1], trace_id=uuid.uuid4().hex[:16])
        started = previous = time.perf_counter()
        while index < len(self.streams):
            stream = self.streams[index]
            if index == len(self.streams) - 1:
                on_last_hop()
            try:
                later = self.streams[index + 1 :] if self.settings.push else []
                output, pushed = await stream.step(
                    hidden, sent.mask, self.settings.step_timeout, self.probe, later, send=stream is not pushed_to,
                    trace_id=timing.trace_id, reorder=sent.reorder,
                )
            except HopFailed as e:
                retries += 1
                if retries > self.settings.max_retries:
                    raise RouteError(f"gave up on blocks {stream.hop.start}:{stream.hop.end} after {retries - 1} reroutes: {e}") from None
                logger.warning(f"{e}; rerouting blocks {stream.hop.start}:{stream.hop.end}")
                if e.code != "relay":  # a relay's limit says nothing about the peer: it may serve the new stream
                    self.bans.ban(stream.hop.peer_id)
                stream.close()
                await self._replace(index)
                continue
            # kept only once the hop took it: a failover replays exactly what the failed peer holds
            self.history.setdefault(stream.hop.start, []).append(StepInput(hidden, sent.mask, sent.reorder))
            now = time.perf_counter()
            timing.hops.append(HopTiming(peer_id=stream.hop.peer_id, start=stream.hop.start, end=stream.hop.end,
                                         began_ms=round((previous - started) * 1000, 2),
                                         ms=round((now - previous) * 1000, 2), by_push=stream is pushed_to))
            previous = now
            pushed_to = later[0] if pushed else None
            hidden, index = output, index + 1
        self.steps += 1
        self.timings.append(timing)
        logger.debug(f"step {timing.trace_id}: " + ", ".join(f"{h.peer_id[-8:]}[{h.start}:{h.end}] {h.ms:.1f} ms"
                                                           for h in timing.hops))
        return hidden

    async def _open_route(self, first: int, last: int) -> list[HopStream]:
        """Open streams that cover [first, last), skipping peers that refuse or fail to answer."""
        assert self.batch_size is not None  # known from the first step, which opens the first route
        deadline = time.monotonic() + self.settings.route_timeout
        full: set[str] = set()  # peers whose cache cannot hold this session: skipped here, not banned
        while True:
            await self.view.ensure_fresh()
            banned = self.bans.active() | full
            peers = self.view.online_peers()  # all of them: a RouteError counts the skipped ones
            rtts = await self.view.rtts([p for p in peers if p not in banned])
            try:
                hops = build_route(self.view.model.num_blocks, peers, rtts, banned, first, last, placed=self.view.placed())
            except RouteError as e:
                if time.monotonic() > deadline:
                    raise self.view.explained(e) from None
                await asyncio.sleep(0.5)
                await self.view.refresh()
                continue
            # placed before the first await, so sessions opening at the same moment spread over replicas
            opened = [HopStream(hop, self.view.place(hop.peer_id)) for hop in hops]
            try:
                for stream in opened:
                    await stream.open(self.view, self.max_length, self.batch_size, self.settings.connect_timeout)
            except HopFailed as e:
                logger.warning(f"{e}; trying another route")
                if e.code == "cache_full":  # busy, not broken: other sessions may still use it
                    full.add(stream.hop.peer_id)
                else:
                    self.bans.ban(stream.hop.peer_id)
                for failed in opened:
                    failed.close()
                continue
            if first == 0 and last == self.view.model.num_blocks:
                self.streams = opened
            return opened

    async def _replace(self, index: int) -> None:
        """Route around the failed hop and replay its inputs so the new peers' caches catch up."""
        failed = self.streams[index].hop
        replay = self.history.get(failed.start, [])
        while True:
            new = await self._open_route(failed.start, failed.end)
            try:
                for stream in new:
                    outputs = []
                    for sent in replay:
                        output, _ = await stream.step(sent.hidden, sent.mask, self.settings.step_timeout, self.probe,
                                                      reorder=sent.reorder)
                        outputs.append(StepInput(output, sent.mask, sent.reorder))
                    if stream.hop.end != failed.end:
                        self.history[stream.hop.end] = outputs
                    replay = outputs
                break
            except HopFailed as e:
                logger.warning(f"{e} during replay; trying another route")
                self.bans.ban(stream.hop.peer_id)
                for s in new:
                    s.close()
                replay = self.history.get(failed.start, [])
        self.streams[index : index + 1] = new

    def close(self) -> None:
        if not self.closed:
            for stream in self.streams:
                stream.close()
            self.closed = True
