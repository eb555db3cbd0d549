"""The matrix products a block's decode step can use, at the default model's block shapes: why --quant uses what it uses.

    python -m benchmarks.kernels [--rows 1,8,64] [--threads 2,1]

Per row count and thread count: microseconds for the four linear shapes of a SmolLM2 block
(q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536, each once), for float products in each
dtype and torch's weight-only int8 / int4 CPU kernels with float32, float16 and bfloat16
activations. The weights stay in cache here, so this compares kernels, not memory traffic; the
quantized products' results are checked in tests/test_precision.py.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch
import typer

from benchmarks.common import console, machine_info, parse_list, table, write_results
from swarm.quantized import Int4Linear, Int8Linear

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # (out, in): q (and o), k (and v), gate (and up), down
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0])


def _microseconds(product: Callable[[], torch.Tensor], repeats: int = 200) -> float:
    for _ in range(10):
        product()
    started = time.perf_counter()
    for _ in range(repeats):
        product()
    return (time.perf_counter() - started) / repeats * 1e6


def _int8(weight: torch.Tensor, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    layer = Int8Linear(weight)
    scales = layer.scales.view(torch.bfloat16).to(x.dtype)
    return lambda: torch._weight_int8pack_mm(x, layer.weight, scales)


def _int4(weight: torch.Tensor, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    layer = Int4Linear.from_float(weight)
    scales_and_zeros = layer.scales_and_zeros.view(torch.bfloat16).to(x.dtype)
    return lambda: torch._weight_int4pack_mm_for_cpu(x, layer.packed, 32, scales_and_zeros)


@app.command()
def main(
    rows: str = typer.Option("1,8,64", help="Rows (tokens) per product."),
    threads: str = typer.Option("2,1", help="torch threads."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Result file (default: benchmarks/results/)."),
) -> None:
    torch.manual_seed(0)
    weights = [torch.randn(out, inp) / inp**0.5 for out, inp in SHAPES]
    results: dict[str, dict[str, float]] = {}
    for count in parse_list(threads):
        torch.set_num_threads(count)
        for m in parse_list(rows):
            inputs = [torch.randn(m, w.shape[1]) for w in weights]
            row: dict[str, float] = {}
            for name, dtype in DTYPES.items():
                row[f"{name} linear"] = sum(_microseconds(lambda w=w.to(dtype), x=x.to(dtype): torch.nn.functional.linear(x, w))
                                            for w, x in zip(weights, inputs))
                # some of torch's CPU kernels require their scales in the activations' dtype: given so, when they run
                for kind, build in (("int8", _int8), ("int4", _int4)):
                    try:
                        row[f"{kind} kernel, {name} input"] = sum(_microseconds(build(w, x.to(dtype)))
                                                                  for w, x in zip(weights, inputs))
                    except RuntimeError:
                        pass  # this kernel does not take this input dtype
            results[f"{count} threads, {m} rows"] = {k: round(v, 1) for k, v in row.items()}
            console.print(f"{count} threads, {m} rows: {results[f'{count} threads, {m} rows']}")
    columns = sorted({k for r in results.values() for k in r})
    console.print(table("Microseconds for one block's four linear shapes", ["case", *columns],
                        [[case, *(r.get(c) for c in columns)] for case, r in results.items()]))
    out = write_results("kernels", {"machine": machine_info(), "results": results}, json_path)
    console.print(f"results: {out}")


if __name__ == "__main__":
    app()
