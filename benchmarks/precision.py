"""Speed and memory per block of each precision and quantization, through real peers, in one run.

    python -m benchmarks.precision                           # none/int8/int4 x float32/bfloat16/float16
    python -m benchmarks.precision --cases none/float32,int4/float32 --new-tokens 32

Per case: one peer serving all 30 blocks generates one session, then 8 concurrent sessions
(tokens per second, aggregate). Its resident memory once ready (its start measured a step through
every block, so every weight was read), minus that of a peer serving one block, over 29, is the
memory per block. The one-process baselines (transformers `generate` in
float32 and float16, one prompt, and the same 8 prompts as one batch) run in the same minutes, so
every figure is also a ratio to the fastest of them. Tokens are compared too: a quantized case's
greedy tokens are reported as the share equal to float32 transformers', not required to match.
"""
from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import psutil
import torch
import typer
from transformers import AutoModelForCausalLM

from benchmarks.common import console, machine_info, table, write_results
from client import DistributedModelForCausalLM
from swarm.local_swarm import LocalSwarm
from swarm.gguf_shards import data_dir
from swarm.reference import resolve_model

PROMPTS = [
    "The history of the printing press", "def fibonacci(n):", "The capital of France is", "Once upon a time",
    "The three laws of thermodynamics", "A recipe for bread:", "Dear hiring manager,", "In the year 2050,",
]
CACHE_ENV = "SWARM_CACHE_DIR"
app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0])


def _generate_timed(model: Any, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    started = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return (out.shape[1] - ids.shape[1]) * out.shape[0] / (time.perf_counter() - started), out[0, ids.shape[1]:].tolist()


def _concurrent(model: DistributedModelForCausalLM, prompts: list[torch.Tensor], new_tokens: int) -> float:
    """Aggregate tokens per second of one thread per prompt, each with its own session."""
    counts = [0] * len(prompts)

    def run(i: int) -> None:
        out = model.generate(prompts[i], max_new_tokens=new_tokens, do_sample=False)
        counts[i] = out.shape[1] - prompts[i].shape[1]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - started)


def _rss_mib(pid: int) -> float:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]
               if p.name().startswith("python")) / 2**20


@app.command()
def main(
    cases: str = typer.Option("none/float32,none/bfloat16,none/float16,int8/float32,int8/bfloat16,int8/float16,"
                              "int4/float32,int4/bfloat16,int4/float16", help="QUANT/DTYPE pairs."),
    new_tokens: int = typer.Option(48, min=2, help="Tokens generated per session."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Result file (default: benchmarks/results/)."),
) -> None:
    model_info = resolve_model("smollm2-135m")
    tokenizer = model_info.tokenizer()
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    batch = [tokenizer(p, return_tensors="pt").input_ids for p in PROMPTS]
    path = model_info.gguf_file
    baselines: dict[str, dict[str, float]] = {}
    reference_tokens: list[int] = []
    for dtype in ("float32", "float16"):
        local = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=getattr(torch, dtype)).eval()
        _generate_timed(local, ids, 4)
        speed, tokens = _generate_timed(local, ids, new_tokens)
        reference_tokens = reference_tokens or tokens
        tokenizer.padding_side = "left"
        padded = tokenizer(PROMPTS, return_tensors="pt", padding=True)
        started = time.perf_counter()
        out = local.generate(**padded, max_new_tokens=new_tokens, do_sample=False)
        batched = (out.shape[1] - padded.input_ids.shape[1]) * len(PROMPTS) / (time.perf_counter() - started)
        baselines[f"transformers {dtype}"] = {"one_session_tok_s": round(speed, 1), "batch8_tok_s": round(batched, 1)}
        console.print(f"transformers {dtype}: {speed:.1f} tok/s, batch of 8 {batched:.1f} tok/s")
        del local
    fastest_one = max(b["one_session_tok_s"] for b in baselines.values())
    fastest_batch = max(b["batch8_tok_s"] for b in baselines.values())

    results: dict[str, dict[str, Any]] = {}
    for case in cases.split(","):
        quant, dtype = case.split("/")
        args = ["--quant", quant, "--dtype", dtype]
        with tempfile.TemporaryDirectory() as scratch, LocalSwarm(Path(scratch), args) as swarm:
            # a fresh throughput cache, so each peer's start measures a step through all its blocks (reading every
            # weight before its memory is taken); the converted GGUF shards are shared
            (Path(scratch) / "gguf").symlink_to(data_dir() / "gguf")
            peer = swarm.add(["--blocks", "0:30"], env={CACHE_ENV: scratch})
            small = swarm.add(["--blocks", "0:1"], env={CACHE_ENV: scratch})
            full, one = _rss_mib(peer.process.pid), _rss_mib(small.process.pid)
            small.stop()
            model = DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=swarm.initial_peers)
            _generate_timed(model, ids, 4)
            speed, tokens = _generate_timed(model, ids, new_tokens)
            concurrent = _concurrent(model, batch, new_tokens)
            agree = next((i for i, (a, b) in enumerate(zip(tokens, reference_tokens)) if a != b), len(tokens))
        results[case] = {
            "one_session_tok_s": round(speed, 1), "ratio_one": round(speed / fastest_one, 2),
            "sessions8_tok_s": round(concurrent, 1), "ratio_8": round(concurrent / fastest_batch, 2),
            "mib_per_block": round((full - one) / 29, 2), "tokens_equal_to_float32_before_first_difference": agree,
        }
        console.print(f"{case}: {results[case]}")
    console.print(table(
        f"Through one peer serving 30 blocks; ratios to the fastest transformers run ({fastest_one:.1f} tok/s, "
        f"batch of 8 {fastest_batch:.1f} tok/s)",
        ["case", "1 session tok/s", "x best", "8 sessions tok/s", "x best batch", "MiB/block", "same tokens"],
        [[c, r["one_session_tok_s"], r["ratio_one"], r["sessions8_tok_s"], r["ratio_8"], r["mib_per_block"],
          f"{r['tokens_equal_to_float32_before_first_difference']}/{new_tokens}"] for c, r in results.items()]))
    out = write_results("precision", {"machine": machine_info(), "new_tokens": new_tokens, "baselines": baselines,
                                      "cases": results}, json_path)
    console.print(f"results: {out}")


if __name__ == "__main__":
    app()
