"""Tiny random models of every supported family, saved the way a user's local folder would be.

They are small enough to build in well under a second, so tests can compare spans with transformers
on uneven splits, padded batches and sliding windows without downloading anything.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

FAMILIES = ("llama", "mistral", "qwen2")
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
    if family == "gpt2":  # an architecture spans do not support
        return GPT2Config(vocab_size=VOCAB_SIZE, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
    raise ValueError(f"unknown tiny family {family!r}")


def build_tiny_model(family: str, folder: Path, sharded: bool = False, seed: int = 0) -> Path:
    """Build a random model with a fixed seed and save it as safetensors (optionally sharded) into `folder`."""
    folder = Path(folder)
    torch.manual_seed(seed)
    config = tiny_config(family)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # default init leaves norms at 1 and biases at 0: make them matter
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=SHARD_SIZE if sharded else "10GB")
    return folder


def load_reference(folder: Path) -> torch.nn.Module:
    """The same weights through transformers itself, in float32 with sdpa attention, for comparisons."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
