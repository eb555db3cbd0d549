"""Tiny random models of every supported family, saved the way a user's local folder would be.

They are small enough to build in well under a second, so tests can compare spans with transformers
on uneven splits, padded batches and sliding windows without downloading anything.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "mixtral", "olmo2")
# soft-capping limits small enough to squash the tiny models' attention scores and logits for real
ATTENTION_SOFTCAP, LOGIT_SOFTCAP = 0.05, 0.5
NUM_LAYERS = 5
VOCAB_SIZE = 128
SLIDING_WINDOW = 8  # shorter than the test sequences, so the window really cuts attention
SHARD_SIZE = "200KB"  # a block is ~150 KB in float32: several shards per tiny model

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_config(family: str) -> PretrainedConfig:
    if family == "llama":
        return LlamaConfig(**_COMMON)
    if family == "mistral":
        return MistralConfig(**_COMMON, sliding_window=SLIDING_WINDOW)
    if family == "qwen2":
        # Qwen2 always has q/k/v biases. Sliding attention on the upper layers only (max_window_layers)
        # exercises the per-layer window choice; transformers derives layer_types from these fields.
        return Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=2)
    if family == "qwen3":  # q/k norms per head, the window on the layers above max_window_layers
        return Qwen3Config(**_COMMON, head_dim=16, use_sliding_window=True, sliding_window=SLIDING_WINDOW,
                           max_window_layers=2)
    gemma = dict(_COMMON, tie_word_embeddings=True, head_dim=16, query_pre_attn_scalar=16, sliding_window=SLIDING_WINDOW)
    if family == "gemma2":  # sliding and global layers alternate; both soft-cappings on; tied embeddings
        return Gemma2Config(**gemma, attn_logit_softcapping=ATTENTION_SOFTCAP, final_logit_softcapping=LOGIT_SOFTCAP)
    if family == "gemma3_text":  # local and global rotary bases differ by layer type
        layer_types = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"]
        return Gemma3TextConfig(**gemma, layer_types=layer_types)
    if family == "phi3":  # fused projections, rotary on half of each head, a window on every layer
        return Phi3Config(**_COMMON, sliding_window=SLIDING_WINDOW, partial_rotary_factor=0.5)
    if family == "mixtral":  # 4 experts, 2 per token
        return MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2)
    if family == "olmo2":
        return Olmo2Config(**_COMMON)
    if family == "gpt2":  # an architecture spans do not support
        return GPT2Config(vocab_size=VOCAB_SIZE, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
    raise ValueError(f"unknown tiny family {family!r}")


def build_tiny_model(family: str, folder: Path, sharded: bool = False, seed: int = 0) -> Path:
    """Build a random model with a fixed seed and save it as safetensors (optionally sharded) into `folder`."""
    folder = Path(folder)
    torch.manual_seed(seed)
    config = tiny_config(family)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    center = 0.0 if family.startswith("gemma") else 1.0  # Gemma's norms scale by 1 + weight
    with torch.no_grad():  # default init leaves norms at 1 and biases at 0: make them matter
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                param.copy_(center + 0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=SHARD_SIZE if sharded else "10GB")
    return folder


def greedy_tokens(reference: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """transformers' greedy continuation of IDS (prompt included), never stopped by an end of sequence: the
    tokens a swarm of the same weights must give."""
    with torch.no_grad():
        return reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)


def load_reference(folder: Path) -> torch.nn.Module:
    """The same weights through transformers itself, in float32, for comparisons: sdpa attention, or eager
    attention where sdpa cannot soft-cap (Gemma 2)."""
    config = AutoConfig.from_pretrained(folder)
    attention = "eager" if getattr(config, "attn_logit_softcapping", None) is not None else "sdpa"
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attention).eval()
