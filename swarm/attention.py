"""Ragged attention: the new positions of several sessions in one pass through a span.

A batched step flattens every session's new positions into one sequence [1, tokens, hidden], so
the projections and MLPs run as one matrix-matrix product instead of one matrix-vector product per
session. Attention is the only part that must see sessions apart: each has its own cache length
and mask, so this function cuts the flat sequence into segments, stores each segment's keys and
values in its session's cache, and runs torch's SDPA per segment with the query heads grouped over
the key/value heads (`enable_gqa`, no copies). It calls SDPA itself rather than through
transformers' wrapper: every session in a pass pays this per layer, and with eight sessions the
direct call (with one index per cache block) made a pass a quarter faster (docs/batching.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from swarm.cache import SpanCache

NAME = "swarm_ragged"


@dataclass
class Segment:
    """One session's new positions inside a flattened step: `rows` x `length` tokens, row-major."""

    cache: SpanCache
    rows: int
    length: int
    masks: dict[int | None, torch.Tensor | None]  # per sliding window: [rows, 1, length, cache positions]

    @property
    def tokens(self) -> int:
        return self.rows * self.length


def ragged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    segments: list[Segment],
    window: int | None,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [1, heads, tokens, dim], key/value [1, kv_heads, tokens, dim] -> [1, tokens, heads, dim]."""
    sizes = [segment.tokens for segment in segments]
    outputs = []
    for segment, q, k, v in zip(segments, *(t[0].split(sizes, dim=1) for t in (query, key, value))):
        q, k, v = (t.unflatten(1, (segment.rows, segment.length)).transpose(0, 1) for t in (q, k, v))
        keys, values = segment.cache.update(k, v, module.layer_idx)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=segment.masks[window], scale=scaling, enable_gqa=True
        )
        outputs.append(out.transpose(1, 2).flatten(0, 1))  # [rows * length, heads, dim]
    return torch.cat(outputs)[None], None


AttentionInterface.register(NAME, ragged_attention)
