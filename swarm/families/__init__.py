"""Model families a span can run. Adding one is a small module naming its transformers classes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn
from transformers import PretrainedConfig

from swarm.errors import ModelReferenceError


@dataclass(frozen=True)
class Family:
    """What a span needs to know about a decoder-only architecture."""

    model_type: str
    decoder_layer: type[nn.Module]  # constructed as decoder_layer(config, layer_idx)
    rotary_embedding: type[nn.Module]  # forward(x, position_ids) -> (cos, sin)
    norm: type[nn.Module]  # the final norm: norm(hidden_size, eps=...)
    sliding_window: Callable[[PretrainedConfig, int], int | None] = lambda config, layer: None


def family_of(config: PretrainedConfig) -> Family:
    from swarm.families import llama, mistral, qwen2

    families = {f.model_type: f for f in (llama.FAMILY, mistral.FAMILY, qwen2.FAMILY)}
    if config.model_type not in families:
        raise ModelReferenceError(
            f"model type {config.model_type!r} is not supported; supported: {', '.join(sorted(families))}"
        )
    return families[config.model_type]
