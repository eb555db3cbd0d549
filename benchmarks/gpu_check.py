"""GPU check: three real peers on one CUDA device against transformers on the same device, in one run.

What it measures, for the default model at the peers' precision (float16 on a GPU unless --dtype):
greedy tokens of the swarm against transformers' (they must be equal), decode tok/s and TTFT of both,
each peer's start time (spawn to `ready`), and each peer's device memory per block. `--device cpu`
runs the same steps on the CPU, to try the script where no GPU is lent.

    python -m benchmarks.gpu_check                  # on a machine with CUDA
    python -m benchmarks.gpu_check --device cpu     # the same steps on the CPU
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import psutil
import torch
import typer

from benchmarks.common import console, machine_info, median, table, write_results
from benchmarks.speed import Baseline, timed_generate
from swarm.local_swarm import LocalSwarm, PeerProcess

app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0])
SPLITS = [(0, 10), (10, 20), (20, 30)]
PROMPT = "The history of computing began with"


def device_memory_mib(peer: PeerProcess, device: str) -> float:
    """The peer's memory on its device: nvidia-smi's count for its processes on a GPU, RSS on the CPU."""
    pids = {peer.process.pid, *(c.pid for c in psutil.Process(peer.process.pid).children(recursive=True))}
    if device.startswith("cuda") and shutil.which("nvidia-smi"):
        listing = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30).stdout
        return float(sum(int(used) for pid, used in (line.split(", ") for line in listing.splitlines() if line.strip())
                         if int(pid) in pids))
    return sum(psutil.Process(pid).memory_info().rss for pid in pids) / 2**20


@app.command()
def main(
    device: str = typer.Option("cuda", help="cuda, cuda:N or cpu."),
    dtype: Optional[str] = typer.Option(None, help="The peers' and transformers' precision (default: the device's)."),
    new_tokens: int = typer.Option(64, min=1, help="Tokens decoded after the first."),
    runs: int = typer.Option(3, min=1, help="Generations of each side; medians are reported."),
) -> None:
    from client import DistributedModelForCausalLM
    from peer.device import check_device, default_dtype, hardware
    from peer.memory import Footprint
    from swarm.reference import resolve_model

    target = check_device(device)
    dtype = dtype or default_dtype(target)
    model = resolve_model()
    ids = model.tokenizer()(PROMPT, return_tensors="pt").input_ids
    console.print(f"{hardware(target)}; {model.name} in {dtype}")

    baseline = Baseline(model, str(target), getattr(torch, dtype))
    reference = [timed_generate(baseline.generate, ids, new_tokens)[0] for _ in range(runs)]
    del baseline
    if target.type == "cuda":
        torch.cuda.empty_cache()

    logs = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    with LocalSwarm(logs, ["--device", str(target), "--dtype", dtype]) as swarm:
        starts = []
        for start, end in SPLITS:
            began = time.perf_counter()
            swarm.add(["--blocks", f"{start}:{end}"], f"peer-{start}-{end}")
            starts.append(time.perf_counter() - began)
        client = DistributedModelForCausalLM.from_pretrained(initial_peers=swarm.initial_peers, dtype=dtype)
        try:
            swarm_runs = [timed_generate(client.generate, ids, new_tokens)[0] for _ in range(runs)]
        finally:
            client.close()
        memory = [device_memory_mib(peer, str(target)) for peer in swarm.peers]

    same = all(run.tokens == reference[0].tokens for run in [*reference, *swarm_runs])
    block_mib = Footprint.of(model, dtype).weights / 2**20
    results = {
        "machine": machine_info(), "device": hardware(target), "dtype": dtype, "new_tokens": new_tokens,
        "tokens_equal": same, "reference_tokens": reference[0].tokens, "swarm_tokens": swarm_runs[0].tokens,
        "transformers": {"ttft_s": median(r.ttft_s for r in reference),
                         "decode_tok_s": median(r.decode_tokens_per_s for r in reference)},
        "swarm": {"ttft_s": median(r.ttft_s for r in swarm_runs),
                  "decode_tok_s": median(r.decode_tokens_per_s for r in swarm_runs)},
        "peer_start_s": starts, "peer_memory_mib": memory,
        "memory_per_block_mib": [m / (end - start) for m, (start, end) in zip(memory, SPLITS)],
        "weights_per_block_mib": block_mib,
    }
    ratio = results["swarm"]["decode_tok_s"] / results["transformers"]["decode_tok_s"]
    console.print(table(f"{model.name}, {dtype}, {hardware(target)}", ["", "TTFT s", "decode tok/s", "× transformers"], [
        ["transformers, one process", results["transformers"]["ttft_s"], results["transformers"]["decode_tok_s"], 1],
        ["three peers", results["swarm"]["ttft_s"], results["swarm"]["decode_tok_s"], ratio],
    ]))
    console.print(f"tokens equal to transformers': {'yes' if same else 'NO'}; peer start "
                  f"{', '.join(f'{s:.1f}' for s in starts)} s; memory per block "
                  f"{', '.join(f'{m:.0f}' for m in results['memory_per_block_mib'])} MiB "
                  f"(weights {block_mib:.1f} MiB, the rest is the runtime and the KV cache)")
    console.print(f"results: {write_results('gpu_check', results)}")
    if not same:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
