"""A swarm across real networks (tests/network_rig.py): a public peer, peers behind home NATs, a client behind
another. Every host runs real processes; tokens must equal transformers' on the same tiny model."""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from swarm.local_swarm import PeerProcess, launch_peer, start_peer
from tests.network_rig import Host, NetworkRig, RigUnavailable, why_unavailable
from tests.tiny_models import VOCAB_SIZE, greedy_tokens

pytestmark = pytest.mark.slow  # starts peer processes in namespaces
RELAY_SECONDS = 12  # the public peer's limit on one relayed connection: sessions below outlast it
PORT = 31337


@pytest.fixture(scope="module")
def rig():
    reason = why_unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the network rig must run in CI: {reason}")
        pytest.skip(reason)
    try:
        with NetworkRig() as built:
            yield built
    except RigUnavailable as e:
        pytest.fail(str(e))


class Swarm:
    """Peers on the rig's hosts, all on one tiny model; stopped at the end, also after a failure."""

    def __init__(self, rig: NetworkRig, model: Path, log_dir: Path):
        self.rig, self.model, self.log_dir = rig, model, log_dir
        self.peers: dict[str, PeerProcess] = {}
        self.entrance = ""  # the public peer's address

    def start(self, name: str, host: Host, blocks: str, *extra: str, entrance: str | None = None) -> PeerProcess:
        join = ["--new-swarm"] if not self.entrance else ["--initial-peers", entrance or self.entrance]
        args = [*join, "--model", str(self.model), "--blocks", blocks, "--host", host.address, "--port", str(PORT),
                "--announce-period", "3", *extra]
        peer = start_peer(args, self.log_dir, name, timeout=120, netns=host.name)
        self.peers[name] = peer
        self.entrance = self.entrance or peer.maddrs[0]
        return peer

    def stop(self) -> None:
        for peer in self.peers.values():
            peer.stop(10)


@pytest.fixture(scope="module")
def swarm(rig, tiny_llama, tmp_path_factory):
    """Public peer (blocks 0:2, relays for others) and two homes behind their own NATs (2:4 and 4:5)."""
    nets = Swarm(rig, tiny_llama, tmp_path_factory.mktemp("rig-peers"))
    try:
        nets.start("public", rig.public_host("public"), "0:2", "--relay-time-limit", str(RELAY_SECONDS))
        nets.start("home-a", rig.home_host("home-a"), "2:4")
        nets.start("home-b", rig.home_host("home-b"), "4:5")
        yield nets
    finally:
        nets.stop()


@pytest.fixture(scope="module")
def client_host(rig, swarm):
    return rig.home_host("client")


def expected_tokens(tiny_reference, ids: list[int], new: int) -> list[int]:
    return greedy_tokens(tiny_reference("llama"), torch.tensor([ids]), new)[0].tolist()


class Client:
    """tests/rig_client.py on a host: its `token N` lines as they come, then its result; stderr in LOG."""

    def __init__(self, host: Host, model: Path, entrance: str, ids: list[int], new: int, log: Path, pause: float = 0.0):
        self.log = log
        self.process = subprocess.Popen(
            host.command(sys.executable, "-m", "tests.rig_client", str(model), entrance,
                         "--ids", ",".join(map(str, ids)), "--new", str(new), "--pause", str(pause)),
            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, cwd=Path(__file__).resolve().parent.parent)
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    @property
    def stderr(self) -> str:
        return self.log.read_text()

    def wait_for_token(self, n: int, timeout: float = 120) -> list[str]:
        """The peers of the route when token N came."""
        while not (line := self.lines.get(timeout=timeout)).startswith(f"token {n} "):
            assert not line.startswith("{"), line
        return json.loads(line.split(" ", 2)[2])

    def result(self, timeout: float = 240) -> dict:
        try:
            self.process.wait(timeout)
        finally:
            self.process.kill()
        self.reader.join(10)
        assert self.process.returncode == 0, self.stderr[-4000:]  # the tail holds the error that ended it
        return json.loads(list(self.lines.queue)[-1])


