"""Shared fixtures: tiny random models per family, and the default model loaded once per session.

SWARM_CACHE_DIR is deliberately left alone: the default GGUF model keeps using the user's warm
cache (a cold conversion takes ~30 s), and tests that need a scratch cache set it themselves.

The tests' peers compute in float32 (SWARM_DTYPE), the precision their transformers references
use, instead of the precision a peer would measure as fastest on the machine; tests/test_precision.py
runs the others and the measured choice.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models, whatever pytest's import mode

from tiny_models import build_tiny_model, load_reference  # noqa: E402

os.environ["SWARM_DTYPE"] = "float32"
DEFAULT_SPLITS = [(0, 10), (10, 20), (20, 30)]
DEFAULT_NEW_TOKENS = 32
# fixtures that load the default model's weights (transformers' copy takes ~20 s): their tests are slow
LOADS_DEFAULT_WEIGHTS = {"default_reference", "default_chain", "default_greedy"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that load the default model's weights are slow, like those that start processes (marked in their modules)."""
    for item in items:
        if LOADS_DEFAULT_WEIGHTS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """tiny_model_path(family, sharded=False) -> folder of a tiny random model, built once per session."""
    built: dict[tuple[str, bool], Path] = {}

    def get(family: str, sharded: bool = False) -> Path:
        key = (family, sharded)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{family}{'-sharded' if sharded else ''}")
            built[key] = build_tiny_model(family, folder, sharded=sharded)
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_path) -> Path:
    return tiny_model_path("llama")


@pytest.fixture(scope="session")
def tiny_reference(tiny_model_path):
    """tiny_reference(family, sharded=False) -> the transformers model of that tiny folder."""
    loaded: dict[tuple[str, bool], torch.nn.Module] = {}

    def get(family: str, sharded: bool = False) -> torch.nn.Module:
        if (family, sharded) not in loaded:
            loaded[family, sharded] = load_reference(tiny_model_path(family, sharded))
        return loaded[family, sharded]

    return get


@pytest.fixture(scope="session")
def default_model():
    from swarm.reference import resolve_model

    return resolve_model()


@pytest.fixture(scope="session")
def default_reference(default_model):
    """transformers' own float32 model from the same GGUF (~20 s to load: once per session)."""
    from transformers import AutoModelForCausalLM

    file = default_model.gguf_file
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def default_tokenizer(default_model):
    return default_model.tokenizer()


@pytest.fixture(scope="session")
def default_chain(default_model):
    """Spans [0,10) [10,20) [20,30) and the client parts of the default model, float32."""
    from swarm.client_parts import ClientParts
    from swarm.span import Span

    return [Span(default_model, start, end) for start, end in DEFAULT_SPLITS], ClientParts(default_model)


@pytest.fixture(scope="session")
def default_greedy(default_reference, default_tokenizer):
    """default_greedy(prompt) -> (prompt ids, transformers' greedy generate output with per-step logits).

    EOS is disabled so every prompt gets exactly DEFAULT_NEW_TOKENS tokens; results are cached per prompt.
    """
    outputs = {}

    def get(prompt: str):
        if prompt not in outputs:
            ids = default_tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = default_reference.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=DEFAULT_NEW_TOKENS,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=default_tokenizer.pad_token_id,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
            assert out.sequences.shape[1] == ids.shape[1] + DEFAULT_NEW_TOKENS
            outputs[prompt] = ids, out
        return outputs[prompt]

    return get
