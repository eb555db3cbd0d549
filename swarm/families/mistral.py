"""Mistral: Llama with an optional sliding attention window on every layer."""
from transformers.models.mistral.modeling_mistral import (
    MistralDecoderLayer,
    MistralRMSNorm,
    MistralRotaryEmbedding,
)

from swarm.families import Family, window_on_every_layer

FAMILY = Family("mistral", MistralDecoderLayer, MistralRotaryEmbedding, MistralRMSNorm,
                sliding_window=window_on_every_layer)