def prompt(seed: int) -> list[int]:
    return torch.randint(1, VOCAB_SIZE, (6,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_peers_behind_nat_are_relayed_and_the_client_behind_nat_gets_transformers_tokens(
        swarm, client_host, tiny_llama, tiny_reference, tmp_path):
    public, home_a = swarm.peers["public"], swarm.peers["home-a"]
    assert public.maddrs[0].startswith(f"/ip4/{swarm.rig.hosts['public'].address}/tcp/{PORT}/")
    assert home_a.maddrs[0].startswith(f"/ip4/{swarm.rig.hosts['home-a'].address}/")  # its address at home
    assert f"through 1 relay(s): {public.peer_id[-8:]}" in home_a.log.read_text()
    assert "reachable directly (the first peer of a new swarm)" in public.log.read_text()
    assert "not reachable directly (behind NAT or a firewall)" in home_a.log.read_text()
    ids = prompt(1)
    result = Client(client_host, tiny_llama, swarm.entrance, ids, 8, tmp_path / "client.log").result()
    assert result["tokens"] == expected_tokens(tiny_reference, ids, 8)
    assert set(result["route"]) == {p.peer_id for p in swarm.peers.values()}
    assert result["pushed"] >= 8  # to both homes, through the relay: public -> home-a -> home-b, every step after the first


def test_a_relayed_stream_ended_by_its_relay_mid_session_changes_no_token(swarm, client_host, tiny_llama, tiny_reference,
                                                                         tmp_path):
    """The relay ends every relayed stream after RELAY_SECONDS: this session lasts longer."""
    ids, new = prompt(2), 10
    pause = 2.2 * RELAY_SECONDS / new
    client = Client(client_host, tiny_llama, swarm.entrance, ids, new, tmp_path / "client.log", pause)
    result = client.result()
    assert result["tokens"] == expected_tokens(tiny_reference, ids, new)
    assert "relay limit: 12 s per stream; rerouting" in client.stderr, client.stderr[-2000:]  # it happened


def test_health_from_behind_nat_shows_how_each_peer_is_reached(swarm, client_host):
    done = subprocess.run(client_host.command(sys.executable, "-m", "client.health", "--initial-peers", swarm.entrance,
                                              "--json"), capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["healthy"], done.stderr[-2000:]
    peers = {p["peer_id"]: p for p in report["peers"]}
    public = swarm.peers["public"].peer_id
    assert peers[public]["relays"] == []
    for name in ("home-a", "home-b"):
        home = peers[swarm.peers[name].peer_id]
        assert home["relays"] == [public] and home["rtt_ms"] is not None  # pinged through the relay


def test_a_home_peer_killed_mid_generation_is_replaced_by_its_twin_behind_another_nat(
        swarm, rig, client_host, tiny_llama, tiny_reference, tmp_path):
    twin = swarm.start("home-twin", rig.home_host("home-twin"), "2:4")
    ids, new = prompt(3), 12
    client = Client(client_host, tiny_llama, swarm.entrance, ids, new, tmp_path / "client.log", pause=0.4)
    route = client.wait_for_token(3)
    twins = {p.peer_id: p for p in (swarm.peers["home-a"], twin)}
    (victim,) = [twins[p] for p in route if p in twins]
    victim.process.send_signal(signal.SIGKILL)
    result = client.result()
    assert result["tokens"] == expected_tokens(tiny_reference, ids, new)
    (survivor,) = set(twins) - {victim.peer_id}
    assert survivor in result["route"] and victim.peer_id not in result["route"]
    assert "rerouting blocks 2:4" in client.stderr


def test_a_home_peer_with_no_relay_says_nobody_can_reach_it_and_never_announces(swarm, rig, tiny_llama, tmp_path):
    stingy = swarm.start("public-no-relay", rig.public_host("stingy"), "0:1", "--relay-streams", "0")
    home = rig.home_host("home-alone")
    peer = launch_peer(["--initial-peers", stingy.maddrs[0], "--model", str(tiny_llama), "--blocks", "2:4",
                        "--host", home.address, "--port", str(PORT)], tmp_path, "alone", netns=home.name)
    try:
        assert peer.process.wait(60) == 1
    finally:
        peer.stop(5)
    log = peer.log.read_text()
    assert "nobody can reach this peer" in log and "none of the peers it joined through relays" in log
    assert "ready" not in "".join(peer.lines.queue)

