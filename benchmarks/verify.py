"""Caught liars: how far honest peers' outputs differ (the tolerance), what `spot` and `strict` cost, and
how long a liar lasts in `spot`.

    python -m benchmarks.verify                        # all three, ~8 min
    python -m benchmarks.verify --no-cost              # the honest disagreements only, ~1 min

Disagreement: in this process, each span of the default model runs 1024 tokens of
benchmarks/texts/genesis-1-4-kjv.txt in float32 and in another precision from the same float32
input; per position, |a - b| / |b| as client/verification.py measures it. Pairs are "fine" (float32,
float16, a float16 KV cache) or "coarse" (bfloat16, or quantized weights on both sides at different
precisions), and the share of positions over each class's tolerance is the false-alarm rate.

Cost: four local peers (two of blocks 0:15, two of 15:30, float32), one session of 32 greedy tokens
at a time, `verify` off, spot and strict in turn, `--runs` times; decode tok/s after the first token.

Detection: the same four peers and a lying one (tests/lying_peer.py: announces itself fastest, adds
noise of half an output's size from position 16 on); `--detections` generations of 64 tokens in
`spot` with the default share, each from a new client (bans last a client's lifetime): how many
lying steps passed before the liar was caught.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
import typer

from benchmarks.common import console, machine_info, median, table, write_results
from benchmarks.speed import timed_generate
from client.agreement import COARSE, TOLERANCE, disagreement
from client.settings import ClientSettings
from swarm.client_parts import ClientParts
from swarm.reference import resolve_model
from swarm.span import Span

TEXT = Path(__file__).parent / "texts" / "genesis-1-4-kjv.txt"
SPANS = [(0, 10), (10, 20), (20, 30), (0, 15), (15, 30)]
# (class, quant, dtype, cache dtype) against the same quant in float32
PAIRS = [("fine", "none", "float16", None), ("fine", "none", "float32", "float16"),
         ("coarse", "none", "bfloat16", None), ("coarse", "int8", "float16", None), ("coarse", "int4", "float16", None),
         ("coarse", "int4", "bfloat16", None)]
NEW_TOKENS = 32
app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0])


@torch.inference_mode()
def honest_disagreements(positions: int) -> list[dict[str, Any]]:
    model = resolve_model("smollm2-135m")
    ids = model.tokenizer()(TEXT.read_text(), return_tensors="pt").input_ids[:, :positions]
    inputs = {0: ClientParts(model).embed(ids)}
    rows = []
    for start, end in SPANS:
        references: dict[str, torch.Tensor] = {}
        for kind, quant, dtype, cache_dtype in PAIRS:
            if quant not in references:
                references[quant] = Span(model, start, end, "float32", quant=quant).forward(inputs[start])
            inputs.setdefault(end, references["none"])
            other = Span(model, start, end, dtype, quant=quant, cache_dtype=cache_dtype).forward(inputs[start])
            per_position = torch.tensor([disagreement(other[:, i], references[quant][:, i], None)
                                         for i in range(other.shape[1])])
            tolerance = TOLERANCE * (COARSE if kind == "coarse" else 1)
            rows.append({"span": f"{start}:{end}", "class": kind, "case": f"{quant}/{dtype}" + (f", cache {cache_dtype}" if cache_dtype else ""),
                         "max": round(per_position.max().item(), 4), "p99": round(per_position.quantile(0.99).item(), 4),
                         "median": round(per_position.median().item(), 5), "tolerance": tolerance,
                         "over_tolerance": int((per_position > tolerance).sum()), "positions": per_position.numel()})
            console.print(rows[-1])
    return rows


def swarm_runs(runs: int, detections: int) -> tuple[dict[str, list[float]], list[int | None]]:
    from swarm.local_swarm import LocalSwarm

    with LocalSwarm(Path(tempfile.mkdtemp(prefix="verify-")), ["--dtype", "float32"]) as local:
        for blocks in ("0:15", "15:30", "0:15", "15:30"):
            local.add(["--blocks", blocks])
        speeds = decode_costs(local.initial_peers, runs)
        if not detections:
            return speeds, []
        local.add(["--blocks", "15:30"], name="liar", module="tests.lying_peer", env={"LIE_FROM": str(LIE_FROM)})
        return speeds, lying_steps_passed(local.initial_peers, local.peers[-1].peer_id, detections)


LIE_FROM = 16


def lying_steps_passed(initial_peers: list[str], liar: str, generations: int) -> list[int | None]:
    """Per generation through the liar, the lying steps before it was caught; None if it never was."""
    from client import DistributedModelForCausalLM

    passed: list[int | None] = []
    for _ in range(generations):
        model = DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=initial_peers)
        ids = model.resolved.tokenizer()("The history of the printing press begins", return_tensors="pt").input_ids
        first_lie = LIE_FROM - ids.shape[1] + 1  # step 0 is the prompt; step k sends position prompt + k - 1
        try:
            with model.session(ids.shape[1] + 64) as session:
                model.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=None, session=session)
        finally:
            model.close()
        caught = [step for peer, step in session.caught if peer == liar]
        served = sum(1 for t in session.timings[first_lie:] if liar in {h.peer_id for h in t.hops})
        if not served and not caught:
            console.print("the liar was not on the route: not counted")
            continue
        passed.append(caught[0] - first_lie if caught else None)
        console.print(f"liar caught after {passed[-1]} lying steps" if caught else
                      f"liar not caught in {served} lying steps")
    return passed


def decode_costs(initial_peers: list[str], runs: int) -> dict[str, list[float]]:
    from client import DistributedModelForCausalLM

    speeds: dict[str, list[float]] = {"off": [], "spot": [], "strict": []}
    models = {mode: DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=initial_peers,
                                                            verify=mode) for mode in speeds}
    ids = models["off"].resolved.tokenizer()("The history of the printing press begins", return_tensors="pt").input_ids
    try:
        expected = None
        for _ in range(runs):
            for mode, model in models.items():
                generation = timed_generate(model.generate, ids, NEW_TOKENS - 1)[0]
                speeds[mode].append(round(generation.decode_tokens_per_s, 2))
                expected = generation.tokens if expected is None else expected
                if generation.tokens != expected:
                    raise SystemExit(f"verify={mode} changed the tokens: the benchmark is void")
                console.print(f"verify={mode}: {speeds[mode][-1]} tok/s")
    finally:
        for model in models.values():
            model.close()
    return speeds


@app.command()
def main(
    positions: int = typer.Option(1024, min=16, help="Tokens of the text run through each span."),
    cost: bool = typer.Option(True, help="Also measure decode speed with verify off, spot and strict."),
    runs: int = typer.Option(3, min=1, help="Generations per mode for the cost."),
    detections: int = typer.Option(10, min=0, help="Generations through a lying peer, to count the steps it passes."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Result file (default: benchmarks/results/)."),
) -> None:
    rows = honest_disagreements(positions)
    console.print(table("Honest disagreement against float32 (same quantization)",
                        ["span", "class", "case", "max", "p99", "median", "tolerance", "over"],
                        [[r["span"], r["class"], r["case"], r["max"], r["p99"], r["median"], r["tolerance"],
                          f"{r['over_tolerance']}/{r['positions']}"] for r in rows]))
    report: dict[str, Any] = {"machine": machine_info(), "disagreements": rows}
    if cost:
        speeds, passed = swarm_runs(runs, detections)
        base = median(speeds["off"])
        report["decode_tok_s"] = speeds
        console.print(table("Decode, one session, 4 peers (2 per span)", ["verify", "tok/s (runs)", "median", "x off"],
                            [[mode, ", ".join(map(str, s)), median(s), round(median(s) / base, 3)]
                             for mode, s in speeds.items()]))
        if passed:
            report["lying_steps_passed"] = passed
            caught = sorted(p for p in passed if p is not None)
            console.print(f"spot, share {ClientSettings.model_fields['verify_share'].default}: liar caught in "
                          f"{len(caught)}/{len(passed)} generations, after {caught} lying steps")
    out = write_results("verify", report, json_path)
    console.print(f"results: {out}")


if __name__ == "__main__":
    app()
