"""When two peers' outputs for the same input count as the same: the measure and its tolerance.

The tolerance covers honest peers of other precisions and hardware; its measurement is in
docs/security.md (`python -m benchmarks.verify`).
"""
from __future__ import annotations

from typing import Iterable

import torch

from swarm.records import BlockAnnouncement

TOLERANCE = 0.02  # float32, float16 and a float16 KV cache, against each other
# How much wider the tolerance is when either peer computes in bfloat16, keeps its KV cache in it or
# multiplies quantized weights (which take bfloat16 inputs): with 8 bits of mantissa against
# float16's 11, honest outputs differ about ten times more.
COARSE = 10.0


def disagreement(output: torch.Tensor, other: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """The largest relative difference of two outputs [rows, new, hidden] over real positions: |a - b| / |b|."""
    a, b = output.float(), other.float()
    relative = (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-6)
    if mask is not None:
        relative = relative[mask.bool()]
    return relative.max().item() if relative.numel() else 0.0


def tolerance(announcements: Iterable[BlockAnnouncement | None], base: float = TOLERANCE) -> float:
    """The largest honest disagreement between peers announcing these (None: a peer whose record is unknown)."""
    coarse = any(a is None or a.quant != "none" or "bfloat16" in (a.dtype, a.cache_dtype) for a in announcements)
    return base * (COARSE if coarse else 1.0)
