"""Every way a model can fail to load ends in a SwarmError whose one-line message says what is wrong."""
from __future__ import annotations

import os
import shutil

import pytest

from swarm.errors import ModelReferenceError, SpanRangeError, SwarmError, WeightsError
from swarm.reference import resolve_model
from swarm.span import Span


def raised(error_type: type[SwarmError], call, *args) -> str:
    """Run call(*args), expecting error_type with a one-line message; return the message."""
    with pytest.raises(error_type) as info:
        call(*args)
    message = str(info.value)
    assert isinstance(info.value, SwarmError)
    assert message.strip() and "\n" not in message, repr(message)
    return message


def resolve_and_load(ref: str, start: int = 0, end: int = 1) -> Span:
    return Span(resolve_model(ref), start, end)


def test_unknown_model_reference():
    message = raised(ModelReferenceError, resolve_model, "no-such-model")
    assert "'no-such-model'" in message and "not found" in message
    assert "smollm2-135m" in message  # tells the user what would work


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    message = raised(ModelReferenceError, resolve_model, str(tmp_path))
    assert str(tmp_path) in message and "config.json" in message


def test_unreachable_hub_id(monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE once, at import: patch the constant as well as the variable
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = raised(ModelReferenceError, resolve_model, "some-org/some-model")
    assert "'some-org/some-model'" in message and "could not be fetched" in message


@pytest.mark.parametrize("start, end", [(25, 31), (5, 5), (-1, 3), (7, 3)])
def test_span_out_of_range(default_model, start, end):
    message = raised(SpanRangeError, Span, default_model, start, end)
    assert f"{start}:{end}" in message and "out of range" in message
    assert f"0:{default_model.num_blocks}" in message  # the range that would work


@pytest.mark.parametrize("start, end", [(0, 5), (4, 5)])
def test_truncated_safetensors(tmp_path, tiny_llama, start, end):
    folder = shutil.copytree(tiny_llama, tmp_path / "truncated")
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    message = raised(WeightsError, resolve_and_load, str(folder), start, end)
    assert str(weights) in message and "truncated" in message


def test_truncated_gguf(tmp_path, monkeypatch, default_model):
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path / "cache"))  # keep the user's cache clean
    half = tmp_path / "half.gguf"
    with open(default_model.gguf_file, "rb") as source:
        half.write_bytes(source.read(default_model.gguf_file.stat().st_size // 2))
    message = raised(WeightsError, resolve_and_load, str(half))
    assert str(half) in message and "GGUF" in message


def test_unsupported_model_type(tiny_model_path):
    folder = tiny_model_path("gpt2")
    message = raised(ModelReferenceError, resolve_and_load, str(folder))
    assert "'gpt2'" in message and "not supported" in message
    assert "llama" in message  # lists what is supported
