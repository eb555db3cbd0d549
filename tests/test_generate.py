"""The client against real peer processes: tokens identical to transformers on the same weights."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, pipeline

from client import DistributedModelForCausalLM, SwarmClient
from swarm.local_swarm import LocalSwarm
from tests.rpc_helpers import info
from swarm.errors import RouteError
from swarm.reference import resolve_model

pytestmark = pytest.mark.slow  # starts peer processes

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
        local.add_together(SPLITS[request.param])
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
    ours = swarm_model.generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=32, do_sample=False, pad_token_id=pad)
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
    torch.testing.assert_close(swarm_model(ids).logits, expected, atol=1e-4, rtol=3e-5)  # float32 sums in other orders


@pytest.mark.parametrize("swarm_model", ["three peers"], indirect=True)  # token parity above covers every split
def test_text_api(swarm_model, tmp_path_factory):
    client = SwarmClient.__new__(SwarmClient)  # share the fixture's connection instead of joining again
    client.model, client.tokenizer = swarm_model, swarm_model.resolved.tokenizer()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = client.generate(messages=messages, max_new_tokens=20)
    pieces = list(client.generate(messages=messages, max_new_tokens=20, stream=True))
    assert len(pieces) > 3 and "".join(pieces) == text
    assert "Paris" in text
    stopped = client.generate("The capital of France is", max_new_tokens=20, stop=["."])
    assert "." not in stopped and len(stopped) > 0
    with swarm_model.inference_session(max_length=256) as session:  # text generation continues the open session
        assert "".join(client.generate(messages=messages, max_new_tokens=20, stream=True)) == text
        assert session.steps > 1 and session.route


class FirstTokens:
    """A streamer that signals once a generation has decoded a few tokens."""

    def __init__(self, count: int):
        self.seen, self.count, self.event = -1, count, threading.Event()  # the first put is the prompt

    def put(self, tokens):
        self.seen += 1
        if self.seen >= self.count:
            self.event.set()

    def end(self):
        self.event.set()


@pytest.mark.parametrize("swarm_model", ["three peers"], indirect=True)  # token parity above covers every split
def test_concurrent_sessions_get_the_tokens_each_gets_alone(swarm_model, reference, tokenizer):
    """Eight sessions at once with prompts of different lengths; the longest (two prefill chunks on each
    peer) starts while the others decode. Each must get exactly what transformers gives it alone."""
    story = " ".join(["The old lighthouse keeper climbed the stairs again, counting every step."] * 45)
    prompts = [*PROMPTS, "Hi", "1, 2, 3, 4, 5,", "The recipe needs flour, eggs and", "Question: what is 7 times 6?", story]
    ids = [tokenizer(p, return_tensors="pt").input_ids for p in prompts]
    assert ids[-1].shape[1] > 512  # longer than a peer's default pass: prefilled in chunks
    started = FirstTokens(3)
    peers = list(swarm_model.view.online_peers())
    before = {p: info(swarm_model.dht, p) for p in peers}

    def run(index: int) -> list[int]:
        if index == len(ids) - 1:
            started.event.wait(60)
        streamer = started if index == 0 else None
        return swarm_model.generate(ids[index], max_new_tokens=16, do_sample=False, streamer=streamer).tolist()

    with ThreadPoolExecutor(len(ids)) as pool:
        outputs = list(pool.map(run, range(len(ids))))
    for prompt_ids, output in zip(ids, outputs):
        assert output == reference.generate(prompt_ids, max_new_tokens=16, do_sample=False).tolist()
    after = {p: info(swarm_model.dht, p) for p in peers}
    steps = sum(after[p].steps - before[p].steps for p in peers)
    passes = sum(after[p].passes - before[p].passes for p in peers)
    assert passes < steps, "the peers never batched steps of different sessions"


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


class BanToken(LogitsProcessor):
    """A user's own processor: one token may never come."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        return scores.index_fill(1, torch.tensor([self.token]), -float("inf"))


