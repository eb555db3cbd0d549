"""What our generate adds to transformers': sampling that repeats itself for a seed, whatever other threads draw."""
from __future__ import annotations

from typing import cast

import torch
from transformers import GenerationConfig, LogitsProcessor


class SeededSampling(LogitsProcessor):
    """Draws each row's token from a generator of its own and leaves transformers only that token to pick.

    transformers samples from the global RNG, which concurrent generations (a gateway's) share; this
    processor runs last, so it samples the final distribution exactly as transformers would.
    """

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=self.generator)
        return cast(torch.FloatTensor, torch.full_like(scores, -float("inf")).scatter_(1, tokens, 0.0))


def eos_ids(config: GenerationConfig) -> list[int]:
    eos = config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
