"""Churn soak: peers stop, die and come back at random while clients generate without pause.

    python -m benchmarks.churn --minutes 20                 # the figures in docs/performance.md
    python -m benchmarks.churn --minutes 1 --json out.json  # a short run (~2 min)

A fixed peer serves the whole model (it is also everyone's entry to the DHT); two replicas of each
half of the blocks churn: every few seconds one of them gets SIGTERM or SIGKILL, or a stopped one
restarts. Client threads generate greedy continuations of a few prompts the whole time. Every
generation must either equal transformers' tokens on the same weights, or fail with an error that
names blocks which really had no live peer at some moment of that generation; the report counts
generations, faults by kind, identical, mismatched, and failures justified or not (with the errors).
When the fixed peer covers everything, failures are expected only if it is churned too (it is not),
so `--no-fixed-peer` makes gaps, and justified failures, happen.
"""
from __future__ import annotations

import json
import random
import re
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import typer

from benchmarks.common import console, machine_info, write_results

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "The three laws of motion"]
NEW_TOKENS = 16
CHURNED = ["0:15", "0:15", "15:30", "15:30"]
GAP = re.compile(r"blocks ([\d, -]+) are served by nobody")
app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0])


@dataclass
class Coverage:
    """Which spans had a live peer when: a peer counts from its `ready` line until it is signalled."""

    live: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> span
    history: list[tuple[float, frozenset[int]]] = field(default_factory=list)  # (time, blocks nobody served)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set(self, name: str, span: tuple[int, int] | None, num_blocks: int = 30) -> None:
        with self.lock:
            if span is None:
                self.live.pop(name, None)
            else:
                self.live[name] = span
            covered = {b for start, end in self.live.values() for b in range(start, end)}
            self.history.append((time.monotonic(), frozenset(set(range(num_blocks)) - covered)))

    def uncovered_between(self, since: float, until: float) -> set[int]:
        """Blocks that had no live peer at some moment of [since, until]."""
        with self.lock:
            before = [gaps for at, gaps in self.history if at <= since][-1:]
            during = [gaps for at, gaps in self.history if since < at <= until]
        return set().union(*before, *during)


def _blocks_named(message: str) -> set[int]:
    match = GAP.search(message)
    if not match:
        return set()
    blocks: set[int] = set()
    for part in match[1].split(","):
        first, _, last = part.strip().partition("-")
        blocks.update(range(int(first), int(last or first) + 1))
    return blocks


@app.command()
def main(
    minutes: float = typer.Option(20.0, min=0.1, help="How long the clients generate."),
    clients: int = typer.Option(2, min=1, help="Client threads, each with its own client object."),
    fault_every: float = typer.Option(8.0, min=1.0, help="Mean seconds between faults."),
    fixed_peer: bool = typer.Option(True, help="Keep a peer serving every block that is never churned."),
    seed: int = typer.Option(0, help="Seed of the fault schedule."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Result file (default: benchmarks/results/)."),
) -> None:
    from transformers import AutoModelForCausalLM

    from client import DistributedModelForCausalLM
    from swarm.local_swarm import LocalSwarm, PeerProcess, start_peer
    from swarm.reference import resolve_model

    model = resolve_model("smollm2-135m")
    tokenizer = model.tokenizer()
    prompts = [tokenizer(p, return_tensors="pt").input_ids for p in PROMPTS]
    with console.status("reference tokens (transformers, float32)"):
        reference = AutoModelForCausalLM.from_pretrained(model.gguf_file.parent, gguf_file=model.gguf_file.name,
                                                         dtype=torch.float32).eval()
        expected = [reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                       do_sample=False)[0, ids.shape[1]:].tolist() for ids in prompts]
        del reference
    rng = random.Random(seed)
    coverage = Coverage()
    counts = {"generations": 0, "identical": 0, "mismatched": 0, "failed_justified": 0, "failed_unjustified": 0,
              "SIGTERM": 0, "SIGKILL": 0, "restart": 0}
    unjustified: list[str] = []
    counted = threading.Lock()

    def count(key: str, note: str | None = None) -> None:
        with counted:
            counts[key] += 1
            if note is not None:
                unjustified.append(note)
    logs = Path(tempfile.mkdtemp(prefix="churn-"))
    common = ["--dtype", "float32", "--announce-period", "5"]
    with LocalSwarm(logs, common) as swarm:
        names = [f"churn{index}" for index in range(len(CHURNED))]
        first = swarm.add_together([["--blocks", "0:30" if fixed_peer else "0:1"], *(["--blocks", b] for b in CHURNED)],
                                   ["entry", *names])
        coverage.set("entry", (0, 30) if fixed_peer else (0, 1))
        churned: dict[str, PeerProcess | None] = {}
        join = [a for m in swarm.initial_peers for a in ("--initial-peers", m)]

        def serving(name: str, peer: PeerProcess, blocks: str) -> None:
            churned[name] = peer
            start_block, end_block = map(int, blocks.split(":"))
            coverage.set(name, (start_block, end_block))

        def start(name: str, blocks: str) -> None:
            serving(name, start_peer([*join, *common, "--blocks", blocks], logs, f"{name}-{time.monotonic():.0f}"), blocks)

        for name, peer, blocks in zip(names, first[1:], CHURNED):
            serving(name, peer, blocks)
        stop_at = time.monotonic() + minutes * 60

        def generate_forever(client_index: int) -> None:
            model_client = DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=swarm.initial_peers)
            turn = 0
            try:
                while time.monotonic() < stop_at:
                    which = (client_index + turn) % len(prompts)
                    turn += 1
                    began = time.monotonic()
                    try:
                        out = model_client.generate(prompts[which], max_new_tokens=NEW_TOKENS)
                    except Exception as e:
                        named = _blocks_named(str(e))
                        justified = bool(named) and bool(named & coverage.uncovered_between(began, time.monotonic()))
                        count("failed_justified" if justified else "failed_unjustified",
                              None if justified else f"{type(e).__name__}: {e}")
                    else:
                        same = out[0, prompts[which].shape[1]:].tolist() == expected[which]
                        count("identical" if same else "mismatched")
                    count("generations")
            finally:
                model_client.close()

        threads = [threading.Thread(target=generate_forever, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        try:
            while time.monotonic() < stop_at:
                time.sleep(rng.expovariate(1 / fault_every))
                if time.monotonic() >= stop_at:
                    break
                name = rng.choice(sorted(churned))
                peer = churned[name]
                if peer is None:
                    start(name, CHURNED[int(name.removeprefix("churn"))])
                    count("restart")
                    continue
                kind = rng.choice(["SIGTERM", "SIGKILL"])
                coverage.set(name, None)
                peer.signal(signal.SIGTERM if kind == "SIGTERM" else signal.SIGKILL)
                count(kind)
                churned[name] = None
                threading.Thread(target=peer.stop, daemon=True).start()  # reaps it; SIGKILLs a SIGTERM that hangs
            for thread in threads:
                thread.join(120)
        finally:
            for peer in churned.values():
                if peer is not None:
                    peer.stop()
    report = {"machine": machine_info(), "minutes": minutes, "clients": clients, "fixed_peer": fixed_peer,
              "counts": counts, "unjustified_failures": unjustified[:20], "peer_logs": str(logs)}
    console.print(json.dumps(counts))
    for line in unjustified[:20]:
        console.print(f"unjustified: {line}")
    out = write_results("churn", report, json_path)
    console.print(f"results: {out}")


if __name__ == "__main__":
    app()
