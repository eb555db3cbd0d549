"""Read exactly the tensors a span or the client parts need, and nothing else."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from swarm import gguf_cache
from swarm.errors import SpanRangeError, WeightsError
from swarm.reference import ResolvedModel, safetensors_files

LAYER_PREFIX = "model.layers.{}."


def check_span(model: ResolvedModel, start: int, end: int) -> None:
    if not 0 <= start < end <= model.num_blocks:
        raise SpanRangeError(
            f"blocks {start}:{end} are out of range: {model.name} has blocks 0:{model.num_blocks}"
        )


def load_block_weights(model: ResolvedModel, start: int, end: int) -> list[dict[str, torch.Tensor]]:
    """One state dict per block of [start, end), with names relative to the block."""
    check_span(model, start, end)
    blocks = list(range(start, end))
    if model.gguf_file is not None:
        gguf_cache.ensure_shards(model.gguf_file, model.folder, blocks)
        files = [gguf_cache.shard_path(model.folder, i) for i in blocks]
    else:
        files = safetensors_files(model.folder)
    prefixes = [LAYER_PREFIX.format(i) for i in blocks]
    tensors = _read(files, lambda name: name.startswith(tuple(prefixes)))
    per_block = [{} for _ in blocks]
    for name, tensor in tensors.items():
        index = int(name[len("model.layers.") :].split(".", 1)[0]) - start
        per_block[index][name.split(".", 3)[3]] = tensor
    empty = [start + i for i, weights in enumerate(per_block) if not weights]
    if empty:
        raise WeightsError(f"{model.name}: the weight files hold no tensors for blocks {empty}")
    return per_block


def load_client_weights(model: ResolvedModel) -> dict[str, torch.Tensor]:
    """Everything outside the blocks: embeddings, final norm, LM head."""
    if model.gguf_file is not None:
        gguf_cache.ensure_shards(model.gguf_file, model.folder, [gguf_cache.CLIENT_SHARD])
        files = [gguf_cache.shard_path(model.folder, gguf_cache.CLIENT_SHARD)]
    else:
        files = safetensors_files(model.folder)
    return _read(files, lambda name: not name.startswith("model.layers."))


def _read(files: list[Path], wanted) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if wanted(name):
                        tensors[name] = f.get_tensor(name)
        except WeightsError:
            raise
        except Exception as e:  # safetensors reports truncation and corruption as assorted errors
            raise WeightsError(f"{file}: truncated or corrupt weights file ({e})") from None
    return tensors
