"""Peers that move and peers whose speed drifts: a move fills a gap under a running generation, exactly;
a throughput that drifted is announced anew and kept for the next start."""
from __future__ import annotations

import json
import signal
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import DistributedModelForCausalLM
from peer.announcer import Announcer
from peer.reachability import Reach
from peer.cores import RECHECK_SECONDS
from peer.load import MIN_ALONE_PASSES, PeerLoad
from peer.metrics import PeerMetrics
from peer.sessions import SessionRegistry
from swarm.local_swarm import LocalSwarm
from swarm.reference import resolve_model

MODEL = resolve_model("smollm2-135m")
NEW_TOKENS = 16


@pytest.mark.slow
def test_a_peer_moving_into_a_gap_keeps_a_running_generation_exact(tmp_path):
    """The second half's only peer dies mid-generation; an idle duplicate of the first half moves there
    (rebalancing, loaded while it keeps serving) and the generation continues through it with the same tokens."""
    ids = MODEL.tokenizer()("The history of the printing press", return_tensors="pt").input_ids
    path = MODEL.gguf_file
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    want = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False).tolist()
    del reference
    with LocalSwarm(tmp_path, ["--announce-period", "2"]) as local:
        _, second = local.add_together([["--blocks", "0:15"], ["--blocks", "15:30"]], ["first-half", "second-half"])
        time.sleep(RECHECK_SECONDS + 3)  # both halves on their share of the cores, announcing its throughput
        model = DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=local.initial_peers,
                                                            route_timeout=60)
        with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
            first = model.generate(ids, max_new_tokens=4)
            mover = local.add(["--num-blocks", "15"], name="mover", env={"SWARM_REBALANCE_PERIOD": "2"})
            assert "blocks 0:15" in mover.ready_line  # an idle duplicate of the first half
            second.signal(signal.SIGKILL)
            rest = model.generate(first, max_new_tokens=NEW_TOKENS - 4)
            assert session.route[-1].peer_id == mover.peer_id
    assert rest.tolist() == want
    assert "to fill a gap" in mover.log.read_text()


def test_a_drifted_throughput_is_announced_and_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path))
    load = PeerLoad()
    announcer = Announcer(None, MODEL, SessionRegistry(100, PeerMetrics()), load, 0, 10, "float32", "none",  # type: ignore[arg-type]
                          None, None, 30.0, "throughput:test-key", Reach(relays=[], maddrs=[]))
    announcer.throughput = 1000.0  # measured on a moment when the machine was fast (or busy: the same mistake)
    for _ in range(MIN_ALONE_PASSES - 1):
        load.passed(0.02, blocks=10, rows=1)  # 500 block-steps/s
    announcer._follow_drift()
    assert announcer.throughput == 1000.0  # too few passes to judge
    load.passed(0.02, blocks=10, rows=1)
    announcer._follow_drift()
    assert announcer.throughput == pytest.approx(500)
    assert json.loads((tmp_path / "throughput.json").read_text()) == {"throughput:test-key": pytest.approx(500)}
    load.passed(0.021, blocks=10, rows=1)  # within the drift margin: no change
    announcer._follow_drift()
    assert announcer.throughput == pytest.approx(500)
