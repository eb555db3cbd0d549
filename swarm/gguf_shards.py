"""GGUF files are parsed once and kept as a per-block safetensors cache.

Parsing a GGUF's metadata takes seconds in Python and dequantizing takes more, so doing it on
every start would dominate a peer's start-up. Instead a GGUF gets a cache folder holding its
config, tokenizer and fingerprint (written on first sight), and one safetensors shard per block
plus one for the client parts, each written the first time something needs it. A peer serving
10 of 30 blocks converts only those 10, one block in memory at a time. Shards are float32, the
same values transformers' own GGUF loader produces (its name mapping and q/k un-permutation are
used, not re-derived).

A peer serving int4 reads a block's "q4" shard instead: its Q4_0/Q4_1 weights as the GGUF stores
them (4-bit values, per-32 scales and minimums, rows in transformers' order), everything else float32.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from filelock import FileLock
from safetensors.torch import save_file

from swarm.errors import WeightsError

CLIENT_SHARD = "client"
Form = Literal["float", "q4"]
Q4_TYPES = {"Q4_0", "Q4_1"}


def data_dir() -> Path:
    return Path(os.environ.get("SWARM_CACHE_DIR", Path.home() / ".cache" / "swarm-llm"))


def shard_folder(file: Path) -> Path:
    """Prepare (once) and return the cache folder of a GGUF file: config, tokenizer, fingerprint."""
    stat = file.stat()
    key = hashlib.sha256(f"{file}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = data_dir() / "gguf" / f"{file.stem}-{key}"
    if (folder / "fingerprint").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".lock")):
        if not (folder / "fingerprint").is_file():
            _write_metadata(file, folder)
    return folder


def shard_path(folder: Path, group: int | str, form: Form = "float") -> Path:
    name = f"block-{group:05d}" if isinstance(group, int) else group
    return folder / f"{name}{'.q4' if form == 'q4' else ''}.safetensors"


def ensure_shards(file: Path, folder: Path, groups: Sequence[int | str], form: Form = "float") -> None:
    """Convert the blocks (ints) or the client parts that have no shard of this form yet."""
    if all(shard_path(folder, g, form).is_file() for g in groups):
        return
    with FileLock(str(folder / ".lock")):
        missing = [g for g in groups if not shard_path(folder, g, form).is_file()]
        if missing:
            _convert(file, folder, missing, form)


def _write_metadata(file: Path, folder: Path) -> None:
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoTokenizer

    try:
        reader = GGUFReader(file)
        config = AutoConfig.from_pretrained(file.parent, gguf_file=file.name)
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    except Exception as e:
        raise WeightsError(f"{file}: not a readable GGUF model ({type(e).__name__}: {e})") from None
    _check_size(file, reader)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with open(file, "rb") as f:
        header = f.read(reader.data_offset)
    (folder / "fingerprint").write_text(hashlib.sha256(header).hexdigest())


def _check_size(file: Path, reader) -> None:
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if file.stat().st_size < end:
        raise WeightsError(f"{file}: truncated ({file.stat().st_size} bytes, tensors need {end})")


def _convert(file: Path, folder: Path, groups: list[int | str], form: Form) -> None:
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    reader = GGUFReader(file)
    _check_size(file, reader)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    # the file's own architecture name picks the tensor processor, as in transformers' loader: Mistral GGUFs
    # say "llama" (q/k un-permuted), Gemma 3 says "gemma3" where the config says gemma3_text (norms minus 1)
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    gguf_to_hf = get_gguf_hf_weights_map(skeleton, processor)

    wanted: dict[int | str, dict[str, torch.Tensor]] = {g: {} for g in groups}
    for tensor in reader.tensors:
        group = _group_of(tensor.name)
        if group not in wanted:
            continue
        if form == "q4" and tensor.tensor_type.name in Q4_TYPES:
            parts = _q4_parts(tensor, processor, gguf_to_hf)
            if parts is not None:
                wanted[group].update(parts)
                continue
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=gguf_to_hf)
        if result.name in gguf_to_hf:
            wanted[group][gguf_to_hf[result.name]] = torch.from_numpy(np.array(result.weights))
    for group, tensors in wanted.items():
        if not tensors:
            raise WeightsError(f"{file}: no tensors for {'block ' if isinstance(group, int) else ''}{group}")
        target = shard_path(folder, group, form)
        partial = target.with_suffix(".partial")
        save_file(tensors, str(partial), metadata={"format": "pt"})
        partial.rename(target)  # readers never see half a shard


def _q4_parts(tensor, processor, gguf_to_hf: dict[str, str]) -> dict[str, torch.Tensor] | None:
    """A Q4_0/Q4_1 weight as `<hf name>.quants/.d/.m`, or None if transformers' processing is more than
    a reordering of its rows (then it is stored dequantized, as in a float shard).

    The processing is learnt by running it on each row's index, so the name mapping and the q/k
    un-permutation stay transformers' own.
    """
    rows, row_bytes = tensor.data.shape
    columns = int(tensor.shape[0])
    index = np.repeat(np.arange(rows, dtype=np.float32)[:, None], columns, axis=1)
    result = processor.process(weights=index, name=tensor.name, tensor_key_mapping=gguf_to_hf)
    order = np.asarray(result.weights)
    if result.name not in gguf_to_hf or order.shape != (rows, columns) or not (order == order[:, :1]).all():
        return None
    permutation = torch.from_numpy(order[:, 0].astype(np.int64))
    if not torch.equal(permutation.sort().values, torch.arange(rows)):
        return None
    blocks = torch.from_numpy(np.array(tensor.data)).view(rows, columns // 32, row_bytes // (columns // 32))
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0]
    if tensor.tensor_type.name == "Q4_1":
        m, quants = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0], blocks[..., 4:]
    else:  # Q4_0: w = (q - 8) d
        m, quants = (-8 * d.float()).to(torch.float16), blocks[..., 2:]
    name = gguf_to_hf[result.name]
    return {f"{name}.quants": quants[permutation].contiguous(), f"{name}.d": d[permutation].contiguous(),
            f"{name}.m": m[permutation].contiguous()}


def _group_of(gguf_name: str) -> int | str:
    if gguf_name.startswith("blk."):
        return int(gguf_name.split(".")[1])
    return CLIENT_SHARD


def read_fingerprint(folder: Path) -> str:
    return (folder / "fingerprint").read_text().strip()
