"""A span: blocks [start, end) of a model, running hidden states -> hidden states with a session's cache."""
from __future__ import annotations

import copy
from typing import Callable

import torch

from swarm.attention import NAME as RAGGED_ATTENTION, Segment
from swarm.gguf_shards import Form
from swarm.kv_cache import KVCache
from swarm.dtypes import QuantName, to_torch_dtype
from swarm.errors import ProtocolError
from swarm.families import family_of
from swarm.linear import weight_major
from swarm.quantized import check_quantizable, load_block
from swarm.reference import ResolvedModel
from swarm.weights import iter_block_weights


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
        quant: QuantName = "none",
        cache_dtype: str | None = None,
    ):
        self.model, self.start, self.end = model, start, end
        self.dtype, self.device = to_torch_dtype(dtype), torch.device(device)
        self.quant, self.cache_dtype = quant, to_torch_dtype(cache_dtype) if cache_dtype else self.dtype
        config = copy.deepcopy(model.config)
        config._attn_implementation = RAGGED_ATTENTION
        # routed experts (Mixtral) as transformers' plain per-expert loop: a token's result never depends on
        # which other sessions' tokens share the pass
        config._experts_implementation = "eager"
        self.config = config
        self.family = family_of(config)
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.layers = torch.nn.ModuleList()
        form: Form = "q4" if quant == "int4" else "float"
        for index, state in zip(range(start, end), iter_block_weights(model, start, end, form)):
            with torch.device("meta"):
                layer = self.family.decoder_layer(config, layer_idx=index)
            check_quantizable(layer, quant, self.device)
            load_block(layer, self.family.block_weights(state), quant)
            self.layers.append(weight_major(layer.to(device=self.device, dtype=self.dtype).eval()))
            if on_block_loaded is not None:
                on_block_loaded(index)
        self.rotary = self.family.rotary_embedding(config).to(self.device)
        self.windows = [self.family.sliding_window(config, i) for i in range(start, end)]
        self.layer_types = [self.family.layer_type(config, i) for i in range(start, end)]

    def subspan(self, start: int, end: int) -> "Span":
        """Blocks [start, end) of this span, sharing its weights: a hop may use part of a peer's span."""
        if not self.start <= start < end <= self.end:
            raise ProtocolError(f"this peer serves blocks {self.start}:{self.end}, not {start}:{end}")
        part = copy.copy(self)
        part.start, part.end = start, end
        part.layers = self.layers[start - self.start : end - self.start]
        part.windows = self.windows[start - self.start : end - self.start]
        part.layer_types = self.layer_types[start - self.start : end - self.start]
        return part

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        return KVCache(
            self.start, self.num_blocks, batch_size, max_length, self.num_kv_heads, self.head_dim, self.cache_dtype,
            self.device,
        )

    def check(self, hidden: torch.Tensor, cache: KVCache) -> None:
        """Raise ProtocolError if `hidden` cannot extend `cache`: checked before a step joins a batch."""
        batch, length, _ = hidden.shape
        if cache.batch_size != batch:
            raise ProtocolError(f"batch size {batch} does not match the session's {cache.batch_size}")
        if cache.length + length > cache.max_length:
            raise ProtocolError(
                f"{length} new positions after {cache.length} exceed the session's max length {cache.max_length}"
            )

    def forward(
        self, hidden: torch.Tensor, cache: KVCache | None = None, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run new positions through the span. `attention_mask` marks real tokens (1) and padding (0)."""
        if cache is None:
            cache = self.new_cache(hidden.shape[0], hidden.shape[1])
        return self.forward_batch([(hidden, cache, attention_mask)])[0]

    @torch.inference_mode()
    def forward_batch(
        self, steps: list[tuple[torch.Tensor, KVCache, torch.Tensor | None]]
    ) -> list[torch.Tensor]:
        """Several sessions' new positions in one pass: (hidden [rows, new, hidden], cache, mask) each.

        The positions are flattened into one sequence so every matrix product covers all sessions;
        attention keeps them apart (swarm/attention.py).
        """
        for hidden, cache, _ in steps:
            self.check(hidden, cache)
        segments, positions, real_counts = [], [], []
        for (hidden, cache, _), real in zip(steps, self._real_positions(steps)):
            rows, length, _ = hidden.shape
            start, end = cache.length, cache.length + length
            cache.valid[:, start:end] = real
            real_counts.append(real.sum(-1))
            positions.append((cache.seen[:, None] + real.long().cumsum(-1) - 1).masked_fill(~real, 1).flatten())
            masks = {window: self._mask(cache, start, end, window) for window in set(self.windows)}
            segments.append(Segment(cache, rows, length, masks))
        # the hidden states cross to the device once per pass, and the outputs come back once
        flat = torch.cat([h.flatten(0, 1) for h, _, _ in steps]).to(device=self.device, dtype=self.dtype)[None]
        position_ids = torch.cat(positions)[None]
        if self.family.per_layer_rope:
            by_type = {kind: self.rotary(flat, position_ids, kind) for kind in set(self.layer_types)}
            position_embeddings = [by_type[kind] for kind in self.layer_types]
        else:
            position_embeddings = [self.rotary(flat, position_ids)] * len(self.layers)
        for layer, window, embeddings in zip(self.layers, self.windows, position_embeddings):
            flat = layer(
                flat,
                position_ids=position_ids,
                position_embeddings=embeddings,
                segments=segments,
                window=window,
            )
        on_host = flat[0].to("cpu")  # the network takes host tensors; copying waits for the pass to finish
        outputs, offset = [], 0
        for segment, real in zip(segments, real_counts):
            outputs.append(on_host[offset : offset + segment.tokens].unflatten(0, (segment.rows, segment.length)))
            offset += segment.tokens
            segment.cache.length += segment.length
            segment.cache.seen += real
        return outputs

    def _real_positions(self, steps: list[tuple[torch.Tensor, KVCache, torch.Tensor | None]]) -> list[torch.Tensor]:
        """Per step, [rows, new] booleans on the device: which new positions are real tokens, not padding.

        The masks that exist cross to the device in one copy; steps without one are all real.
        """
        given = [mask.bool().flatten() for _, _, mask in steps if mask is not None]
        moved = iter(torch.cat(given).to(self.device).split([m.numel() for m in given])) if given else iter(())
        return [torch.ones(hidden.shape[:2], dtype=torch.bool, device=self.device) if mask is None
                else next(moved).view(hidden.shape[:2]) for hidden, _, mask in steps]

    @staticmethod
    def _mask(cache: KVCache, start: int, end: int, window: int | None) -> torch.Tensor | None:
        """[batch, 1, new, all] booleans: causal, real keys only, within the window; every query sees itself.

        None when every query sees every key (a decode step without padding): SDPA then skips the mask.
        """
        queries = torch.arange(start, end, device=cache.valid.device)[:, None]
        keys = torch.arange(end, device=cache.valid.device)[None, :]
        allowed = (keys <= queries) & cache.valid[:, None, :end]
        if window is not None:
            allowed &= (queries - keys) < window
        allowed |= keys == queries  # a padding query attends to itself rather than to nothing (no NaN)
        return None if bool(allowed.all()) else allowed[:, None]
