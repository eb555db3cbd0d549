"""Ragged attention: the new positions of several sessions in one pass through a span.

A batched step flattens every session's new positions into one sequence [1, tokens, hidden], so
the projections and MLPs run as one matrix-matrix product instead of one matrix-vector product per
session. Attention is the only part that must see sessions apart: each has its own cache length
and mask, so this function cuts the flat sequence into segments, stores each segment's keys and
values in its session's cache, and runs transformers' own SDPA attention per segment (same
numerics as a session running alone).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from swarm.cache import SpanCache

NAME = "swarm_ragged"


@dataclass
class Segment:
    """One session's new positions inside a flattened step: `rows` x `length` tokens, row-major."""

    cache: SpanCache
    rows: int
    length: int
    masks: dict[int | None, torch.Tensor]  # per sliding window: [rows, 1, length, cache positions]

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
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [1, heads, tokens, dim], key/value [1, kv_heads, tokens, dim] -> [1, tokens, heads, dim]."""
    outputs, offset = [], 0
    for segment in segments:
        cut = slice(offset, offset + segment.tokens)
        q, k, v = (t[0, :, cut].unflatten(1, (segment.rows, segment.length)).transpose(0, 1) for t in (query, key, value))
        keys, values = segment.cache.update(k, v, module.layer_idx)
        out, _ = sdpa_attention_forward(module, q, keys, values, segment.masks[window], **kwargs)
        outputs.append(out.flatten(0, 1))  # [rows * length, heads, dim]
        offset += segment.tokens
    return torch.cat(outputs)[None], None


AttentionInterface.register(NAME, ragged_attention)
