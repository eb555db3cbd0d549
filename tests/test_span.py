"""Spans chained with the client parts must compute what transformers computes, block for block.

The reference is always transformers itself in float32: the default GGUF model loaded by its own GGUF
loader, and tiny random Llama / Mistral / Qwen2 models saved as safetensors.
"""
from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, SLIDING_WINDOW, VOCAB_SIZE

from swarm.attention import attention
from swarm.client_parts import ClientParts
from swarm.reference import resolve_model, safetensors_files
from swarm.span import Span

TOL = 1e-4
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
DECODE_STEPS_DEFAULT = 16
GREEDY_TOKENS = 32

TINY_SPLITS = [(0, 1), (1, 4), (4, 5)]
PROMPT_LENGTHS = [12, 7]  # different lengths: the shorter row is left-padded, as transformers does
TINY_DECODE_STEPS = 6
PAD = 0


def run_chain(spans, caches, client, ids, attention_mask=None):
    hidden = client.embed(ids)
    for span, cache in zip(spans, caches):
        hidden = span.forward(hidden, cache, attention_mask=attention_mask)
    return client.logits(hidden)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    length = max(PROMPT_LENGTHS)
    ids = torch.randint(3, VOCAB_SIZE, (len(PROMPT_LENGTHS), length), generator=generator)
    mask = torch.zeros_like(ids)
    for row, real in enumerate(PROMPT_LENGTHS):
        mask[row, length - real :] = 1
    return ids.masked_fill(mask == 0, PAD), mask


# ---------------------------------------------------------------- the default model (SmolLM2-135M GGUF)


def test_default_spans_match_transformers_logits(default_chain, default_reference, default_greedy):
    spans, client = default_chain
    ids, out = default_greedy(PROMPTS[0])
    prompt_length = ids.shape[1]
    caches = [span.new_cache(1, prompt_length + DECODE_STEPS_DEFAULT) for span in spans]

    logits = run_chain(spans, caches, client, ids)
    with torch.no_grad():
        expected = default_reference(ids).logits
    assert max_diff(logits, expected) < TOL, "prefill, all prompt positions"
    assert max_diff(logits[:, -1], out.logits[0]) < TOL, "prefill, last position vs generate"

    # Decode, teacher-forced with transformers' own greedy tokens: out.logits[k] follows token k-1.
    for step in range(1, DECODE_STEPS_DEFAULT + 1):
        token = out.sequences[:, prompt_length + step - 1 : prompt_length + step]
        logits = run_chain(spans, caches, client, token)
        assert logits.shape == (1, 1, client.lm_head.out_features)
        assert max_diff(logits[:, -1], out.logits[step]) < TOL, f"decode step {step}"
    assert all(cache.length == prompt_length + DECODE_STEPS_DEFAULT for cache in caches)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_default_spans_greedy_tokens_match_generate(prompt, default_chain, default_greedy):
    spans, client = default_chain
    ids, out = default_greedy(prompt)
    expected = out.sequences[0, ids.shape[1] :].tolist()
    assert len(expected) == GREEDY_TOKENS

    caches = [span.new_cache(1, ids.shape[1] + GREEDY_TOKENS) for span in spans]
    generated, step_input = [], ids
    for _ in range(GREEDY_TOKENS):
        next_token = run_chain(spans, caches, client, step_input)[:, -1].argmax(-1)
        generated.append(next_token.item())
        step_input = next_token[:, None]
    assert generated == expected


# ---------------------------------------------------------------- tiny random models: families, padding, shards


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_spans_match_transformers_with_padding(family, sharded, tiny_model_path, tiny_reference):
    folder = tiny_model_path(family, sharded)
    model = resolve_model(str(folder))
    assert model.config.model_type == family
    assert (len(safetensors_files(folder)) > 1) == sharded
    reference = tiny_reference(family, sharded)
    spans = [Span(model, start, end) for start, end in TINY_SPLITS]
    client = ClientParts(model)

    ids, mask = padded_batch()
    batch, length = ids.shape
    assert length + TINY_DECODE_STEPS > SLIDING_WINDOW  # the window must actually cut attention
    with torch.no_grad():
        out = reference.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=TINY_DECODE_STEPS + 1,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=PAD,
            output_logits=True,
            return_dict_in_generate=True,
        )
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # what generate uses for left padding
        expected = reference(ids, attention_mask=mask, position_ids=position_ids).logits

    caches = [span.new_cache(batch, length + TINY_DECODE_STEPS) for span in spans]
    logits = run_chain(spans, caches, client, ids, attention_mask=mask)
    real = mask.bool()
    assert max_diff(logits[real], expected[real]) < TOL, "prefill, real positions"
    assert max_diff(logits[:, -1], out.logits[0]) < TOL, "prefill, last position vs generate"

    for step in range(1, TINY_DECODE_STEPS + 1):
        token = out.sequences[:, length + step - 1 : length + step]
        logits = run_chain(spans, caches, client, token, attention_mask=torch.ones(batch, 1, dtype=torch.long))
        assert max_diff(logits[:, -1], out.logits[step]) < TOL, f"decode step {step}"


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"])
def test_tiny_sliding_window_is_exercised(family, tiny_model_path, tiny_reference):
    """Guard for the test above: spans that ignored the window would be caught on this data."""
    model = resolve_model(str(tiny_model_path(family)))
    spans = [Span(model, start, end) for start, end in TINY_SPLITS]
    assert any(window == SLIDING_WINDOW for span in spans for window in span.windows)
    for span in spans:
        span.windows = [None] * span.num_blocks
    ids, mask = padded_batch()
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        expected = tiny_reference(family)(ids, attention_mask=mask, position_ids=position_ids).logits
    caches = [span.new_cache(*ids.shape) for span in spans]
    logits = run_chain(spans, caches, ClientParts(model), ids, attention_mask=mask)
    assert max_diff(logits[mask.bool()], expected[mask.bool()]) > 1e-3


