"""The verifier's bookkeeping without a swarm (client/verification.py); with real peers: tests/test_trust.py."""
from __future__ import annotations

import asyncio

import torch

from client.agreement import COARSE, TOLERANCE, disagreement, tolerance
from client.hop_stream import StepInput, merged
from client.route import Bans, Hop
from client.settings import ClientSettings
from client.verification import Shadow, Verifier
from swarm.records import BlockAnnouncement, PeerState


class CountingStream:
    """Stands for a shadow session's stream: counts the steps it is sent."""

    def __init__(self) -> None:
        self.hop, self.steps = Hop("second", 0, 2), 0

    async def step(self, hidden, mask, timeout, probe=None, reorder=None):
        self.steps += 1
        return hidden * 2, False

    async def replay(self, inputs, timeout, probe):
        self.steps += len(inputs)
        return inputs

    def close(self) -> None:
        pass


def verifier() -> Verifier:
    return Verifier(None, ClientSettings(initial_peers=["x"], verify="strict"), Bans(1, 1), 16, None)  # type: ignore[arg-type]


def test_a_shadow_asked_again_for_a_step_it_computed_answers_without_recomputing():
    """After a liar's route is rebuilt, the new hop's output of the same step is checked against the shadow,
    which already has that step in its cache: sending it again would shift its positions."""
    check, stream = verifier(), CountingStream()
    inputs = [StepInput(torch.ones(1, 3, 4), None, None), StepInput(torch.ones(1, 1, 4), None, None)]
    check.shadows[(0, 2)] = Shadow(stream, 2, torch.full((1, 1, 4), 7.0))  # type: ignore[arg-type]
    again = asyncio.run(check._recompute(Hop("rebuilt", 0, 2), inputs, {"rebuilt"}, 1, keep=True))
    assert again is not None and stream.steps == 0 and torch.equal(again.output, torch.full((1, 1, 4), 7.0))
    inputs.append(StepInput(torch.ones(1, 1, 4), None, None))  # the next step: computed once
    after = asyncio.run(check._recompute(Hop("rebuilt", 0, 2), inputs, {"rebuilt"}, 1, keep=True))
    assert after is not None and stream.steps == 1 and check.shadows[(0, 2)].fed == 3


def test_merged_steps_join_until_a_reorder():
    steps = [StepInput(torch.ones(2, 3, 4), None, None), StepInput(torch.ones(2, 1, 4), None, None),
             StepInput(torch.ones(2, 1, 4), None, [1, 0]), StepInput(torch.ones(2, 1, 4), torch.ones(2, 1), None)]
    joined = merged(steps)
    assert [s.hidden.shape[1] for s in joined] == [4, 2] and [s.reorder for s in joined] == [None, [1, 0]]
    assert joined[0].mask is None and joined[1].mask is not None and joined[1].mask.shape == (2, 2)


def test_tolerance_widens_for_bfloat16_and_quantized_peers():
    def record(dtype="float32", quant="none", cache_dtype=None) -> BlockAnnouncement:
        return BlockAnnouncement(state=PeerState.online, start=0, end=2, throughput=1.0, cache_tokens_left=1,
                                 version="0.2.0", dtype=dtype, quant=quant, cache_dtype=cache_dtype)
    assert tolerance([record(), record("float16")]) == TOLERANCE
    for coarse in (record("bfloat16"), record(quant="int4"), record(cache_dtype="bfloat16"), None):
        assert tolerance([record(), coarse]) == TOLERANCE * COARSE
    a = torch.ones(1, 2, 4)
    assert disagreement(a * 1.01, a) < TOLERANCE < disagreement(a * 1.05, a)
    assert disagreement(torch.stack([a[0, 0], a[0, 1] * 9])[None], a, mask=torch.tensor([[1, 0]])) < 1e-6
