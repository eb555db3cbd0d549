"""The decoding loop: transformers' logits processors and sampling, fed by a swarm session."""
from __future__ import annotations

from typing import Iterator, cast

import torch
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


# `seed` is ours, not transformers': sampling draws from a generator of its own, so a seeded generation
# is reproducible even while other generations sample in other threads.
SUPPORTED = {"do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "eos_token_id", "pad_token_id", "seed"}


def generation_config(base: GenerationConfig, overrides: dict) -> GenerationConfig:
    """The model's generation config with the caller's overrides, unset values filled as transformers does."""
    unsupported = sorted(set(overrides) - SUPPORTED)
    if unsupported:
        raise ValueError(f"generate does not support {', '.join(unsupported)}; supported: {', '.join(sorted(SUPPORTED))}")
    config = GenerationConfig(**{**base.to_dict(), **{k: v for k, v in overrides.items() if k != "seed"}})
    defaults = GenerationConfig._get_default_generation_params()
    for name in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty"):
        if getattr(config, name) is None:
            setattr(config, name, defaults[name])
    return config


def logits_processors(config: GenerationConfig) -> LogitsProcessorList:
    """The same processors, in the same order, as transformers' generate builds for these settings."""
    processors = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=config.repetition_penalty))
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    return processors


def eos_ids(config: GenerationConfig) -> list[int]:
    eos = config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def decode_tokens(
    next_logits,  # callable(new_ids [B, T], new_mask [B, T]) -> last-position logits [B, vocab]
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    max_new_tokens: int,
    stop_strings: list[str] | None = None,
    tokenizer=None,
    first_logits: torch.Tensor | None = None,
    full_prefix: torch.Tensor | None = None,
    seed: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, step by step, until all rows hit EOS, a stop string or the limit.

    `input_ids` are the positions not yet sent, `full_prefix` those the session already holds (the
    processors see both, as in transformers). `first_logits` replaces the first call when nothing is new.
    With `seed`, sampling draws from a generator of its own.
    """
    processors = logits_processors(config)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    eos = eos_ids(config)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    sequence = input_ids if full_prefix is None else torch.cat([full_prefix, input_ids], dim=1)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    new_ids, new_mask = input_ids, attention_mask
    prompt_length = sequence.shape[1]
    for _ in range(max_new_tokens):
        logits = first_logits if first_logits is not None else next_logits(new_ids, new_mask)
        first_logits = None
        scores = processors(cast(torch.LongTensor, sequence), logits.float())
        if config.do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=generator).squeeze(1)
        else:
            tokens = scores.argmax(dim=-1)
        tokens = torch.where(finished, torch.full_like(tokens, pad), tokens)
        sequence = torch.cat([sequence, tokens[:, None]], dim=1)
        yield tokens
        finished |= torch.isin(tokens, torch.tensor(eos, dtype=tokens.dtype)) if eos else finished
        if stop_strings and tokenizer is not None:
            for row in range(sequence.shape[0]):
                text = tokenizer.decode(sequence[row, prompt_length:], skip_special_tokens=True)
                if any(stop in text for stop in stop_strings):
                    finished[row] = True
        if finished.all():
            return
        new_ids, new_mask = tokens[:, None], torch.ones(tokens.shape[0], 1, dtype=attention_mask.dtype)
