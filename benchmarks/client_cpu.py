"""The client's CPU per decoded token: what the decoding loop and the client's event loop cost, machine noise aside.

    python -m benchmarks.client_cpu --sessions 1,8 --repeats 2

Throughput on a 2-core machine swings with its phases; the CPU seconds the client process spends per
token do not, so two versions of the client compare by this figure. Three local peers, greedy,
33 tokens per session, EOS off.
"""
from __future__ import annotations

import resource
import tempfile
import threading
import time
from pathlib import Path

import torch
import typer

from benchmarks.common import console, parse_list
from client import DistributedModelForCausalLM
from swarm.local_swarm import LocalSwarm

NEW_TOKENS = 33


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(sessions: str = typer.Option("1,8", help="Concurrent sessions, comma-separated."),
         repeats: int = typer.Option(2, min=1, help="Measurements per session count.")) -> None:
    with LocalSwarm(Path(tempfile.mkdtemp()), ["--max-batch-rows", "4"]) as local:
        for blocks in ("0:10", "10:20", "20:30"):
            local.add(["--blocks", blocks])
        model = DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=local.initial_peers,
                                                            dtype="float32")
        ids = model.resolved.tokenizer()("The history of the printing press begins", return_tensors="pt").input_ids
        options = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
        model.generate(ids, max_new_tokens=4)  # routes and connections
        try:
            for count in parse_list(sessions):
                for _ in range(repeats):
                    cpu, started = _cpu_seconds(), time.perf_counter()
                    threads = [threading.Thread(target=model.generate, args=(ids,), kwargs=options) for _ in range(count)]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
                    tokens = count * NEW_TOKENS
                    console.print(f"{count} sessions: client CPU {1000 * (_cpu_seconds() - cpu) / tokens:.2f} ms/token, "
                                  f"{tokens / (time.perf_counter() - started):.1f} tok/s")
        finally:
            model.close()


if __name__ == "__main__":
    typer.run(main)
