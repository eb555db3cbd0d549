"""A peer that lies, for tests only: swarm-serve whose outputs are wrong from a position on.

    python -m tests.lying_peer SWARM-SERVE-FLAGS      # LIE_FROM=N (positions), LIE_SIZE=0.5 (relative)

From position LIE_FROM of every session it adds noise of LIE_SIZE times each output's size, and it
announces a throughput far above any honest peer's (and hides its real speed), so that routes choose it.
"""
from __future__ import annotations

import os

import torch

import peer.server
from peer.announcer import Announcer
from peer.cli import app
from peer.load import PeerLoad
from swarm.span import Span

LIE_FROM = int(os.environ.get("LIE_FROM", "0"))
LIE_SIZE = float(os.environ.get("LIE_SIZE", "0.5"))
honest_forward_batch = Span.forward_batch


def lying_forward_batch(self: Span, steps: list) -> list[torch.Tensor]:
    starts = [cache.length for _, cache, _ in steps]
    outputs = honest_forward_batch(self, steps)
    lied = []
    for output, start in zip(outputs, starts):
        lies = torch.arange(start, start + output.shape[1]) >= LIE_FROM  # positions of this step
        noise = torch.randn(output.shape, generator=torch.Generator().manual_seed(start)) * output.norm(dim=-1, keepdim=True)
        lied.append(output + lies[None, :, None] * noise * LIE_SIZE / output.shape[-1] ** 0.5)
    return lied


Span.forward_batch = lying_forward_batch  # type: ignore[method-assign]
peer.server.measure_throughput = lambda span: 1e6  # type: ignore[attr-defined]
Announcer._follow_drift = lambda self: None  # type: ignore[method-assign]  # it never owns up to its speed,
PeerLoad.step_seconds = lambda self: None  # type: ignore[method-assign]  # nor to its recent passes

if __name__ == "__main__":
    app()
