"""Qwen2: Llama with q/k/v biases and sliding attention on the layers its config marks."""
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from swarm.families import Family


def _window(config, layer: int) -> int | None:
    layer_types = getattr(config, "layer_types", None) or []
    return config.sliding_window if layer < len(layer_types) and layer_types[layer] == "sliding_attention" else None


FAMILY = Family("qwen2", Qwen2DecoderLayer, Qwen2RotaryEmbedding, Qwen2RMSNorm, sliding_window=_window)
