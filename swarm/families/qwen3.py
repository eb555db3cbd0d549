"""Qwen3: Qwen2 without the q/k/v biases and with q/k norms per head (inside its attention module)."""
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding

from swarm.families import Family, window_of_sliding_layers

FAMILY = Family("qwen3", Qwen3DecoderLayer, Qwen3RotaryEmbedding, Qwen3RMSNorm, sliding_window=window_of_sliding_layers)
