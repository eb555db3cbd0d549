"""Gemma 2: sliding and global layers alternate, attention logits are soft-capped (the attention
module passes `softcap` to the ragged attention), four norms per block, embeddings scaled by
sqrt(hidden), final logits soft-capped on the client (`final_logit_softcapping` in the config)."""
from transformers import PretrainedConfig
from transformers.models.gemma2.modeling_gemma2 import Gemma2DecoderLayer, Gemma2RMSNorm, Gemma2RotaryEmbedding

from swarm.families import Family, window_of_sliding_layers


def sqrt_hidden(config: PretrainedConfig) -> float:
    return config.hidden_size**0.5


FAMILY = Family("gemma2", Gemma2DecoderLayer, Gemma2RotaryEmbedding, Gemma2RMSNorm,
                sliding_window=window_of_sliding_layers, embedding_scale=sqrt_hidden)
