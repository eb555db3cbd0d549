"""Phi-3: fused q/k/v and gate/up projections, rotary on part of each head, an optional window on every layer."""
from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer, Phi3RMSNorm, Phi3RotaryEmbedding

from swarm.families import Family, window_on_every_layer

FAMILY = Family("phi3", Phi3DecoderLayer, Phi3RotaryEmbedding, Phi3RMSNorm, sliding_window=window_on_every_layer)
