"""Sizing a peer by its device's memory, and device handling that needs no GPU (peer/memory.py, peer/device.py).

The arithmetic runs on fake device sizes; what only a GPU can show is in tests/test_gpu.py and
benchmarks/gpu_check.py.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peer.device import check_device, default_dtype
from peer.memory import DEFAULT_CACHE_TOKENS, GiB, Footprint, plan_memory, usable
from swarm import protocol
from swarm.errors import DeviceError, ProtocolError
from swarm.reference import resolve_model
from swarm.span import Span

ROOT = Path(__file__).resolve().parent.parent
BLOCK = Footprint(weights=100 * 2**20, per_cache_token=16 * 1024)  # 100 MiB of weights, 16 KiB per cached token


def test_footprint_counts_the_weights_a_span_holds(tiny_model_path):
    model = resolve_model(str(tiny_model_path("llama")))
    span = Span(model, 0, 1)
    held = sum(p.numel() * p.element_size() for p in span.layers.parameters())
    assert Footprint.of(model, "float32").weights == held
    assert Footprint.of(model, "float16").weights == held // 2
    cache = span.new_cache(1, 10)
    assert Footprint.of(model, "float32").per_cache_token * 10 == sum(
        t.numel() * t.element_size() for t in (*cache.keys, *cache.values))


def test_a_gpu_peer_takes_the_blocks_that_fit_and_gives_the_rest_to_the_cache():
    free = 8 * GiB
    plan = plan_memory(BLOCK, free, "cuda", num_blocks=80)
    per_block = BLOCK.weights + BLOCK.per_cache_token * DEFAULT_CACHE_TOKENS
    assert plan.blocks == usable(free, "cuda") // per_block
    assert plan.cache_tokens == (usable(free, "cuda") - plan.blocks * BLOCK.weights) // (plan.blocks * BLOCK.per_cache_token)
    assert plan.cache_tokens >= DEFAULT_CACHE_TOKENS
    assert plan.blocks * (BLOCK.weights + BLOCK.per_cache_token * plan.cache_tokens) <= usable(free, "cuda")

    big = plan_memory(BLOCK, 80 * GiB, "cuda", num_blocks=30)  # the whole model fits: the cache gets the rest
    assert big.blocks == 30 and big.cache_tokens > 100_000


def test_a_gpu_span_that_cannot_fit_is_refused_with_what_to_do():
    with pytest.raises(DeviceError, match="serve fewer blocks .* or lower --max-cache-tokens"):
        plan_memory(BLOCK, 2 * GiB, "cuda", num_blocks=30, blocks=30)
    with pytest.raises(DeviceError, match="serve fewer blocks"):
        plan_memory(BLOCK, 8 * GiB, "cuda", num_blocks=30, blocks=10, cache_tokens=10**7)
    with pytest.raises(DeviceError, match="not enough memory for one block"):
        plan_memory(BLOCK, GiB // 2, "cuda", num_blocks=30)
    assert plan_memory(BLOCK, 8 * GiB, "cuda", num_blocks=30, blocks=10, cache_tokens=4096).cache_tokens == 4096


def test_a_cpu_peer_keeps_the_default_cache_and_half_the_memory():
    plan = plan_memory(BLOCK, 16 * GiB, "cpu", num_blocks=80)
    assert plan.cache_tokens == DEFAULT_CACHE_TOKENS
    assert plan.blocks == (8 * GiB) // (BLOCK.weights + BLOCK.per_cache_token * DEFAULT_CACHE_TOKENS)
    assert plan_memory(BLOCK, GiB, "cpu", num_blocks=30, blocks=30).blocks == 30  # an explicit span is the user's call


def test_devices_without_a_gpu():
    assert check_device("cpu") == torch.device("cpu") and default_dtype(torch.device("cpu")) == "float32"
    assert default_dtype(torch.device("cuda", 0)) == "float16"
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA device"):
            check_device("cuda:1")


def test_spans_hand_back_host_tensors(tiny_model_path):
    """The network takes host tensors: a span's outputs are on the host whatever its device, and a tensor
    on another device is refused with a clear error instead of hivemind's assertion."""
    span = Span(resolve_model(str(tiny_model_path("llama"))), 0, 2)
    outputs = span.forward_batch([(torch.randn(1, 3, span.config.hidden_size), span.new_cache(1, 3), None)])
    assert outputs[0].device.type == "cpu"
    with pytest.raises(ProtocolError, match="cross the network from the host"):
        protocol.pack_response(protocol.StepResult(step=0, length=1), torch.empty(1, 1, 4, device="meta"))


@pytest.mark.slow  # starts a peer process
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_asked_for_where_there_is_none_exits_2():
    result = subprocess.run([sys.executable, "-m", "peer.cli", "--new-swarm", "--device", "cuda"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "no CUDA device" in result.stderr and "Traceback" not in result.stderr
