"""How faithful each precision and quantization is to float32 transformers on the same weights.

    python -m benchmarks.fidelity                      # every QUANT/DTYPE case
    python -m benchmarks.fidelity --cases int4/float32 --new-tokens 32

Per case, in this process, through the span code the peers run (`Span` over all blocks plus the
client parts in float32):
- logits error on a fixed text: the largest absolute difference from float32 transformers' logits,
  relative to their largest magnitude, and the share of positions whose top token differs;
- greedy agreement: of 10 prompts x NEW_TOKENS tokens, how many tokens equal transformers' float32
  greedy tokens before the first difference (a divergence changes everything after it);
- perplexity on benchmarks/texts/genesis-1-4-kjv.txt (Genesis 1-4, King James Version: public
  domain; from Debian's bible-kjv-text), about 3400 tokens, and its ratio to float32 transformers'.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch
import typer
from transformers import AutoModelForCausalLM

from benchmarks.common import console, machine_info, table, write_results
from swarm.client_parts import ClientParts
from swarm.reference import resolve_model
from swarm.span import Span

TEXT = Path(__file__).parent / "texts" / "genesis-1-4-kjv.txt"
PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,", "The three laws of motion",
    "Water boils at", "A good recipe for bread starts with", "The largest planet in the solar system",
    "import numpy as np\n", "In 1492, Columbus", "The meaning of life is",
]
CASES = "none/float32,none/bfloat16,none/float16,int8/float32,int8/float16,int4/float32,int4/float16"
app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0])


class SpanModel:
    """The whole model as the swarm computes it, in one process: our spans, the client's parts."""

    def __init__(self, span: Span, parts: ClientParts):
        self.span, self.parts = span, parts

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.parts.logits(self.span.forward(self.parts.embed(ids)))[0]

    @torch.inference_mode()
    def greedy(self, ids: torch.Tensor, new_tokens: int) -> list[int]:
        cache = self.span.new_cache(1, ids.shape[1] + new_tokens)
        hidden, tokens = self.parts.embed(ids), []
        for _ in range(new_tokens):
            token = int(self.parts.logits(self.span.forward(hidden, cache)[:, -1:])[0, -1].argmax())
            tokens.append(token)
            hidden = self.parts.embed(torch.tensor([[token]]))
        return tokens


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1].float(), ids[0, 1:]).item())


def agreement(tokens: list[int], expected: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), len(expected))


@app.command()
def main(
    cases: str = typer.Option(CASES, help="QUANT/DTYPE pairs."),
    new_tokens: int = typer.Option(64, min=1, help="Greedy tokens per prompt."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Result file (default: benchmarks/results/)."),
) -> None:
    model = resolve_model("smollm2-135m")
    tokenizer = model.tokenizer()
    text_ids = tokenizer(TEXT.read_text(), return_tensors="pt").input_ids
    prompts = [tokenizer(p, return_tensors="pt").input_ids for p in PROMPTS]
    path = model.gguf_file
    with console.status("float32 transformers: the reference"):
        reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        with torch.inference_mode():
            expected_logits = reference(text_ids).logits[0]
            expected = [reference.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=new_tokens,
                                           min_new_tokens=new_tokens, do_sample=False)[0, p.shape[1]:].tolist()
                        for p in prompts]
        del reference
    reference_ppl = perplexity(expected_logits, text_ids)
    scale = expected_logits.abs().max().item()
    parts = ClientParts(model)
    results: dict[str, dict[str, Any]] = {}
    for case in cases.split(","):
        quant, dtype = case.split("/")
        with console.status(f"{case}"):
            ours = SpanModel(Span(model, 0, model.num_blocks, dtype, quant=quant), parts)
            logits = ours.logits(text_ids)
            same = [agreement(ours.greedy(p, new_tokens), e) for p, e in zip(prompts, expected)]
        ppl = perplexity(logits, text_ids)
        results[case] = {
            "max_logit_error_relative": round((logits - expected_logits).abs().max().item() / scale, 5),
            "top1_differs_share": round((logits.argmax(-1) != expected_logits.argmax(-1)).float().mean().item(), 4),
            "greedy_tokens_equal": sum(same), "greedy_tokens": new_tokens * len(prompts),
            "prompts_fully_equal": sum(s == new_tokens for s in same),
            "perplexity": round(ppl, 3), "perplexity_ratio": round(ppl / reference_ppl, 4),
        }
        console.print(f"{case}: {results[case]}")
    console.print(table(
        f"Against float32 transformers (perplexity {reference_ppl:.3f} on {text_ids.shape[1]} tokens of {TEXT.name})",
        ["case", "max logit error", "top-1 differs", "greedy equal", "prompts equal", "perplexity", "x float32"],
        [[c, r["max_logit_error_relative"], r["top1_differs_share"], f"{r['greedy_tokens_equal']}/{r['greedy_tokens']}",
          f"{r['prompts_fully_equal']}/{len(PROMPTS)}", r["perplexity"], r["perplexity_ratio"]]
         for c, r in results.items()]))
    out = write_results("fidelity", {"machine": machine_info(), "text_tokens": text_ids.shape[1],
                                     "reference_perplexity": round(reference_ppl, 3), "cases": results}, json_path)
    console.print(f"results: {out}")


if __name__ == "__main__":
    app()
