"""How much a failing peer delays a generation: SIGKILL (gone), SIGSTOP (hung) and SIGTERM (leaving).

Run: python -m benchmarks.failover_delay [--runs 3] [--step-timeout 5]
Starts real peers on 127.0.0.1 (every span served twice), generates 48 greedy tokens, fails the peer in
use after token 16, and reports the extra delay over the median decode step. Writes
benchmarks/results/failover_delay.json.
"""
from __future__ import annotations

import argparse
import json
import signal
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine_info
from client import DistributedModelForCausalLM
from swarm.local_swarm import LocalSwarm

SPANS = ["0:15", "15:30"]
NEW_TOKENS, FAIL_AT = 48, 16
PROMPT = "The history of the printing press begins"


def one_run(swarm: LocalSwarm, model, ids, sig: int | None) -> tuple[float, float, list, list]:
    """(extra seconds at the failure, median step seconds, tokens, the failed peer if any)."""
    times: list[float] = []
    victims = []

    class Clock:
        def put(self, _):
            times.append(time.perf_counter())
            if sig is not None and len(times) == FAIL_AT + 1:
                victims.append(next(p for p in swarm.peers if p.peer_id == session.route[0].peer_id))
                victims[0].signal(sig)

        def end(self):
            pass

    with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
        tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=Clock()).tolist()
    steps = [b - a for a, b in zip(times[1:], times[2:])]  # decode steps only (times[0] is the prompt)
    median = statistics.median(steps)
    return (steps[FAIL_AT - 1] - median if sig is not None else 0.0), median, tokens, victims


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--step-timeout", type=float, default=5.0)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"SIGKILL": [], "SIGSTOP": [], "SIGTERM": []}
    medians = []
    with LocalSwarm(Path(tempfile.mkdtemp(prefix="failover-bench-")), ["--announce-period", "5"]) as swarm:
        swarm.add(["--blocks", "0:30"], "anchor")
        model = DistributedModelForCausalLM.from_pretrained(
            "smollm2-135m", initial_peers=swarm.initial_peers, step_timeout=args.step_timeout)
        ids = model.resolved.tokenizer()(PROMPT, return_tensors="pt").input_ids
        try:
            for name, sig in (("SIGKILL", signal.SIGKILL), ("SIGSTOP", signal.SIGSTOP), ("SIGTERM", signal.SIGTERM)):
                for run in range(args.runs):
                    live = {s: [p for p in swarm.peers[1:] if p.process.poll() is None and p.ready_line.split("blocks ")[1].startswith(s + " ")]
                            for s in SPANS}
                    for span, peers in live.items():
                        for _ in range(2 - len(peers)):
                            swarm.add(["--blocks", span], f"{span.replace(':', '-')}-{len(swarm.peers)}")
                    model.bans.until.clear()
                    model.bans.until[swarm.peers[0].peer_id] = float("inf")  # keep routes off the anchor
                    time.sleep(6)
                    _, median, baseline, _ = one_run(swarm, model, ids, None)
                    extra, _, tokens, victims = one_run(swarm, model, ids, sig)
                    for victim in victims:
                        victim.signal(signal.SIGKILL)
                        victim.process.wait(10)
                    assert tokens == baseline, "failover changed the text"
                    results[name].append(extra)
                    medians.append(median)
                    print(f"{name} run {run + 1}: +{extra:.2f} s over a {median * 1000:.0f} ms step", flush=True)
        finally:
            model.close()
    summary = {
        "step_timeout_s": args.step_timeout,
        "median_step_ms": round(statistics.median(medians) * 1000, 1),
        **{f"{k}_extra_s": round(statistics.median(v), 2) for k, v in results.items()},
        "runs": results,
        "torch_threads": torch.get_num_threads(),
        "machine": machine_info(),
    }
    out = Path(__file__).parent / "results" / "failover_delay.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
