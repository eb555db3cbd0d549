"""Read exactly the tensors a span or the client parts need, and nothing else."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from swarm import gguf_shards
from swarm.errors import SpanRangeError, WeightsError
from swarm.reference import ResolvedModel, safetensors_files

LAYER_PREFIX = "model.layers.{}."


def check_span(model: ResolvedModel, start: int, end: int) -> None:
    if not 0 <= start < end <= model.num_blocks:
        raise SpanRangeError(
            f"blocks {start}:{end} are out of range: {model.name} has blocks 0:{model.num_blocks}"
        )


def iter_block_weights(model: ResolvedModel, start: int, end: int,
                       form: gguf_shards.Form = "float") -> Iterator[dict[str, torch.Tensor]]:
    """One state dict per block of [start, end), with names relative to the block, read block by block.

    Reading is most of a peer's loading time: one block at a time lets it show real progress and stop
    between blocks when asked to, and only the files that hold a block are opened for it. A GGUF's
    blocks come in `form` (gguf_shards: "q4" keeps its 4-bit weights); other checkpoints as they are.
    """
    check_span(model, start, end)
    blocks = list(range(start, end))
    if model.gguf_file is not None:
        gguf_shards.ensure_shards(model.gguf_file, model.folder, blocks, form)
        files = [gguf_shards.shard_path(model.folder, i, form) for i in blocks]
    else:
        files = safetensors_files(model.folder)
    where = _index(files)
    return (_block_weights(model, where, block) for block in blocks)  # checked and indexed now, read lazily


def _block_weights(model: ResolvedModel, where: dict[str, Path], block: int) -> dict[str, torch.Tensor]:
    prefix = LAYER_PREFIX.format(block)
    names = [name for name in where if name.startswith(prefix)]
    if not names:
        raise WeightsError(f"{model.name}: the weight files hold no tensors for block {block}")
    return {name[len(prefix) :]: tensor for name, tensor in _read(where, names).items()}


def load_client_weights(model: ResolvedModel) -> dict[str, torch.Tensor]:
    """Everything outside the blocks: embeddings, final norm, LM head."""
    if model.gguf_file is not None:
        gguf_shards.ensure_shards(model.gguf_file, model.folder, [gguf_shards.CLIENT_SHARD])
        files = [gguf_shards.shard_path(model.folder, gguf_shards.CLIENT_SHARD)]
    else:
        files = safetensors_files(model.folder)
    where = _index(files)
    return _read(where, [name for name in where if not name.startswith("model.layers.")])


def _index(files: list[Path]) -> dict[str, Path]:
    """Which file holds each tensor, from the files' headers."""
    where = {}
    for file in files:
        with _opened(file) as f:
            where.update(dict.fromkeys(f.keys(), file))
    return where


def _read(where: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors, opening each file that holds some of them once."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(where[name], []).append(name)
    tensors = {}
    for file, in_file in by_file.items():
        with _opened(file) as f:
            for name in in_file:
                tensors[name] = f.get_tensor(name)
    return tensors


@contextlib.contextmanager
def _opened(file: Path):
    """A safetensors file, open; safetensors reports truncation and corruption as assorted errors."""
    try:
        with safe_open(str(file), framework="pt") as f:
            yield f
    except Exception as e:
        raise WeightsError(f"{file}: truncated or corrupt weights file ({e})") from None
