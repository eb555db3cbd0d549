"""DistributedModelForCausalLM: a transformers causal LM whose transformer blocks run in the swarm.

Embeddings, the final norm and the LM head run here; `generate`, `forward` and `pipeline` are
transformers' own code paths. The KV cache transformers passes from step to step is the swarm session
(client/cache.py), so each step sends the peers only its new positions.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
from typing import Iterator

import torch
from transformers import GenerationConfig, GenerationMixin, LogitsProcessorList, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from client import loop
from client.cache import SessionCache
from client.generation import SeededSampling, eos_ids
from client.head import SharedHead
from client.route import build_route
from client.session import Bans, InferenceSession
from client.settings import ClientSettings
from client.swarm_view import SwarmView
from swarm import protocol
from swarm.client_parts import ClientParts
from swarm.dht import SwarmDHT
from swarm.errors import RouteError, SwarmError
from swarm.membership import SwarmKey
from swarm.reference import ResolvedModel, resolve_model


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    """Used like transformers' AutoModelForCausalLM; every transformer block runs on peers found through the DHT."""

    config_class = PretrainedConfig
    base_model_prefix = "swarm"
    main_input_name = "input_ids"

    def __init__(self, model: ResolvedModel, settings: ClientSettings):
        super().__init__(model.config)
        self.resolved, self.settings = model, settings
        # a route of any precision may come back in float16: the head then reads a float16 copy (swarm/client_parts.py)
        self.parts = ClientParts(model, settings.dtype or "float32", half_head=settings.dtype is None)
        self.head = SharedHead(self.parts.logits, settings.head_batch_wait)
        self.generation_config = GenerationConfig.from_model_config(model.config)
        if self.generation_config.pad_token_id is None and (eos := eos_ids(self.generation_config)):
            self.generation_config.pad_token_id = eos[0]  # what transformers falls back to, without its warning per call
        self.bans = Bans(settings.ban_seconds, settings.max_ban_seconds)
        swarm_key = SwarmKey.load(settings.swarm_key) if settings.swarm_key else None
        self.dht = loop.run(SwarmDHT.create(settings.initial_peers, client_mode=True, swarm_key=swarm_key))
        self.view = SwarmView(self.dht, model, settings.refresh_period, dtype=settings.dtype, quant=settings.quant)
        self._local = threading.local()  # the session opened by inference_session(), per calling thread

    @classmethod
    def from_pretrained(cls, ref: str | None = None, *args, initial_peers: list[str] | None = None,  # type: ignore[override]
                        **settings) -> "DistributedModelForCausalLM":
        """Resolve `ref` exactly as the peers do (same DHT prefix) and join the swarm as a client."""
        if args:
            raise TypeError("from_pretrained takes the model and keyword settings only, e.g. initial_peers=[...]")
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
        """A new inference session, closed on the peers when the block ends; generate(session=...) continues it."""
        session = InferenceSession(self.view, self.settings, self.bans, max_length)
        try:
            yield session
        finally:
            loop.run(_close(session))

    def generate(  # type: ignore[override]  # adds session= and seed=
        self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, *,
        session: InferenceSession | None = None, seed: int | None = None, **kwargs,
    ):
        """transformers' generate, with a swarm session as its cache.

        The session is the caller's (`session=`, `past_key_values=`, or an inference_session() block),
        which the generation continues, or one of its own for this call. `input_ids` is the whole sequence
        so far; only the positions the session lacks are sent. With `seed`, sampling draws from a
        generator of its own, so it repeats itself even while other threads sample.
        """
        cache = kwargs.pop("past_key_values", None)
        if isinstance(cache, InferenceSession):
            cache = SessionCache(cache)
        if cache is not None and not isinstance(cache, SessionCache):
            raise TypeError(f"the swarm keeps the KV cache on its peers: pass a session as past_key_values, not a {type(cache).__name__}")
        config = copy.deepcopy(generation_config or self.generation_config)
        config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k)})
        if seed is not None and config.do_sample:
            kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), SeededSampling(seed)])
        if config.use_cache is False:  # every step resends the whole sequence: no session needed
            return super().generate(inputs, generation_config, **kwargs)  # type: ignore[misc]  # a Protocol for self
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if ids is None:
            raise ValueError("generate needs input_ids: the swarm has no encoder to start from")
        session = cache.session if cache is not None else session or self.active_session
        with contextlib.ExitStack() as stack:
            if session is None:
                total = ids.shape[-1] + config.max_new_tokens if config.max_new_tokens is not None else config.max_length
                session = stack.enter_context(self.session(total))
            if session.position >= ids.shape[-1]:
                raise SwarmError(f"the session holds {session.position} positions but input_ids has only "
                                 f"{ids.shape[-1]}: nothing new to send")
            return super().generate(  # type: ignore[misc]  # transformers types self as a Protocol
                inputs, generation_config, past_key_values=cache or SessionCache(session), **kwargs)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: SessionCache | None = None, inputs_embeds: torch.Tensor | None = None,
                logits_to_keep: int = 0, **_) -> CausalLMOutputWithPast:
        """Logits of the new positions. Through the session of `past_key_values` (as generate calls it),
        else through the peers' stateless forward, which keeps nothing."""
        if input_ids is not None:
            hidden = self.parts.embed(input_ids)
        elif inputs_embeds is not None:
            hidden = inputs_embeds
        else:
            raise ValueError("give input_ids or inputs_embeds")
        if past_key_values is None:
            output = loop.run(self._forward(hidden, attention_mask))
        elif isinstance(past_key_values, SessionCache):
            session = past_key_values.session
            mask = None if attention_mask is None else attention_mask[:, -hidden.shape[1]:]
            if logits_to_keep == 1:  # generate's case: the last position through the head shared with other sessions
                return CausalLMOutputWithPast(logits=self._last_logits(session, hidden, mask)[:, None],
                                              past_key_values=past_key_values)
            output = loop.run(session.step(hidden, mask))
        else:
            raise TypeError(f"the swarm keeps the KV cache on its peers: pass a session as past_key_values, not a {type(past_key_values).__name__}")
        logits = self.parts.logits(output if logits_to_keep == 0 else output[:, -logits_to_keep:])
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values)

    def _last_logits(self, session: InferenceSession, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        try:
            output = loop.run(session.step(hidden, mask, on_last_hop=lambda: self.head.expect(session)))
        except BaseException:
            self.head.forget(session)  # it will not ask: nobody waits for it
            raise
        last = output[:, -1]
        if self.parts.half_head is not None and session.last_dtype() == "float16":
            last = last.to(torch.float16)  # exactly: the last peer computed it in float16
        return self.head(last, session)

    async def _forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        await self.view.ensure_fresh()
        peers = self.view.online_peers()
        try:
            route = build_route(self.resolved.num_blocks, peers, await self.view.rtts(list(peers)), self.bans.active())
        except RouteError as e:
            raise self.view.explained(e) from None
        for hop in route:
            request = protocol.pack_request(protocol.ForwardRequest(start=hop.start, end=hop.end, member=self.dht.member_token),
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
