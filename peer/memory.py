"""How many blocks and how many KV cache tokens a peer holds: sized by its device's free memory.

Pure arithmetic on a model's per-block footprint and a number of free bytes, so it is tested
without the device (tests/test_memory.py).
"""
from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

import torch

from swarm.dtypes import QuantName, to_torch_dtype
from swarm.errors import DeviceError
from swarm.quantized import weight_bytes
from swarm.families import family_of
from swarm.reference import ResolvedModel

GiB = 1024**3
DEFAULT_CACHE_TOKENS = 32_768  # a CPU peer's budget without --max-cache-tokens; a GPU's is what its memory leaves
CPU_SHARE = 0.5  # of available RAM: the page cache of memory-mapped weights and the OS need the rest
# On a GPU: the CUDA context, the activations of a pass and the allocator's fragmentation. Not yet
# measured on a GPU (benchmarks/gpu_check.py reports the peak memory of a real peer).
GPU_RESERVE_SHARE, GPU_RESERVE_BYTES = 0.1, GiB // 2


@dataclass(frozen=True)
class Footprint:
    """Bytes per block of a model: its weights at a precision and quantization, one token of one session's cache."""

    weights: int
    per_cache_token: int

    @classmethod
    def of(cls, model: ResolvedModel, dtype: str, quant: QuantName = "none", cache_dtype: str | None = None) -> "Footprint":
        config = model.config
        with torch.device("meta"):
            layer = family_of(config).decoder_layer(config, layer_idx=0)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(weight_bytes(layer, quant, to_torch_dtype(dtype).itemsize),
                   2 * config.num_key_value_heads * head_dim * to_torch_dtype(cache_dtype or dtype).itemsize)


@dataclass(frozen=True)
class MemoryPlan:
    blocks: int
    cache_tokens: int


def usable(free_bytes: int, device_type: str) -> int:
    """What a peer may fill of what is free."""
    if device_type == "cuda":
        return max(int(free_bytes * (1 - GPU_RESERVE_SHARE)) - GPU_RESERVE_BYTES, 0)
    return int(free_bytes * CPU_SHARE)


def plan_memory(footprint: Footprint, free_bytes: int, device_type: str, num_blocks: int,
                blocks: int | None = None, cache_tokens: int | None = None) -> MemoryPlan:
    """The blocks (if not given) and the cache budget (if not given) that fit; a DeviceError if nothing does.

    Without a block count, a peer takes as many blocks as fit with their share of the default cache
    budget. On a GPU the cache budget then defaults to all that the weights leave; on a CPU to the
    default, since RAM is shared with everything else the machine runs.
    """
    budget = usable(free_bytes, device_type)
    sizing_tokens = cache_tokens or DEFAULT_CACHE_TOKENS
    if blocks is None:
        blocks = min(budget // (footprint.weights + footprint.per_cache_token * sizing_tokens), num_blocks)
        if blocks < 1:
            raise DeviceError(f"not enough memory for one block: {footprint.weights / GiB:.2f} GiB of weights and "
                             f"{footprint.per_cache_token * sizing_tokens / GiB:.2f} GiB of cache, "
                             f"{budget / GiB:.2f} GiB usable of {free_bytes / GiB:.2f} GiB free")
    if cache_tokens is None:
        cache_tokens = DEFAULT_CACHE_TOKENS if device_type == "cpu" else \
            (budget - blocks * footprint.weights) // (blocks * footprint.per_cache_token)
    needed = blocks * (footprint.weights + footprint.per_cache_token * cache_tokens)
    if device_type == "cuda" and (cache_tokens < 1 or needed > budget):
        raise DeviceError(f"{blocks} blocks need {blocks * footprint.weights / GiB:.2f} GiB of weights"
                         f"{f' and {cache_tokens} cache tokens' if cache_tokens > 0 else ''}, but only "
                         f"{budget / GiB:.2f} GiB of the GPU's {free_bytes / GiB:.2f} GiB free are usable: "
                         "serve fewer blocks (--blocks, --num-blocks) or lower --max-cache-tokens")
    return MemoryPlan(blocks, int(cache_tokens))


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc): loading quantized blocks frees large temporaries
    that would otherwise stay in the peer's resident memory."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
