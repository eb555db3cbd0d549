"""What only a GPU can show: spans and real peers on CUDA give transformers' results on the same device.

Skipped where torch sees no CUDA device (CI here has none); benchmarks/gpu_check.py measures the
default model on a GPU. The device-agnostic parts run everywhere (tests/test_memory.py).
"""
from __future__ import annotations

import pytest
import torch

from client import DistributedModelForCausalLM
from peer import throughput
from peer.device import hardware
from swarm.client_parts import ClientParts
from swarm.local_swarm import LocalSwarm
from swarm.reference import resolve_model
from swarm.span import Span
from tiny_models import VOCAB_SIZE, greedy_tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_spans_on_cuda_match_transformers_on_cuda(tiny_model_path, tiny_reference):
    model = resolve_model(str(tiny_model_path("llama")))
    ids = torch.randint(3, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = tiny_reference("llama").to("cuda")
    try:
        with torch.no_grad():
            expected = reference(ids.to("cuda")).logits.cpu()
    finally:
        reference.to("cpu")
    spans, client = [Span(model, 0, 2, device="cuda"), Span(model, 2, 5, device="cuda")], ClientParts(model)
    hidden = client.embed(ids)
    for span in spans:
        hidden = span.forward(hidden)
        assert hidden.device.type == "cpu"  # outputs come back to the host, once per pass
    assert (client.logits(hidden) - expected).abs().max() < 1e-4


def test_throughput_on_cuda_is_keyed_by_the_gpu(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path))
    span = Span(resolve_model(str(tiny_model_path("llama"))), 0, 2, device="cuda")
    assert throughput.measure_throughput(span) > 0
    assert torch.cuda.get_device_name(span.device) in hardware(span.device)


@pytest.mark.slow  # starts peer processes
def test_two_cuda_peers_give_transformers_greedy_tokens(tiny_model_path, tiny_reference, tmp_path):
    folder = tiny_model_path("llama")
    ids = torch.randint(3, VOCAB_SIZE, (1, 16), generator=torch.Generator().manual_seed(1))
    expected = greedy_tokens(tiny_reference("llama"), ids, 12)
    with LocalSwarm(tmp_path, ["--model", str(folder), "--device", "cuda", "--dtype", "float32"]) as local:
        local.add_together([["--blocks", "0:2"], ["--blocks", "2:5"]])
        model = DistributedModelForCausalLM.from_pretrained(str(folder), initial_peers=local.initial_peers)
        try:
            tokens = model.generate(ids, max_new_tokens=12, eos_token_id=None)
        finally:
            model.close()
    assert tokens.tolist() == expected.tolist()
