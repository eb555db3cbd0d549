"""Peak memory of loading part of a model versus all of it.

Each case runs in a fresh interpreter and reports its peak RSS (getrusage ru_maxrss), so one case's
allocations cannot hide another's. It is read twice: right after loading, and after one forward pass
over a short prompt. The second matters: weights read from safetensors are memory-mapped, so their
pages only become resident (and count in RSS) once a forward pass touches them. They stay clean,
file-backed pages the kernel can drop and re-read, unlike the anonymous memory of a copied tensor;
the `file_backed_mib` column shows how much of the RSS is of that kind.

  baseline          the imports every case does, nothing loaded
  resolved          baseline + resolve_model() + the family's modeling module: the fixed cost every
                    case below pays; the "over" columns are relative to this row
  span_0_10         Span(model, 0, 10): what a peer serving a third of the default model holds
  span_0_30_client  Span(model, 0, 30) + ClientParts: the whole model, loaded the swarm's way
  transformers      AutoModelForCausalLM.from_pretrained(<gguf>): the whole model, loaded transformers' way

The GGUF cache is warmed first (in its own process), so no case pays for a conversion.

    python -m benchmarks.load_memory [--model smollm2-135m] [--dtype float32]

Prints a table and writes benchmarks/results/load_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import machine_info

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "load_memory.json"
CASES = ["baseline", "resolved", "span_0_10", "span_0_30_client", "transformers"]
DESCRIPTIONS = {
    "baseline": "imports only",
    "resolved": "imports + resolve_model + family module",
    "span_0_10": "Span(model, 0, 10)",
    "span_0_30_client": "Span(model, 0, 30) + ClientParts",
    "transformers": "transformers AutoModelForCausalLM from the GGUF",
}


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _rss_breakdown_mib() -> tuple[float, float]:
    """(resident, of which file-backed) from /proc/self/smaps_rollup."""
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0].rstrip(":")] = int(parts[1]) / 1024
    rss = fields.get("Rss", float("nan"))
    return rss, rss - fields.get("Anonymous", 0.0)


def _tensor_mib(modules) -> float:
    seen, total = set(), 0
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total / 2**20


def child(case: str, model_ref: str, dtype: str) -> dict:
    """Run one case in this (fresh) process and return its measurements."""
    import torch  # every case pays for the same imports
    from transformers import AutoModelForCausalLM

    from swarm import gguf_shards
    from swarm.client_parts import ClientParts
    from swarm.families import family_of
    from swarm.reference import resolve_model
    from swarm.span import Span

    started = time.perf_counter()
    keep: list = []
    forward = None  # runs a short prompt through what was loaded
    ids = torch.arange(1, 9)[None]
    if case == "warm":
        model = resolve_model(model_ref)
        if model.gguf_file is not None:
            groups = list(range(model.num_blocks)) + [gguf_shards.CLIENT_SHARD]
            gguf_shards.ensure_shards(model.gguf_file, model.folder, groups)
    elif case == "baseline":
        pass
    elif case == "resolved":
        family_of(resolve_model(model_ref).config)
    elif case == "span_0_10":
        model = resolve_model(model_ref)
        span = Span(model, 0, 10, dtype=dtype)
        keep = [span.layers]
        forward = lambda: span.forward(torch.randn(1, ids.shape[1], model.hidden_size))  # noqa: E731
    elif case == "span_0_30_client":
        model = resolve_model(model_ref)
        span, client = Span(model, 0, model.num_blocks, dtype=dtype), ClientParts(model, dtype=dtype)
        keep = [span.layers, client]
        forward = lambda: client.logits(span.forward(client.embed(ids)))  # noqa: E731
    elif case == "transformers":
        model = resolve_model(model_ref)
        if model.gguf_file is None:
            loaded = AutoModelForCausalLM.from_pretrained(model.folder, dtype=getattr(torch, dtype))
        else:
            file = model.gguf_file
            loaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=getattr(torch, dtype))
        keep = [loaded.eval()]
        forward = lambda: loaded(ids).logits  # noqa: E731
    else:
        raise SystemExit(f"unknown case {case!r}")
    load_seconds = time.perf_counter() - started
    result = {
        "case": case,
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "tensors_mib": round(_tensor_mib(keep), 1),
        "load_seconds": round(load_seconds, 2),
    }
    if forward is not None:
        with torch.inference_mode():
            forward()
    _, file_backed = _rss_breakdown_mib()
    result["peak_rss_after_forward_mib"] = round(_peak_rss_mib(), 1)
    result["file_backed_mib"] = round(file_backed, 1)
    return result


def run_case(case: str, model_ref: str, dtype: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.load_memory", "--child", case, "--model", model_ref, "--dtype", dtype]
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; the lowest peak is kept")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.dtype)))
        return

    run_case("warm", args.model, args.dtype)
    results = {}
    for case in CASES:
        runs = [run_case(case, args.model, args.dtype) for _ in range(args.repeat)]
        results[case] = min(runs, key=lambda r: r["peak_rss_mib"])
    baseline = results["resolved"]["peak_rss_mib"]
    for result in results.values():
        result["over_baseline_mib"] = round(result["peak_rss_mib"] - baseline, 1)
        result["after_forward_over_baseline_mib"] = round(result["peak_rss_after_forward_mib"] - baseline, 1)

    print(f"peak RSS of loading {args.model} ({args.dtype}), one fresh process per case, warm GGUF cache")
    print("(MiB; 'loaded' = peak right after loading, '+forward' = peak after one 8-token forward pass;")
    print(" 'over' = minus the 'resolved' row's peak; file-backed = resident mmap'd pages after the forward)")
    header = ["case", "loaded", "over resolved", "+forward", "over resolved", "file-backed", "tensors", "load s"]
    print(f"{header[0]:<50}" + "".join(f"{h:>14}" for h in header[1:]))
    for case, r in results.items():
        row = [
            r["peak_rss_mib"], r["over_baseline_mib"], r["peak_rss_after_forward_mib"],
            r["after_forward_over_baseline_mib"], r["file_backed_mib"], r["tensors_mib"],
        ]
        print(f"{DESCRIPTIONS[case]:<50}" + "".join(f"{v:>14.0f}" for v in row) + f"{r['load_seconds']:>14.1f}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "load_memory",
                "model": args.model,
                "dtype": args.dtype,
                "repeat": args.repeat,
                "units": "MiB (peak RSS from getrusage ru_maxrss; file_backed from smaps_rollup after the forward), seconds",
                "cases": {case: {"description": DESCRIPTIONS[case], **r} for case, r in results.items()},
                "environment": machine_info(),
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
