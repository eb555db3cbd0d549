"""OLMo 2: norms after attention and after the MLP instead of before, q/k norms over all heads."""
from transformers.models.olmo2.modeling_olmo2 import Olmo2DecoderLayer, Olmo2RMSNorm, Olmo2RotaryEmbedding

from swarm.families import Family

FAMILY = Family("olmo2", Olmo2DecoderLayer, Olmo2RotaryEmbedding, Olmo2RMSNorm)