# ---------------------------------------------------------------- dtypes and cache-less execution


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("new", [1, 9])
def test_16_bit_attention_is_the_rounding_of_the_exact_one(dtype, new):
    """On a CPU it runs widened to float32: a decode step, and a masked prefill, both within 16-bit rounding."""
    torch.manual_seed(0)
    q, keys, values = (torch.randn(1, heads, length, 64).to(getattr(torch, dtype)) for heads, length in
                       ((9, new), (3, 40), (3, 40)))
    mask = torch.ones(new, 40, dtype=torch.bool).tril(40 - new)[None, None]
    got = attention(q, keys, values, mask, None)
    groups = [t.double().repeat_interleave(3, dim=1) for t in (keys, values)]
    scores = (q.double() @ groups[0].transpose(-1, -2) / 8).masked_fill(~mask, float("-inf"))
    exact = torch.softmax(scores, dim=-1) @ groups[1]
    tolerance = 2e-3 if dtype == "float16" else 1.6e-2
    assert got.dtype == getattr(torch, dtype) and got.shape == exact.shape
    assert torch.allclose(got.double(), exact, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_spans_are_finite_and_close_to_float32(dtype, default_model, default_chain, default_greedy):
    spans32, client = default_chain
    spans = [Span(default_model, 0, 15, dtype=dtype), Span(default_model, 15, 30, dtype=dtype)]
    assert all(p.dtype == getattr(torch, dtype) for span in spans for p in span.layers.parameters())
    ids, out = default_greedy(PROMPTS[0])
    sequence = out.sequences[:, : ids.shape[1] + 4]
    caches = [span.new_cache(1, sequence.shape[1]) for span in spans]
    caches32 = [span.new_cache(1, sequence.shape[1]) for span in spans32]

    # prefill, then 4 decode steps through the low-precision caches
    for chunk in [sequence[:, : ids.shape[1]]] + [sequence[:, i : i + 1] for i in range(ids.shape[1], sequence.shape[1])]:
        hidden, hidden32 = client.embed(chunk), client.embed(chunk)
        for span, cache in zip(spans, caches):
            hidden = span.forward(hidden, cache)
        for span, cache in zip(spans32, caches32):
            hidden32 = span.forward(hidden32, cache)
        assert hidden.dtype == getattr(torch, dtype)
        assert torch.isfinite(hidden).all()
        assert not torch.equal(hidden.float(), hidden32)  # it really ran in lower precision
        relative = ((hidden.float() - hidden32).norm() / hidden32.norm()).item()
        assert relative < 0.05, f"{dtype} hidden states {relative:.3f} away from float32"
        logits, logits32 = client.logits(hidden), client.logits(hidden32)
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
        cosine = torch.nn.functional.cosine_similarity(logits.flatten(), logits32.flatten(), dim=0).item()
        assert cosine > 0.995, f"{dtype} logits cosine {cosine:.4f}"
        assert logits[:, -1].argmax(-1).item() == logits32[:, -1].argmax(-1).item()


def test_span_without_cache_equals_cached_prefill_default(default_chain, default_tokenizer):
    spans, client = default_chain
    ids = default_tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    hidden = client.embed(ids)
    for span in spans:
        without = span.forward(hidden)
        with_cache = span.forward(hidden, span.new_cache(1, ids.shape[1] + 8))
        torch.testing.assert_close(without, with_cache, rtol=0, atol=1e-6)
        hidden = with_cache
    assert not torch.allclose(hidden, client.embed(ids))  # the spans did transform the states


@pytest.mark.parametrize("family", FAMILIES)
def test_span_without_cache_equals_cached_prefill_padded(family, tiny_model_path):
    model = resolve_model(str(tiny_model_path(family)))
    span = Span(model, 1, 4)
    ids, mask = padded_batch(seed=1)
    hidden = ClientParts(model).embed(ids)
    without = span.forward(hidden, attention_mask=mask)
    with_cache = span.forward(hidden, span.new_cache(*ids.shape), attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(without[real], with_cache[real], rtol=0, atol=1e-6)
    # and the mask matters: without it the padded row's real positions change
    unmasked = span.forward(hidden)
    assert max_diff(unmasked[real], without[real]) > 1e-3


def test_reordered_cache_continues_the_rows_it_names(tiny_model_path):
    """Beam search's reorder: after it, each row's next step sees the history of the row it names, padding included."""
    model = resolve_model(str(tiny_model_path("llama")))
    span, parts = Span(model, 0, 4), ClientParts(model)
    ids, mask = padded_batch(seed=2)
    rows = [ids.shape[0] - 1, 0, 0][: ids.shape[0]]
    step = parts.embed(torch.randint(3, VOCAB_SIZE, (len(rows), 1), generator=torch.Generator().manual_seed(3)))
    reordered = span.new_cache(ids.shape[0], ids.shape[1] + 1)
    span.forward(parts.embed(ids), reordered, attention_mask=mask)
    reordered.reorder(rows)
    fresh = span.new_cache(len(rows), ids.shape[1] + 1)  # the named rows' prompts, computed from scratch
    span.forward(parts.embed(ids[rows]), fresh, attention_mask=mask[rows])
    torch.testing.assert_close(span.forward(step, reordered, attention_mask=torch.ones(len(rows), 1)),
                               span.forward(step, fresh, attention_mask=torch.ones(len(rows), 1)), rtol=0, atol=1e-6)
