"""Model families beyond Llama: what each does differently is exercised, in spans and through real peers.

test_span.py and test_batching.py compare every family's spans with transformers (uneven splits,
padded batches, batched sessions); this module checks that the tiny configs really exercise what
differs (a span that skipped soft-capping or per-layer rotary bases would be caught), and that two
real peers of each family give transformers' greedy tokens.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from client import DistributedModelForCausalLM
from swarm.client_parts import ClientParts
from swarm.local_swarm import LocalSwarm
from swarm.reference import resolve_model
from swarm.span import Span
from tiny_models import FAMILIES, NUM_LAYERS, VOCAB_SIZE, greedy_tokens

ROOT = Path(__file__).resolve().parent.parent
UNEVEN = [(0, 2), (2, NUM_LAYERS)]
NEW_TOKENS = 12


def prompt(length: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB_SIZE, (1, length), generator=torch.Generator().manual_seed(seed))


def span_logits(spans: list[Span], client: ClientParts, ids: torch.Tensor) -> torch.Tensor:
    hidden = client.embed(ids)
    for span in spans:
        hidden = span.forward(hidden)
    return client.logits(hidden)


def reference_logits(tiny_reference, family: str, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return tiny_reference(family)(ids).logits


def test_gemma2_soft_capping_is_exercised(tiny_model_path, tiny_reference):
    """Both cappings change the logits on the tiny model, so the match in test_span.py covers them."""
    model = resolve_model(str(tiny_model_path("gemma2")))
    ids = prompt()
    expected = reference_logits(tiny_reference, "gemma2", ids)
    spans, client = [Span(model, a, b) for a, b in UNEVEN], ClientParts(model)
    assert (span_logits(spans, client, ids) - expected).abs().max() < 1e-4

    client.logit_softcap = None
    assert (span_logits(spans, client, ids) - expected).abs().max() > 1e-3, "final-logit capping not exercised"
    client = ClientParts(model)
    for span in spans:
        for layer in span.layers:
            layer.self_attn.attn_logit_softcapping = None
    assert (span_logits(spans, client, ids) - expected).abs().max() > 1e-3, "attention capping not exercised"


def test_gemma3_rotary_bases_per_layer_type_are_exercised(tiny_model_path, tiny_reference):
    model = resolve_model(str(tiny_model_path("gemma3_text")))
    ids = prompt()
    expected = reference_logits(tiny_reference, "gemma3_text", ids)
    spans, client = [Span(model, a, b) for a, b in UNEVEN], ClientParts(model)
    assert {kind for span in spans for kind in span.layer_types} == {"sliding_attention", "full_attention"}
    assert (span_logits(spans, client, ids) - expected).abs().max() < 1e-4
    for span in spans:
        span.layer_types = ["sliding_attention"] * span.num_blocks  # one base for every layer
    assert (span_logits(spans, client, ids) - expected).abs().max() > 1e-3


def test_mixtral_experts_are_stacked_as_transformers_loads_them(tiny_model_path, tiny_reference):
    """The checkpoint keeps one w1/w2/w3 per expert; the span's layer holds them stacked, exactly as transformers'."""
    model = resolve_model(str(tiny_model_path("mixtral")))
    span, reference = Span(model, 0, NUM_LAYERS), tiny_reference("mixtral")
    for ours, theirs in zip(span.layers, reference.model.layers):
        assert torch.equal(ours.mlp.experts.gate_up_proj, theirs.mlp.experts.gate_up_proj)
        assert torch.equal(ours.mlp.experts.down_proj, theirs.mlp.experts.down_proj)
        assert torch.equal(ours.mlp.gate.weight, theirs.mlp.gate.weight)
    hidden = ClientParts(model).embed(prompt())
    routed = span.layers[0].mlp.gate(span.layers[0].post_attention_layernorm(hidden))[2]
    assert len({tuple(sorted(pair)) for pair in routed.tolist()}) > 1, "every token went to the same experts"


@pytest.mark.slow  # starts peer processes
@pytest.mark.parametrize("family", FAMILIES)
def test_two_peers_give_transformers_greedy_tokens(family, tiny_model_path, tiny_reference, tmp_path):
    folder = tiny_model_path(family)
    ids = prompt(seed=1)
    expected = greedy_tokens(tiny_reference(family), ids, NEW_TOKENS)
    with LocalSwarm(tmp_path, ["--model", str(folder), "--announce-period", "5"]) as local:
        local.add_together([["--blocks", f"{start}:{end}"] for start, end in UNEVEN],
                           [f"{family}-{start}-{end}" for start, end in UNEVEN])
        model = DistributedModelForCausalLM.from_pretrained(str(folder), initial_peers=local.initial_peers)
        try:
            tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=None)
        finally:
            model.close()
    assert tokens.tolist() == expected.tolist()


@pytest.mark.slow  # starts a peer process
def test_unsupported_model_type_exits_2_naming_the_supported(tiny_model_path):
    result = subprocess.run([sys.executable, "-m", "peer.cli", "--new-swarm", "--model", str(tiny_model_path("gpt2"))],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert "'gpt2' is not supported" in message
    assert all(family in message for family in FAMILIES)
    assert "Traceback" not in result.stderr
