"""The client side of benchmarks/networks.py, run on a rig host: per prompt, time to first token, decode steps/s.

    python -m benchmarks.network_client ENTRANCE --lengths 128,2048 --new 24   # one JSON line on stdout
"""
from __future__ import annotations

import json
import time

import torch
import typer

from benchmarks.common import parse_list
from client import DistributedModelForCausalLM
from client.streaming import Generation


def prompt_ids(length: int, vocab: int) -> torch.Tensor:
    """The same pseudo-random prompt in every process: the benchmark checks tokens against transformers."""
    return torch.randint(1, vocab, (1, length), generator=torch.Generator().manual_seed(length))


def main(initial_peers: list[str], lengths: str = "128,2048", new: int = 24) -> None:
    swarm = DistributedModelForCausalLM.from_pretrained(None, initial_peers=initial_peers, dtype="float32")
    results = []
    try:
        swarm.generate(prompt_ids(8, swarm.config.vocab_size), max_new_tokens=2, eos_token_id=None)  # routes, pings
        for length in parse_list(lengths):
            ids = prompt_ids(length, swarm.config.vocab_size)
            started = time.perf_counter()
            arrivals, tokens = [], []
            for token in Generation(swarm, ids, max_new_tokens=new, eos_token_id=None):
                arrivals.append(time.perf_counter())
                tokens.append(token)
            results.append({"length": length, "ttft_s": round(arrivals[0] - started, 4),
                            "steps_per_s": round((len(arrivals) - 1) / (arrivals[-1] - arrivals[0]), 3),
                            "tokens": tokens})
    finally:
        swarm.close()
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    typer.run(main)
