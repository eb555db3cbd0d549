"""A client on a host of the network rig: greedy tokens of one prompt through the swarm.

Run inside a namespace by tests/test_networks.py. Prints `token N [route's peers]` as each arrives (a test may act
between tokens), then one JSON line: the tokens, the peers of the route that finished, and how many
hops got their input by push from the hop before.
"""
from __future__ import annotations

import json
import time

import torch
import typer

from client import DistributedModelForCausalLM
from client.streaming import Generation


def main(model: str, initial_peers: list[str], ids: str = typer.Option(..., help="prompt token ids, comma-separated"),
         new: int = 8, pause: float = typer.Option(0.0, help="seconds between tokens, to keep a session open long")) -> None:
    prompt = torch.tensor([[int(i) for i in ids.split(",")]])
    swarm = DistributedModelForCausalLM.from_pretrained(model, initial_peers=initial_peers)
    tokens: list[int] = []
    try:
        with swarm.inference_session(max_length=prompt.shape[1] + new) as session:
            for i, token in enumerate(Generation(swarm, prompt, session=session, max_new_tokens=new, eos_token_id=None)):
                tokens.append(token)
                print(f"token {i} " + json.dumps([hop.peer_id for hop in session.route]), flush=True)
                time.sleep(pause)
            route = [hop.peer_id for hop in session.route]
            pushed = sum(hop.by_push for step in session.timings for hop in step.hops)
    finally:
        swarm.close()
    print(json.dumps({"tokens": prompt[0].tolist() + tokens, "route": route, "pushed": pushed}), flush=True)


if __name__ == "__main__":
    typer.run(main)
