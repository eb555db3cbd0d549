"""Mixtral: Mistral whose MLP is a router and routed experts, all inside the block.

Every token is routed on its own, so batching many sessions' tokens through the experts gives each
token what it gets alone. Checkpoints keep one w1/w2/w3 per expert under `block_sparse_moe`;
transformers' layer holds them stacked (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), so a
block's tensors are stacked as transformers' own loader does (its `mixtral` conversion mapping).
"""
import re

import torch
from transformers.models.mixtral.modeling_mixtral import (
    MixtralDecoderLayer,
    MixtralRMSNorm,
    MixtralRotaryEmbedding,
)

from swarm.families import BlockWeights, Family, window_on_every_layer

EXPERT = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")


def stacked_experts(state: BlockWeights) -> BlockWeights:
    """Per-expert checkpoint tensors -> the layer's stacked ones; already stacked tensors pass unchanged."""
    converted: BlockWeights = {}
    experts: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if match := EXPERT.fullmatch(name):
            experts.setdefault(int(match[1]), {})[match[2]] = tensor
        else:
            converted[name.replace("block_sparse_moe.", "mlp.")] = tensor
    if experts:
        ordered = [experts[i] for i in range(len(experts))]
        converted["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([e["w1"], e["w3"]]) for e in ordered])
        converted["mlp.experts.down_proj"] = torch.stack([e["w2"] for e in ordered])
    return converted


FAMILY = Family("mixtral", MixtralDecoderLayer, MixtralRotaryEmbedding, MixtralRMSNorm,
                sliding_window=window_on_every_layer, block_weights=stacked_experts)
