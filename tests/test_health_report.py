"""swarm-health's verdict as a pure function (client/health/report.py): records and round trips in, a report out."""
from __future__ import annotations

from client.health.report import ModelTarget, build_report
from swarm.dht import PeerRecord
from swarm.records import BlockAnnouncement, PeerState

TARGET = ModelTarget("m", "m-0123456789", 4, True)
ALPHA, BETA = "12D3KooWalphaALPHA", "12D3KooWbetaBETA"


def table(*spans: tuple[str, int, int, PeerState]) -> list[dict[str, PeerRecord]]:
    blocks: list[dict[str, PeerRecord]] = [{} for _ in range(TARGET.num_blocks)]
    for peer_id, start, end, state in spans:
        record = BlockAnnouncement(state=state, start=start, end=end, throughput=10.0, cache_tokens_left=100,
                                   version="0.2.0", dtype="float32")
        for block in range(start, end):
            blocks[block][peer_id] = PeerRecord(peer_id, record, 1e12)
    return blocks


def test_only_peers_that_answer_cover_blocks():
    online = table((ALPHA, 0, 2, PeerState.online), (BETA, 2, 4, PeerState.online))
    report = build_report([TARGET], {TARGET.dht_prefix: online}, {ALPHA: 0.01, BETA: None})
    [model] = report.models
    assert not report.healthy and report.exit_code == 1
    assert not model.covered and model.uncovered == [2, 3] and model.blocks == [[ALPHA], [ALPHA], [], []]
    assert report.problems == [
        f"blocks 2-3 of m are served by nobody that answers (announced by {BETA[-8:]}, which did not answer)",
        f"peer {BETA[-8:]} is unreachable"]
    assert [p.rtt_ms for p in report.peers] == [10.0, None]  # still listed, as unreachable


def test_an_answering_replica_keeps_a_block_covered():
    both = table((ALPHA, 0, 4, PeerState.online), (BETA, 2, 4, PeerState.online))
    report = build_report([TARGET], {TARGET.dht_prefix: both}, {ALPHA: 0.01, BETA: None})
    assert report.models[0].covered and report.healthy and report.exit_code == 0
    assert report.problems == [f"peer {BETA[-8:]} is unreachable"]  # capacity lost, coverage kept


def test_offline_and_joining_peers_never_cover():
    leaving = table((ALPHA, 0, 4, PeerState.offline), (BETA, 0, 4, PeerState.joining))
    report = build_report([TARGET], {TARGET.dht_prefix: leaving}, {ALPHA: 0.01, BETA: 0.01})
    assert report.models[0].uncovered == [0, 1, 2, 3]
    assert report.problems[0] == "blocks 0-3 of m are served by nobody"


def test_a_peer_computing_wrong_covers_nothing():
    """--verify: the gathering found BETA's outputs unlike the others' (client/health/outputs.py)."""
    spans = table((ALPHA, 0, 2, PeerState.online), (BETA, 2, 4, PeerState.online))
    problem = f"peer {BETA[-8:]} computes blocks 2:4 wrong: its output differs from 2 other peers', which agree with each other"
    report = build_report([TARGET], {TARGET.dht_prefix: spans}, {ALPHA: 0.01, BETA: 0.01},
                          verdicts={ALPHA: "agrees", BETA: "wrong"}, output_problems=[problem])
    assert not report.healthy and report.exit_code == 1 and report.models[0].uncovered == [2, 3]
    assert report.problems == [problem, f"blocks 2-3 of m are served by nobody that answers ({BETA[-8:]} computes them wrong)"]
    assert [p.outputs for p in report.peers] == ["agrees", "wrong"]
