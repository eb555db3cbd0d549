"""Precisions and quantized blocks: tokens against transformers at the same precision, or against a
one-process run of our own span code where transformers has no such weights; the measured choice of
the default precision; routes that require a precision; memory per block."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from client import DistributedModelForCausalLM
from peer.memory import Footprint
from peer.precision import faster_dtype
from swarm.client_parts import ClientParts
from swarm.errors import QuantizationError, RouteError
from swarm.local_swarm import LocalSwarm, start_peer
from swarm.quantized import GROUP, Int4Linear, check_quantizable, dequantize_gguf_q4
from swarm.reference import resolve_model
from swarm.span import Span
from swarm.weights import iter_block_weights

MODEL = resolve_model("smollm2-135m")
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
PROMPT_IDS = [MODEL.tokenizer()(prompt, return_tensors="pt").input_ids for prompt in PROMPTS]
NEW_TOKENS = 24
EOS = {MODEL.config.eos_token_id} if isinstance(MODEL.config.eos_token_id, int) else set(MODEL.config.eos_token_id or ())


def tokens_of(model, ids: torch.Tensor) -> list[int]:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                          do_sample=False)[0, ids.shape[1]:].tolist()


def span_greedy(span: Span, parts: ClientParts, ids: torch.Tensor) -> list[int]:
    """Greedy decoding in this process through our own span code: the reference for quantized weights."""
    cache = span.new_cache(1, ids.shape[1] + NEW_TOKENS)
    hidden, tokens = parts.embed(ids), []
    for _ in range(NEW_TOKENS):
        token = int(parts.logits(span.forward(hidden, cache)[:, -1:])[0, -1].argmax())
        tokens.append(token)
        if token in EOS:
            break
        hidden = parts.embed(torch.tensor([[token]]))
    return tokens


def two_peer_tokens(tmp_path, peer_args: list[str], **client) -> list[list[int]]:
    """Greedy tokens of each prompt through two real peers (0:15, 15:30) started with `peer_args`."""
    with LocalSwarm(tmp_path, peer_args) as local:
        local.add_together([["--blocks", "0:15"], ["--blocks", "15:30"]])
        model = DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=local.initial_peers, **client)
        return [tokens_of(model, ids) for ids in PROMPT_IDS]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_swarm_in_16_bits_gives_transformers_tokens_at_that_precision(dtype, tmp_path):
    path = MODEL.gguf_file
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=getattr(torch, dtype)).eval()
    # float16: a client that takes any precision, as by default (its head reads a float16 copy behind float16 peers)
    client = {} if dtype == "float16" else {"dtype": dtype}
    assert two_peer_tokens(tmp_path, ["--dtype", dtype], **client) == [tokens_of(reference, ids) for ids in PROMPT_IDS]


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_a_quantized_swarm_gives_the_tokens_of_our_quantized_span_in_one_process(quant, tmp_path):
    span, parts = Span(MODEL, 0, 30, quant=quant), ClientParts(MODEL)
    assert two_peer_tokens(tmp_path, ["--quant", quant], quant=quant) == [span_greedy(span, parts, ids) for ids in PROMPT_IDS]


@pytest.mark.slow
def test_a_client_requiring_a_precision_routes_only_through_peers_in_it(tmp_path):
    ids = PROMPT_IDS[0]
    with LocalSwarm(tmp_path) as local:
        plain, quantized = local.add_together([["--blocks", "0:30"], ["--blocks", "0:30", "--quant", "int4"]],
                                              ["float32", "int4"])
        for quant, peer in (("int4", quantized), ("none", plain)):
            model = DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=local.initial_peers,
                                                                quant=quant)
            with model.session(ids.shape[1] + 4) as session:
                model.generate(ids, max_new_tokens=4, session=session)
                assert {hop.peer_id for step in session.timings for hop in step.hops} == {peer.peer_id}, quant
        model = DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=local.initial_peers,
                                                            dtype="float16", route_timeout=0.5)
        with pytest.raises(RouteError, match="2 online peers compute in another precision than the required dtype=float16"):
            model.generate(ids, max_new_tokens=1)


@pytest.mark.slow
def test_a_peer_without_dtype_measures_its_precision(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.delenv("SWARM_DTYPE")  # the tests' pin (conftest.py)
    peer = start_peer(["--new-swarm", "--model", str(tiny_llama), "--blocks", "0:2"], tmp_path, "peer",
                      env={"SWARM_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "400"})  # log lines unwrapped
    try:
        stored = json.loads((tmp_path / "cache" / "throughput.json").read_text())
        (speeds,) = [value for key, value in stored.items() if key.startswith("precision:")]
        assert set(speeds) == {"float32", "float16"} and all(v > 0 for v in speeds.values())
        chosen = faster_dtype(speeds)
        log = peer.log.read_text()
        assert f"computing in {chosen}" in log and f"threads) in {chosen}" in log, log
    finally:
        assert peer.stop() == 0


def test_float16_is_chosen_only_when_clearly_faster():
    assert faster_dtype({"float32": 100, "float16": 240}) == "float16"
    assert faster_dtype({"float32": 100, "float16": 110}) == "float32"  # within the margin: the closer to float32
    assert faster_dtype({"float32": 100, "float16": 60}) == "float32"


@pytest.mark.slow
def test_a_gguf_q4_1_block_loaded_as_int4_keeps_its_weights():
    """The 4-bit values are the file's; scales and zeros are rounded to the kernel's bfloat16, far below a step."""
    quantized = next(iter_block_weights(MODEL, 0, 1, "q4"))
    dequantized = next(iter_block_weights(MODEL, 0, 1))  # transformers' own GGUF dequantization
    names = [n.removesuffix(".quants") for n in quantized if n.endswith(".quants")]
    assert len(names) == 7  # q k v o gate up down: every linear weight of a Llama block
    for name in names:
        quants, d, m = (quantized[f"{name}.{part}"] for part in ("quants", "d", "m"))
        assert torch.equal(dequantize_gguf_q4(quants, d, m), dequantized[name]), name
        layer = Int4Linear.from_gguf_q4(quants, d, m)
        effective = layer(torch.eye(layer.in_features)).T.float()  # the weights as the kernel multiplies by them
        step = d.float().abs().repeat_interleave(GROUP, dim=1)
        assert ((effective - dequantized[name]).abs() <= 0.1 * step + 1e-6).all(), name


def test_quantized_blocks_take_a_fraction_of_float32_memory():
    float32 = Footprint.of(MODEL, "float32").weights
    assert Footprint.of(MODEL, "float32", "int8").weights <= 0.35 * float32
    assert Footprint.of(MODEL, "float32", "int4").weights <= 0.2 * float32
    assert Footprint.of(MODEL, "float32", cache_dtype="float16").per_cache_token * 2 == \
        Footprint.of(MODEL, "float32").per_cache_token


def test_a_cache_kept_in_float16_serves_a_float32_span(tiny_llama):
    model = resolve_model(str(tiny_llama))
    hidden = torch.randn(1, 6, model.config.hidden_size)
    plain, halved = Span(model, 0, 3), Span(model, 0, 3, cache_dtype="float16")
    cache = halved.new_cache(1, 8)
    assert cache.keys[0].dtype == torch.float16
    out, expected = halved.forward(hidden, cache), plain.forward(hidden)
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-2)


def test_int4_refuses_shapes_and_devices_its_kernel_cannot_run(tmp_path):
    config = LlamaConfig(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=64)
    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, layer_idx=0)
    with pytest.raises(QuantizationError, match="use --quant int8"):
        check_quantizable(layer, "int4", torch.device("cpu"))
    check_quantizable(layer, "int8", torch.device("cpu"))
    with pytest.raises(QuantizationError, match="CPU only"):
        check_quantizable(layer, "int8", torch.device("cuda", 0))
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "odd")
    MODEL.tokenizer().save_pretrained(tmp_path / "odd")
    run = lambda *args: subprocess.run([sys.executable, "-m", "peer.cli", "--new-swarm", *args], capture_output=True,
                                       text=True, timeout=120)
    result = run("--model", str(tmp_path / "odd"), "--quant", "int4")
    assert result.returncode == 2 and "--quant int4 needs" in result.stderr and "Traceback" not in result.stderr
    result = run("--quant", "int3")
    assert result.returncode == 2 and "quant" in result.stderr
