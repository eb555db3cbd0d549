"""Load-aware routing: peers announce their load, clients spread new sessions over equivalent replicas."""
from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest
import torch

from client import DistributedModelForCausalLM, loop
from client.route import build_route, step_seconds
from peer.cores import RECHECK_SECONDS
from peer.load import MIN_ALONE_PASSES, PeerLoad
from swarm.dht import PeerRecord
from swarm.local_swarm import LocalSwarm
from swarm.records import BlockAnnouncement, Load, PeerState


def replica(throughput: float = 100.0, sessions: int = 0, step: float | None = None) -> BlockAnnouncement:
    return BlockAnnouncement(state=PeerState.online, start=0, end=30, throughput=throughput, cache_tokens_left=10_000,
                             version="0.2.0", dtype="float32", load=Load(sessions=sessions, queued=0, step_seconds=step, at=0))


def chosen(peers: dict[str, BlockAnnouncement], routes: int = 300, placed: dict[str, int] | None = None) -> Counter:
    records = {name: PeerRecord(name, record, 0.0) for name, record in peers.items()}
    rtts = dict.fromkeys(peers, 0.005)
    return Counter(build_route(30, records, rtts, rng=random.Random(seed), placed=placed)[0].peer_id
                   for seed in range(routes))


def placed_one_by_one(peers: dict[str, BlockAnnouncement], rtts: dict[str, float], sessions: int) -> Counter:
    """Where one client puts `sessions` sessions opened in a row, each counting those it placed before."""
    records = {name: PeerRecord(name, record, 0.0) for name, record in peers.items()}
    placed: Counter = Counter()
    for seed in range(sessions):
        (hop,) = build_route(30, records, rtts, rng=random.Random(seed), placed=placed)
        placed[hop.peer_id] += 1
    return placed


def test_a_slowed_replica_gets_fewer_new_sessions():
    alike = chosen({"a": replica(), "b": replica()})
    assert 0.3 < alike["a"] / 300 < 0.7  # the jitter spreads equal replicas
    slowed = chosen({"a": replica(), "b": replica(step=3 / 100)})  # b's recent passes: 3x its throughput says
    assert slowed["b"] < 0.05 * 300
    busy = chosen({"a": replica(), "b": replica(sessions=6)})
    assert busy["b"] < 0.05 * 300
    assert step_seconds(replica(sessions=8)) == pytest.approx(2 / 100)  # 8 sessions: each step about 2x


def test_sessions_a_client_places_spread_before_records_show_them():
    placed = placed_one_by_one({"a": replica(), "b": replica()}, {"a": 0.005, "b": 0.005}, 8)
    assert 3 <= placed["a"] <= 5


def test_round_trips_under_the_floor_do_not_outweigh_placed_sessions():
    """Pings of 1 and 7 ms on one host measure busy event loops; 10 and 60 ms are a real distance."""
    peers = {"a": replica(throughput=1000), "b": replica(throughput=1000)}  # a placed session adds 3.75 ms
    for rtts, expected in (({"a": 0.001, "b": 0.007}, 2), ({"a": 0.010, "b": 0.060}, 4)):
        placed = placed_one_by_one(peers, rtts, 4)
        assert placed["a"] == expected, (rtts, placed)


def test_peer_load_follows_its_passes():
    load = PeerLoad()
    assert load.step_seconds() is None and load.alone_throughput() is None
    for _ in range(MIN_ALONE_PASSES):
        load.passed(0.02, blocks=10, rows=1)
    assert load.step_seconds() == pytest.approx(0.002) and load.alone_throughput() == pytest.approx(500)
    for _ in range(30):
        load.passed(0.08, blocks=10, rows=8)  # busy passes move the step time, not the one-session speed
    assert load.step_seconds() == pytest.approx(0.008, rel=0.01) and load.alone_throughput() == pytest.approx(500)


@pytest.mark.slow
def test_two_clients_spread_eight_sessions_over_two_replicas_per_span(tmp_path):
    """The default model, so a step's compute outweighs the round trips' noise, as in a real swarm."""
    with LocalSwarm(tmp_path, ["--announce-period", "30"]) as local:
        names = ["left-1", "left-2", "right-1", "right-2"]
        replicas = dict(zip(names, local.add_together([["--blocks", "0:15"]] * 2 + [["--blocks", "15:30"]] * 2, names)))
        time.sleep(RECHECK_SECONDS + 3)  # the first peers follow their share of the cores and announce its throughput
        clients = [DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=local.initial_peers,
                                                               verify="off")  # spot checks' sessions would count
                   for _ in range(2)]
        for client in clients:  # long-lived clients: their round trips were measured before the load began
            client.generate(torch.tensor([[5, 6]]), max_new_tokens=1)
        routes: list[list[str]] = []
        opened, release = threading.Barrier(9), threading.Event()  # the 8 sessions and this thread

        def generate(model: DistributedModelForCausalLM, seed: int) -> None:
            with model.session(16) as session:
                model.generate(torch.tensor([[1 + seed, 2, 3]]), max_new_tokens=2, session=session)
                assert len(session.route) == 2  # one replica of each span
                routes.append([hop.peer_id for hop in session.route])
                opened.wait(60)
                release.wait(60)

        threads = [threading.Thread(target=generate, args=(clients[i % 2], i)) for i in range(8)]
        for thread in threads:
            thread.start()
        try:
            opened.wait(120)
            counts = Counter(peer_id for route in routes for peer_id in route)
            seen = {name: [(c.view._rtt.get(p.peer_id), c.view.record_of(p.peer_id)) for c in clients]
                    for name, p in replicas.items()}  # each client's round trip and record of the peer
            for name, peer in replicas.items():
                assert 0.3 <= counts[peer.peer_id] / 8 <= 0.7, (name, counts[peer.peer_id], seen)
            # the peers re-announced their load without waiting for the 30 s period
            deadline = time.monotonic() + 10
            while True:
                blocks = loop.run(clients[0].dht.read_blocks(clients[0].resolved.dht_prefix, 30))
                newest: dict[str, Load] = {}  # a peer's records of different blocks may be of different moments
                for block in blocks:
                    for pid, r in block.items():
                        if r.announcement.load and (pid not in newest or r.announcement.load.at > newest[pid].at):
                            newest[pid] = r.announcement.load
                announced = {pid: load.sessions for pid, load in newest.items()}
                if all(announced.get(p.peer_id) == counts[p.peer_id] for p in replicas.values()):
                    break
                assert time.monotonic() < deadline, (announced, counts)
                time.sleep(0.5)
        finally:
            release.set()
            for thread in threads:
                thread.join(60)
            for client in clients:
                client.close()
