"""Inference sessions: one stream per hop of a route, KV caches kept by the peers.

The session keeps every input it sent to each hop. When a hop fails it bans the peer, routes
around the failed blocks and replays those inputs to the new peers, so their caches hold exactly
what the failed peer's did, and the caller sees nothing but a delay. After each step its
Verifier may check the hops' outputs on other peers (client/verification.py); from a hop found
lying on, the route is rebuilt the same way, replaying that hop's inputs to honest peers.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field

from client.hop_stream import HopFailed, HopStream, Probe, StepInput
from client.route import Bans, Hop, build_route
from client.settings import ClientSettings
from client.swarm_view import SwarmView
from client.verification import HopOutput, Verifier
from swarm import protocol
from swarm.dtypes import DTypeName
from swarm.errors import RouteError, SwarmError

logger = logging.getLogger(__name__)


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
        self.verifier = Verifier(view, settings, bans, max_length, self.probe)
        self.caught: list[tuple[str, int]] = []  # (peer id, step) of each hop found lying

    @property
    def route(self) -> list[Hop]:
        return [s.hop for s in self.streams]

    def last_dtype(self) -> DTypeName | None:
        """The precision the route's last peer announces: its outputs are exact in it, whatever the wire's dtype."""
        return self.view.dtype_of(self.streams[-1].hop.peer_id) if self.streams else None

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
        outputs: list[HopOutput] = []
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
                if e.code != "relay":  # a relay's limit says nothing about the peer: it may serve a new stream
                    self.bans.ban(stream.hop.peer_id)
                stream.close()
                await self._replace(index)
                continue
            # kept only once the hop took it: a failover replays exactly what the failed peer holds
            self.history.setdefault(stream.hop.start, []).append(StepInput(hidden, sent.mask, sent.reorder))
            outputs.append(HopOutput(stream, self.history[stream.hop.start][-1], output))
            now = time.perf_counter()
            timing.hops.append(HopTiming(peer_id=stream.hop.peer_id, start=stream.hop.start, end=stream.hop.end,
                                         began_ms=round((previous - started) * 1000, 2),
                                         ms=round((now - previous) * 1000, 2), by_push=stream is pushed_to))
            previous = now
            pushed_to = later[0] if pushed else None
            hidden, index = output, index + 1
        assert self.batch_size is not None  # set by the first step
        while (liar := await self.verifier.first_liar(outputs, self.history, self.batch_size)) is not None:
            self.caught.append((outputs[liar].stream.hop.peer_id, self.steps))
            first = self.streams.index(outputs[liar].stream)
            for stream in self.streams[first:]:
                stream.close()
            outputs = await self._replace(first, len(self.streams) - 1)  # this step again, from honest inputs on
            hidden = outputs[-1].output
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
        waited = False
        while True:
            await self.view.ensure_fresh()
            banned = self.bans.active() | full
            peers = self.view.online_peers()  # all of them: a RouteError counts the skipped ones
            rtts = await self.view.rtts([p for p in peers if p not in banned], recheck_unreachable=waited)
            try:
                hops = build_route(self.view.model.num_blocks, peers, rtts, banned, first, last, placed=self.view.placed())
            except RouteError as e:
                if time.monotonic() > deadline:
                    raise self.view.explained(e) from None
                waited = True
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

    async def _replace(self, first: int, last: int | None = None) -> list[HopOutput]:
        """Route around streams first..last (default: first alone) and replay their inputs, so the new peers'
        caches hold what the old ones' did; returns each new hop's part of the latest step replayed."""
        last = first if last is None else last
        start, end = self.streams[first].hop.start, self.streams[last].hop.end
        while True:
            new = await self._open_route(start, end)
            replay, latest = self.history.get(start, []), []
            try:
                for stream in new:
                    outputs = await stream.replay(replay, self.settings.step_timeout, self.probe)
                    if replay:
                        latest.append(HopOutput(stream, replay[-1], outputs[-1].hidden))
                    if stream.hop.end != end:
                        self.history[stream.hop.end] = outputs
                    replay = outputs
                break
            except HopFailed as e:
                logger.warning(f"{e} during replay; trying another route")
                self.bans.ban(stream.hop.peer_id)
                for s in new:
                    s.close()
        self.streams[first : last + 1] = new
        return latest

    def close(self) -> None:
        if not self.closed:
            for stream in self.streams:
                stream.close()
            self.verifier.close()
            self.closed = True
