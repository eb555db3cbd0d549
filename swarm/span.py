"""A span: blocks [start, end) of a model, running hidden states -> hidden states with a session's cache."""
from __future__ import annotations

import copy
from typing import Callable

import torch

from swarm.cache import SpanCache
from swarm.dtypes import to_torch_dtype
from swarm.errors import ProtocolError
from swarm.families import family_of
from swarm.reference import ResolvedModel
from swarm.weights import load_block_weights


class Span:
    """The transformer blocks one peer serves, loaded from their own tensors only."""

    def __init__(
        self,
        model: ResolvedModel,
        start: int,
        end: int,
        dtype: str = "float32",
        device: str = "cpu",
        on_block_loaded: Callable[[int], None] | None = None,
    ):
        self.model, self.start, self.end = model, start, end
        self.dtype, self.device = to_torch_dtype(dtype), torch.device(device)
        config = copy.deepcopy(model.config)
        config._attn_implementation = "sdpa"
        self.config = config
        self.family = family_of(config)
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        weights = load_block_weights(model, start, end)
        self.layers = torch.nn.ModuleList()
        for index, state in zip(range(start, end), weights):
            with torch.device("meta"):
                layer = self.family.decoder_layer(config, layer_idx=index)
            layer.load_state_dict(state, strict=True, assign=True)
            self.layers.append(layer.to(device=self.device, dtype=self.dtype).eval())
            if on_block_loaded is not None:
                on_block_loaded(index)
        self.rotary = self.family.rotary_embedding(config).to(self.device)
        self.windows = [self.family.sliding_window(config, i) for i in range(start, end)]

    def view(self, start: int, end: int) -> "Span":
        """Blocks [start, end) of this span, sharing its weights: a hop may use part of a peer's span."""
        if not self.start <= start < end <= self.end:
            raise ProtocolError(f"blocks {start}:{end} are not within this peer's span {self.start}:{self.end}")
        part = copy.copy(self)
        part.start, part.end = start, end
        part.layers = self.layers[start - self.start : end - self.start]
        part.windows = self.windows[start - self.start : end - self.start]
        return part

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    def cache_bytes_per_token(self) -> int:
        """Memory one token of one session's cache takes on this span: keys and values of every block."""
        return 2 * self.num_blocks * self.num_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def new_cache(self, batch_size: int, max_length: int) -> SpanCache:
        return SpanCache(
            self.start, self.num_blocks, batch_size, max_length, self.num_kv_heads, self.head_dim, self.dtype, self.device
        )

    @torch.inference_mode()
    def forward(
        self, hidden: torch.Tensor, cache: SpanCache | None = None, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run new positions through the span. `attention_mask` marks real tokens (1) and padding (0)."""
        batch, length, _ = hidden.shape
        if cache is None:
            cache = self.new_cache(batch, length)
        if cache.batch_size != batch:
            raise ProtocolError(f"batch size {batch} does not match the session's {cache.batch_size}")
        if cache.length + length > cache.max_length:
            raise ProtocolError(
                f"{length} new positions after {cache.length} exceed the session's max length {cache.max_length}"
            )
        real = torch.ones(batch, length, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        real = real.to(self.device)
        start, end = cache.length, cache.length + length
        cache.valid[:, start:end] = real
        position_ids = (cache.seen[:, None] + real.long().cumsum(-1) - 1).masked_fill(~real, 1)

        hidden = hidden.to(device=self.device, dtype=self.dtype)
        position_embeddings = self.rotary(hidden, position_ids)
        masks = {window: self._mask(cache, start, end, window) for window in set(self.windows)}
        for layer, window in zip(self.layers, self.windows):
            hidden = layer(
                hidden,
                attention_mask=masks[window],
                position_ids=position_ids,
                past_key_values=cache,
                position_embeddings=position_embeddings,
            )
        cache.length = end
        cache.seen += real.sum(-1)
        return hidden

    @staticmethod
    def _mask(cache: SpanCache, start: int, end: int, window: int | None) -> torch.Tensor:
        """[batch, 1, new, all] booleans: causal, real keys only, within the window; every query sees itself."""
        queries = torch.arange(start, end, device=cache.valid.device)[:, None]
        keys = torch.arange(end, device=cache.valid.device)[None, :]
        allowed = (keys <= queries) & cache.valid[:, None, :end]
        if window is not None:
            allowed &= (queries - keys) < window
        allowed |= keys == queries  # a padding query attends to itself rather than to nothing (no NaN)
        return allowed[:, None]
