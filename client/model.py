"""DistributedModelForCausalLM: a causal LM whose blocks run in the swarm, used like a transformers model."""
from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Generator, Iterator

import torch
from transformers import GenerationConfig

from client import loop
from client.generation import decode_tokens, generation_config
from client.head import SharedHead
from client.route import build_route
from client.session import Bans, InferenceSession
from client.settings import ClientSettings
from client.swarm_view import SwarmView
from swarm import protocol
from swarm.client_parts import ClientParts
from swarm.dht import SwarmDHT
from swarm.errors import RouteError, SwarmError
from swarm.reference import ResolvedModel, resolve_model


class DistributedModelForCausalLM:
    """Embeddings and LM head run here; every transformer block runs on peers found through the DHT."""

    def __init__(self, model: ResolvedModel, settings: ClientSettings):
        self.resolved, self.settings = model, settings
        self.config = model.config
        self.parts = ClientParts(model, settings.dtype or "float32")
        self.head = SharedHead(self.parts.logits, settings.head_batch_wait)
        self.generation_config = GenerationConfig.from_model_config(model.config)
        self.bans = Bans(settings.ban_seconds, settings.max_ban_seconds)
        self.dht = loop.run(SwarmDHT.create(settings.initial_peers, client_mode=True))
        self.view = SwarmView(self.dht, model, settings.refresh_period, dtype=settings.dtype, quant=settings.quant)
        self._local = threading.local()  # the session opened by inference_session(), per calling thread

    @classmethod
    def from_pretrained(cls, ref: str | None = None, initial_peers: list[str] | None = None, **settings) -> "DistributedModelForCausalLM":
        """Resolve `ref` exactly as the peers do (same DHT prefix) and join the swarm as a client."""
        return cls(resolve_model(ref), ClientSettings(initial_peers=initial_peers or [], **settings))

    @contextlib.contextmanager
    def inference_session(self, max_length: int) -> Iterator[InferenceSession]:
        """Inside the block, generate() continues this session: history is never resent."""
        with self.session(max_length) as session:
            previous, self._local.active = self.active_session, session
            try:
                yield session
            finally:
                self._local.active = previous

    @property
    def active_session(self) -> InferenceSession | None:
        """The session of the innermost inference_session() block of the calling thread, if any."""
        return getattr(self._local, "active", None)

    @contextlib.contextmanager
    def session(self, max_length: int) -> Iterator[InferenceSession]:
        """A new inference session, closed on the peers when the block ends; pass it to generate or iter_tokens."""
        session = InferenceSession(self.view, self.settings, self.bans, max_length)
        try:
            yield session
        finally:
            loop.run(_close(session))

    def step(self, session: InferenceSession, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the last position after sending new tokens through an open session."""
        hidden = self.parts.embed(input_ids)
        try:
            output = loop.run(session.step(hidden, attention_mask, on_last_hop=lambda: self.head.expect(session)))
        except BaseException:
            self.head.forget(session)  # it will not ask: nobody waits for it
            raise
        return self.head(output[:, -1], session)

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        session: InferenceSession | None = None,
        streamer=None,
        stop_strings: list[str] | str | None = None,
        tokenizer=None,
        **generation_kwargs,
    ) -> torch.Tensor:
        """Like transformers' generate for causal LMs: returns the prompt followed by the new tokens.

        `input_ids` is the whole sequence so far; within a session only unseen positions are sent.
        """
        input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        if streamer is not None:
            streamer.put(input_ids.cpu())
        sequence = input_ids
        for tokens in self.iter_tokens(input_ids, attention_mask, max_new_tokens, session, stop_strings, tokenizer,
                                       **generation_kwargs):
            sequence = torch.cat([sequence, tokens[:, None]], dim=1)
            if streamer is not None:
                streamer.put(tokens.cpu())
        if streamer is not None:
            streamer.end()
        return sequence

    def iter_tokens(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        session: InferenceSession | None = None,
        stop_strings: list[str] | str | None = None,
        tokenizer=None,
        **generation_kwargs,
    ) -> Generator[torch.Tensor, None, None]:
        """The new tokens of every row, one step at a time, as they are decoded."""
        config = generation_config(self.generation_config, generation_kwargs)
        input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        stop_strings = [stop_strings] if isinstance(stop_strings, str) else stop_strings
        session = session or self.active_session
        with contextlib.ExitStack() as stack:
            if session is None:
                session = stack.enter_context(self.session(input_ids.shape[1] + max_new_tokens))
            seen = session.position
            if seen > input_ids.shape[1]:
                raise SwarmError(f"the session has seen {seen} positions but input_ids has only {input_ids.shape[1]}")
            first_logits = session.last_logits if seen == input_ids.shape[1] else None
            if seen == input_ids.shape[1] and first_logits is None:
                raise SwarmError("input_ids holds nothing new for this session")

            def next_logits(new_ids: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
                session.last_logits = self.step(session, new_ids, new_mask)
                return session.last_logits

            yield from decode_tokens(
                next_logits, input_ids[:, seen:], attention_mask[:, seen:], config, max_new_tokens,
                stop_strings, tokenizer, first_logits, full_prefix=input_ids[:, :seen], seed=generation_kwargs.get("seed"),
            )

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for every position, through the peers' stateless forward RPC (no session)."""
        hidden = self.parts.embed(input_ids)
        output = loop.run(self._forward(hidden, attention_mask))
        return self.parts.logits(output)

    async def _forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        await self.view.ensure_fresh()
        peers = self.view.online_peers()
        try:
            route = build_route(self.resolved.num_blocks, peers, await self.view.rtts(list(peers)), self.bans.active())
        except RouteError as e:
            raise self.view.explained(e) from None
        for hop in route:
            request = protocol.pack_request(protocol.ForwardRequest(start=hop.start, end=hop.end),
                                            *protocol.input_tensors(hidden, mask))
            message, tensors = await asyncio.wait_for(self._call_forward(hop.peer_id, request), self.settings.step_timeout)
            if isinstance(message, protocol.ErrorReply):
                raise SwarmError(f"peer {hop.peer_id[-8:]} failed blocks {hop.start}:{hop.end}: {message.message}")
            hidden = tensors[0]
        return hidden

    async def _call_forward(self, peer_id: str, request):
        responses = await self.dht.iterate(peer_id, protocol.FORWARD, request, await self.view.reach(peer_id))
        return protocol.unpack_response(await anext(responses))

    def close(self) -> None:
        loop.run(self._shutdown())

    async def _shutdown(self) -> None:
        await self.view.close()
        await self.dht.shutdown()


async def _close(session: InferenceSession) -> None:
    session.close()
