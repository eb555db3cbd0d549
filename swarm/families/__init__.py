"""Model families a span can run. Adding one is a small module naming its transformers classes.

Whatever a family does differently is said here once, as a field of `Family`, and applied where it
belongs: sliding windows and rotary bases per layer in the span, attention soft-capping in the
ragged attention, embedding scaling and final-logit soft-capping in the client parts, checkpoint
names that differ from the layer's own where the span loads a block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import PretrainedConfig

from swarm.errors import ModelReferenceError

BlockWeights = dict[str, torch.Tensor]


def no_window(config: PretrainedConfig, layer: int) -> int | None:
    return None


def window_on_every_layer(config: PretrainedConfig, layer: int) -> int | None:
    """Mistral, Mixtral, Phi-3: one optional window for all layers."""
    return getattr(config, "sliding_window", None)


def window_of_sliding_layers(config: PretrainedConfig, layer: int) -> int | None:
    """Qwen 2/3, Gemma 2/3: the window applies to the layers `config.layer_types` marks as sliding."""
    layer_types = getattr(config, "layer_types", None) or []
    return config.sliding_window if layer < len(layer_types) and layer_types[layer] == "sliding_attention" else None


def unscaled(config: PretrainedConfig) -> float | None:
    return None


def same_names(state: BlockWeights) -> BlockWeights:
    return state


@dataclass(frozen=True)
class Family:
    """What a span and the client parts need to know about a decoder-only architecture."""

    model_type: str
    decoder_layer: type[nn.Module]  # constructed as decoder_layer(config, layer_idx)
    rotary_embedding: type[nn.Module]  # forward(x, position_ids) -> (cos, sin), with layer_type if per_layer_rope
    norm: type[nn.Module]  # the final norm: norm(hidden_size, eps=...)
    sliding_window: Callable[[PretrainedConfig, int], int | None] = no_window
    per_layer_rope: bool = False  # rotary bases differ by layer type (Gemma 3: local and global)
    embedding_scale: Callable[[PretrainedConfig], float | None] = unscaled  # token embeddings times this (Gemma)
    block_weights: Callable[[BlockWeights], BlockWeights] = same_names  # a block's checkpoint tensors -> the layer's

    def layer_type(self, config: PretrainedConfig, layer: int) -> str | None:
        """The layer's type, which picks its rotary base when they differ; None when the config has no types."""
        layer_types = getattr(config, "layer_types", None)
        return layer_types[layer] if self.per_layer_rope and layer_types else None


def family_of(config: PretrainedConfig) -> Family:
    from swarm.families import gemma2, gemma3_text, llama, mistral, mixtral, olmo2, phi3, qwen2, qwen3

    modules = (llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, mixtral, olmo2)
    families = {module.FAMILY.model_type: module.FAMILY for module in modules}
    if config.model_type not in families:
        raise ModelReferenceError(
            f"model type {config.model_type!r} is not supported; supported: {', '.join(sorted(families))}"
        )
    return families[config.model_type]