class StopAfter(StoppingCriteria):
    """A user's own criterion: stop once the sequence reaches a length."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


@pytest.mark.parametrize("swarm_model", ["three peers"], indirect=True)  # token parity above covers every split
def test_transformers_generate_options(swarm_model, reference, tokenizer):
    """generate is transformers' own: its options give the tokens (and scores) they give on a local model."""
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    eos = reference.model.generation_config.eos_token_id
    greedy = reference.generate(ids, max_new_tokens=24, do_sample=False)
    banned = int(greedy[0, ids.shape[1] + 1])  # the second new token: banning it changes the continuation
    cases = [
        dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, eos_token_id=int(greedy[0, ids.shape[1] + 2])),
        dict(max_new_tokens=24, no_repeat_ngram_size=2, do_sample=False),
        dict(max_new_tokens=24, do_sample=False, logits_processor=LogitsProcessorList([BanToken(banned)]),
             stopping_criteria=StoppingCriteriaList([StopAfter(ids.shape[1] + 10)])),
    ]
    for settings in cases:
        ours = swarm_model.generate(ids, **settings)
        assert ours.tolist() == reference.model.generate(ids, **settings).tolist(), settings
    assert banned not in ours[0, ids.shape[1]:].tolist() and ours.shape[1] == ids.shape[1] + 10
    assert eos is not None

    settings = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_scores=True)
    ours, theirs = swarm_model.generate(ids, **settings), reference.model.generate(ids, **settings)
    assert ours.sequences.tolist() == theirs.sequences.tolist()
    assert len(ours.scores) == len(theirs.scores) == 12
    for mine, expected in zip(ours.scores, theirs.scores):
        finite = torch.isfinite(expected)
        assert torch.equal(finite, torch.isfinite(mine))
        torch.testing.assert_close(mine[finite], expected[finite], atol=1e-4, rtol=0)

    settings = dict(max_new_tokens=16, do_sample=True, top_k=20, num_return_sequences=2)
    torch.manual_seed(77)
    ours = swarm_model.generate(ids, **settings)
    torch.manual_seed(77)
    assert ours.tolist() == reference.model.generate(ids, **settings).tolist()
    assert ours.shape[0] == 2 and ours[0].tolist() != ours[1].tolist()


@pytest.mark.parametrize("swarm_model", ["three peers"], indirect=True)  # token parity above covers every split
def test_beam_search_reorders_the_peers_caches(swarm_model, reference, tokenizer):
    ids = tokenizer(PROMPTS[2], return_tensors="pt").input_ids
    settings = dict(max_new_tokens=16, num_beams=3, do_sample=False, return_dict_in_generate=True, output_scores=True)
    with swarm_model.inference_session(max_length=ids.shape[1] + 16) as session:
        ours = swarm_model.generate(ids, **settings)
        reorders = [sent.reorder for sent in session.history[0] if sent.reorder is not None]
    theirs = reference.model.generate(ids, **settings)
    assert ours.sequences.tolist() == theirs.sequences.tolist()
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores, atol=1e-4, rtol=0)
    assert session.batch_size == 3  # one cache row per beam, reordered in place: never a replay
    assert reorders and any(sorted(r) != list(range(3)) for r in reorders), "no step moved one beam's cache to another"
    assert session.steps == 16  # the prompt, then one step per token but the last


@pytest.mark.parametrize("swarm_model", ["three peers"], indirect=True)  # token parity above covers every split
def test_pipeline_and_per_call_seed(swarm_model, reference, tokenizer):
    ours = pipeline("text-generation", model=swarm_model, tokenizer=tokenizer)
    theirs = pipeline("text-generation", model=reference.model, tokenizer=tokenizer)
    settings = dict(max_new_tokens=16, do_sample=False)
    assert ours(PROMPTS[1], **settings)[0]["generated_text"] == theirs(PROMPTS[1], **settings)[0]["generated_text"]

    ids = tokenizer(PROMPTS[2], return_tensors="pt").input_ids
    with ThreadPoolExecutor(3) as pool:  # the seeded ones repeat themselves while a third samples the global RNG
        runs = [pool.submit(swarm_model.generate, ids, max_new_tokens=12, do_sample=True, **extra)
                for extra in (dict(seed=5), dict(), dict(seed=5))]
        first, _, again = (run.result().tolist() for run in runs)
    assert first == again
