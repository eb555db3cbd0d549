"""The client against real peer processes: tokens identical to transformers on the same weights."""
from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import DistributedModelForCausalLM, SwarmClient
from peer.launcher import LocalSwarm
from swarm.errors import RouteError
from swarm.reference import resolve_model

MODEL = resolve_model("smollm2-135m")
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived",
]
SPLITS = {
    "three peers": [["--blocks", "0:10"], ["--blocks", "10:20"], ["--blocks", "20:30"]],
    "one peer": [["--blocks", "0:30"]],
    "overlapping": [["--blocks", "0:20"], ["--blocks", "10:30"]],
}


class Reference:
    """transformers on the same weights; generations are remembered, every swarm split compares to the same."""

    def __init__(self):
        path = MODEL.gguf_file
        self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        self._generated: dict[tuple, list] = {}

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **settings) -> torch.Tensor:
        key = (str(input_ids.tolist()), str(None if attention_mask is None else attention_mask.tolist()), str(sorted(settings.items())))
        if key not in self._generated or settings.get("do_sample"):
            self._generated[key] = self.model.generate(input_ids, attention_mask=attention_mask, **settings).tolist()
        return torch.tensor(self._generated[key])

    def __call__(self, input_ids: torch.Tensor):
        return self.model(input_ids)


@pytest.fixture(scope="module")
def reference():
    return Reference()


@pytest.fixture(scope="module")
def tokenizer():
    tok = MODEL.tokenizer()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="module", params=list(SPLITS))
def swarm_model(request, tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("swarm"), ["--announce-period", "5"]) as local:
        for args in SPLITS[request.param]:
            local.add(args)
        model = DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=local.initial_peers)
        yield model
        model.close()


def test_greedy_matches_transformers(swarm_model, reference, tokenizer):
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        ours = swarm_model.generate(ids, max_new_tokens=32, do_sample=False)
        theirs = reference.generate(ids, max_new_tokens=32, do_sample=False)
        assert ours.tolist() == theirs.tolist(), prompt

    batch = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    pad = tokenizer.pad_token_id
    ours = swarm_model.generate(batch.input_ids, batch.attention_mask, max_new_tokens=32, do_sample=False, pad_token_id=pad)
    theirs = reference.generate(batch.input_ids, batch.attention_mask, max_new_tokens=32, do_sample=False, pad_token_id=pad)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("swarm_model", ["three peers"], indirect=True)  # token parity above covers every split
def test_sampling_with_seed_matches_transformers(swarm_model, reference, tokenizer):
    ids = tokenizer(PROMPTS[2], return_tensors="pt").input_ids
    settings = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.1, max_new_tokens=24)
    torch.manual_seed(1234)
    ours = swarm_model.generate(ids, **settings)
    torch.manual_seed(1234)
    theirs = reference.generate(ids, **settings)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("swarm_model", ["three peers"], indirect=True)  # token parity above covers every split
def test_session_continues_without_resending(swarm_model, reference, tokenizer):
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with swarm_model.inference_session(max_length=64) as session:
        first = swarm_model.generate(ids, max_new_tokens=6, do_sample=False)
        assert session.position == ids.shape[1] + 5  # the last token is not sent until the next turn
        turn = tokenizer(" And Germany's is", return_tensors="pt").input_ids
        second = swarm_model.generate(torch.cat([first, turn], dim=1), max_new_tokens=6, do_sample=False, session=session)
        assert session.position == second.shape[1] - 1
        routes = session.route
    theirs = reference.generate(torch.cat([first, turn], dim=1), max_new_tokens=6, do_sample=False)
    assert second.tolist() == theirs.tolist()
    assert routes[0].start == 0 and routes[-1].end == 30
    assert all(a.end == b.start for a, b in zip(routes, routes[1:]))


@pytest.mark.parametrize("swarm_model", ["three peers"], indirect=True)  # token parity above covers every split
def test_forward_logits(swarm_model, reference, tokenizer):
    ids = tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(swarm_model(ids), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("swarm_model", ["three peers"], indirect=True)  # token parity above covers every split
def test_text_api(swarm_model, tmp_path_factory):
    client = SwarmClient.__new__(SwarmClient)  # share the fixture's connection instead of joining again
    client.model, client.tokenizer = swarm_model, swarm_model.model.tokenizer()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = client.generate(messages=messages, max_new_tokens=20)
    pieces = list(client.generate(messages=messages, max_new_tokens=20, stream=True))
    assert len(pieces) > 3 and "".join(pieces) == text
    assert "Paris" in text
    stopped = client.generate("The capital of France is", max_new_tokens=20, stop=["."])
    assert "." not in stopped and len(stopped) > 0


def test_uncovered_blocks_fail_fast(tmp_path):
    with LocalSwarm(tmp_path, ["--announce-period", "5"]) as local:
        local.add(["--blocks", "0:20"])
        model = DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=local.initial_peers)
        try:
            started = time.monotonic()
            with pytest.raises(RouteError, match=r"blocks 20-29 are served by nobody; the swarm has 0:20"):
                model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)
            assert time.monotonic() - started < 10
        finally:
            model.close()
