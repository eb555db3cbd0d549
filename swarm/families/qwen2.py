"""Qwen2: Llama with q/k/v biases and sliding attention on the layers its config marks."""
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from swarm.families import Family, window_of_sliding_layers

FAMILY = Family("qwen2", Qwen2DecoderLayer, Qwen2RotaryEmbedding, Qwen2RMSNorm, sliding_window=window_of_sliding_layers)
