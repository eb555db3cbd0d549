"""Llama 2/3, SmolLM, TinyLlama: the reference family."""
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from swarm.families import Family

FAMILY = Family("llama", LlamaDecoderLayer, LlamaRotaryEmbedding, LlamaRMSNorm)
