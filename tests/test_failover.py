"""Peers failing mid-generation: the text must be exactly what it would have been. Every span has two peers."""
from __future__ import annotations

import signal
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from client import DistributedModelForCausalLM, loop
from swarm.local_swarm import LocalSwarm
from swarm.errors import RouteError
from swarm.reference import resolve_model

pytestmark = pytest.mark.slow  # starts peer processes

MODEL = resolve_model("smollm2-135m")
SPANS = ["0:15", "15:30"]
PROMPT = "The history of the printing press begins"
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def reference():
    path = MODEL.gguf_file
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def expected(reference):
    ids = MODEL.tokenizer()(PROMPT, return_tensors="pt").input_ids
    return ids, reference.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("failover"), ["--announce-period", "3"]) as local:
        local.add(["--blocks", "0:30"], "anchor")  # the DHT entry point; banned below so routes avoid it
        local.spans = {}
        yield local


@pytest.fixture(scope="module")
def model(swarm):
    model = DistributedModelForCausalLM.from_pretrained(
        "smollm2-135m", initial_peers=swarm.initial_peers, step_timeout=4, connect_timeout=4, route_timeout=6
    )
    yield model
    model.close()


def two_per_span(swarm: LocalSwarm, model: DistributedModelForCausalLM) -> dict[str, list]:
    """Restart what earlier tests killed, so every span has two live peers again; ban the anchor."""
    alive = {span: [p for p in swarm.spans.get(span, []) if p.process.poll() is None] for span in SPANS}
    missing = [span for span in SPANS for _ in range(2 - len(alive[span]))]
    names = [f"{span.replace(':', '-')}-{len(swarm.peers) + i}" for i, span in enumerate(missing)]
    for span, peer in zip(missing, swarm.add_together([["--blocks", span] for span in missing], names)):
        alive[span].append(peer)
    swarm.spans = alive
    model.bans.until.clear()
    model.bans.until[swarm.peers[0].peer_id] = float("inf")
    time.sleep(3.5)  # one announce period: the view sees the new peers
    return swarm.spans


def generate_with_failures(model, ids, failures: dict[int, callable]) -> list:
    """Greedy generation that calls failures[k](session) right after the k-th new token."""

    class Trigger:
        count = -1

        def put(self, tokens):
            self.count += 1
            if self.count in failures:
                failures[self.count](session)

        def end(self):
            pass

    with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
        return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=Trigger()).tolist()


def process_of(swarm: LocalSwarm, peer_id: str):
    return next(p for p in swarm.peers if p.peer_id == peer_id)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM], ids=["kill", "hang", "term"])
def test_peer_in_use_fails_mid_generation(swarm, model, expected, sig):
    two_per_span(swarm, model)
    ids, want = expected
    killed = []

    def fail(session):
        peer = process_of(swarm, session.route[0].peer_id)
        killed.append(peer)
        peer.signal(sig)

    try:
        assert generate_with_failures(model, ids, {16: fail}) == want
    finally:
        for peer in killed:
            peer.signal(signal.SIGKILL)
            peer.process.wait(10)
    assert killed


def test_two_failures_on_different_spans(swarm, model, expected):
    two_per_span(swarm, model)
    ids, want = expected
    victims = []

    def fail_hop(index):
        def fail(session):
            peer = process_of(swarm, session.route[index].peer_id)
            victims.append(peer)
            peer.signal(signal.SIGKILL)
        return fail

    assert generate_with_failures(model, ids, {10: fail_hop(0), 30: fail_hop(-1)}) == want
    assert len({v.peer_id for v in victims}) == 2


class AtStep(LogitsProcessor):
    """Calls act() when generate asks for the scores of its k-th step (beam search takes no streamer)."""

    def __init__(self, k: int, act):
        self.k, self.act, self.calls = k, act, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.k:
            self.act()
        return scores


def test_peer_killed_mid_beam_search(swarm, model, expected, reference):
    """The replacement peer gets the reorders with the inputs: its cache holds each beam's own history."""
    two_per_span(swarm, model)
    ids, _ = expected
    settings = dict(max_new_tokens=16, num_beams=3, do_sample=False)
    killed = []
    with model.inference_session(max_length=ids.shape[1] + 16) as session:
        def kill():
            killed.append(process_of(swarm, session.route[-1].peer_id))
            killed[-1].signal(signal.SIGKILL)

        ours = model.generate(ids, logits_processor=LogitsProcessorList([AtStep(8, kill)]), **settings)
        assert any(sent.reorder is not None for sent in session.history[15][:8])  # replayed to the new peer
    assert ours.tolist() == reference.generate(ids, **settings).tolist()
    assert killed and killed[0].peer_id not in {hop.peer_id for hop in session.route}


def test_peer_killed_while_session_idle(swarm, model, expected):
    two_per_span(swarm, model)
    ids, want = expected
    with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
        first = model.generate(ids, max_new_tokens=20, do_sample=False)
        victim = process_of(swarm, session.route[-1].peer_id)
        victim.signal(signal.SIGKILL)
        victim.process.wait(10)
        time.sleep(1)
        rest = model.generate(first, max_new_tokens=NEW_TOKENS - 20, do_sample=False)
    assert rest.tolist() == want


def test_a_peer_silent_while_first_measured_is_measured_again_while_the_route_waits(swarm, expected):
    """A peer that missed its ping (a busy moment, a relay still opening) is not written off for the rtt's whole
    lifetime: the route waiting for its blocks asks it again, well within the route timeout."""
    model = DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=swarm.initial_peers, route_timeout=6)
    ids, want = expected
    try:
        silent, other = two_per_span(swarm, model)["0:15"]
        model.bans.until[other.peer_id] = float("inf")  # the silent peer is the only one left for blocks 0-14
        loop.run(model.view.ensure_fresh())
        silent.signal(signal.SIGSTOP)
        try:
            assert loop.run(model.view.rtts([silent.peer_id])) == {silent.peer_id: float("inf")}
        finally:
            silent.signal(signal.SIGCONT)
        assert model.generate(ids, max_new_tokens=8, do_sample=False).tolist()[0] == want[0][:ids.shape[1] + 8]
    finally:
        model.close()


def test_last_peer_for_a_block_dies(swarm, model, expected):
    spans = two_per_span(swarm, model)
    ids, _ = expected
    for peer in spans["15:30"]:
        peer.signal(signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(RouteError, match=r"blocks 15-29"):
        model.generate(ids, max_new_tokens=8, do_sample=False)
    # step timeout (4 s) for the dead peer plus the route timeout (6 s), with some slack for a busy machine
    assert time.monotonic() - started < 20
