"""Gemma 3 (text): Gemma 2's layout with q/k norms, and a rotary base per layer type (local sliding
layers and global layers differ), so a span computes position embeddings once per type."""
from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer, Gemma3RMSNorm, Gemma3RotaryEmbedding

from swarm.families import Family, window_of_sliding_layers
from swarm.families.gemma2 import sqrt_hidden

FAMILY = Family("gemma3_text", Gemma3DecoderLayer, Gemma3RotaryEmbedding, Gemma3RMSNorm,
                sliding_window=window_of_sliding_layers, per_layer_rope=True, embedding_scale=sqrt_hidden)
