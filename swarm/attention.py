"""Ragged attention: the new positions of several sessions in one pass through a span.

A batched step flattens every session's new positions into one sequence [1, tokens, hidden], so
the projections and MLPs run as one matrix-matrix product instead of one matrix-vector product per
session. Attention is the only part that must see sessions apart: each has its own cache length
and mask, so this function cuts the flat sequence into segments, stores each segment's keys and
values in its session's cache, and runs torch's SDPA per segment with the query heads grouped over
the key/value heads (`enable_gqa`, no copies; 16-bit floats on a CPU in float32, torch's faster
kernel there). It calls SDPA itself rather than through transformers' wrapper: every session in a
pass pays this per layer, and the direct call (with one index per cache block) makes passes of
many sessions measurably faster (docs/batching.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from swarm.kv_cache import KVCache

NAME = "swarm_ragged"
WIDENED = (torch.float16, torch.bfloat16)  # attention computed in float32 on a CPU


@dataclass
class Segment:
    """One session's new positions inside a flattened step: `rows` x `length` tokens, row-major."""

    cache: KVCache
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
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [1, heads, tokens, dim], key/value [1, kv_heads, tokens, dim] -> [1, tokens, heads, dim].

    Every session in a pass runs this loop body once per layer, so it holds as few tensor operations
    as it can: a one-row segment (a decode step) is a plain slice, and the outputs are joined in
    query layout and transposed once for all segments.
    """
    outputs, offset = [], 0
    for segment in segments:
        cut = slice(offset, offset + segment.tokens)
        if segment.rows == 1:
            q, k, v = query[:, :, cut], key[:, :, cut], value[:, :, cut]
        else:
            q, k, v = (t[0, :, cut].unflatten(1, (segment.rows, segment.length)).transpose(0, 1) for t in (query, key, value))
        keys, values = segment.cache.update(k, v, cast(int, module.layer_idx))
        if softcap is None:
            out = attention(q, keys, values, segment.masks[window], scaling)  # [rows, heads, length, dim]
        else:
            out = _softcapped_attention(q, keys, values, segment.masks[window], scaling, softcap)
        outputs.append(out[0] if segment.rows == 1 else out.transpose(0, 1).flatten(1, 2))  # [heads, rows * length, dim]
        offset += segment.tokens
    joined = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    return joined.transpose(0, 1)[None], None


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
              scaling: float | None) -> torch.Tensor:
    """SDPA; float16 and bfloat16 on a CPU widened to float32, exactly: torch's CPU kernel runs a decode
    step several times slower in 16 bits than in float32, copies included (docs/performance.md)."""
    if q.dtype not in WIDENED or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling, enable_gqa=True)
    out = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask, scale=scaling,
                                         enable_gqa=True)
    return out.to(q.dtype)


def _softcapped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                          scaling: float | None, softcap: float) -> torch.Tensor:
    """Attention whose scores are squashed into (-softcap, softcap) before the softmax (Gemma 2), as
    transformers' eager attention computes it: SDPA has no soft-capping."""
    groups = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    scores = q @ keys.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scaling is None else scaling)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ values


AttentionInterface.register(NAME, ragged_attention)
