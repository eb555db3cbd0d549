"""Mistral: Llama with an optional sliding attention window on every layer."""
from transformers.models.mistral.modeling_mistral import (
    MistralDecoderLayer,
    MistralRMSNorm,
    MistralRotaryEmbedding,
)

from swarm.families import Family

FAMILY = Family(
    "mistral",
    MistralDecoderLayer,
    MistralRotaryEmbedding,
    MistralRMSNorm,
    sliding_window=lambda config, layer: getattr(config, "sliding_window", None),
)
