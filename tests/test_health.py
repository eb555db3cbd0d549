"""swarm-health against a real two-peer swarm: exit codes, the JSON schema, the human view, a peer leaving.

Every check runs the CLI as a subprocess, as an operator or a CI job would. The test that stops a
peer comes last in this file: it breaks the shared swarm on purpose.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from swarm import __version__ as VERSION
from swarm.local_swarm import LocalSwarm

pytestmark = pytest.mark.slow  # starts peer processes

ROOT = Path(__file__).resolve().parent.parent
BAD_PEER = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
GAP = "blocks 15-29 of smollm2-135m are served by nobody"


def health(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run swarm-health; a wide COLUMNS keeps rich from wrapping the lines we look for."""
    base = {k: v for k, v in os.environ.items() if k != "SWARM_INITIAL_PEERS"}
    return subprocess.run(
        [sys.executable, "-m", "client.health", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**base, "COLUMNS": "160", **(env or {})},
    )


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory):
    local = LocalSwarm(tmp_path_factory.mktemp("health-logs"))
    try:
        local.add_together([["--blocks", "0:15", "--announce-period", "2", "--public-name", "alpha"],
                            ["--blocks", "15:30", "--announce-period", "2", "--public-name", "beta"]], ["alpha", "beta"])
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def schema() -> dict:
    result = health("--json-schema")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def check_json(swarm: LocalSwarm, schema: dict) -> tuple[int, dict]:
    result = health("--initial-peers", swarm.initial_peers[0], "--json", "--timeout", "10")
    assert result.returncode in (0, 1), f"exit {result.returncode}: {result.stderr}"
    document = json.loads(result.stdout)
    jsonschema.validate(document, schema)
    return result.returncode, document


def test_covered_swarm_json(swarm: LocalSwarm, schema: dict) -> None:
    alpha, beta = swarm.peers
    code, document = check_json(swarm, schema)
    assert code == 0 and document["healthy"] and document["problems"] == []
    [model] = document["models"]
    assert (model["name"], model["num_blocks"]) == ("smollm2-135m", 30)
    assert model["covered"] and model["announced"] and model["uncovered"] == []
    assert model["blocks"] == [[alpha.peer_id]] * 15 + [[beta.peer_id]] * 15
    peers = {p["public_name"]: p for p in document["peers"]}
    assert set(peers) == {"alpha", "beta"}
    assert (peers["alpha"]["peer_id"], peers["alpha"]["start"], peers["alpha"]["end"]) == (alpha.peer_id, 0, 15)
    assert (peers["beta"]["peer_id"], peers["beta"]["start"], peers["beta"]["end"]) == (beta.peer_id, 15, 30)
    for peer in peers.values():
        assert peer["state"] == "online" and peer["model"] == "smollm2-135m" and peer["version"] == VERSION
        assert peer["rtt_ms"] is not None and 0 < peer["rtt_ms"] < 10_000
        assert peer["throughput"] > 0 and peer["cache_tokens_left"] > 0


def test_covered_swarm_human_view(swarm: LocalSwarm) -> None:
    """Initial peers from the environment, the model named by its reference (resolved locally)."""
    result = health("--model", "smollm2-135m", env={"SWARM_INITIAL_PEERS": f"  {swarm.initial_peers[0]}, "})
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^\s*coverage 1{30}\s*$", result.stdout, re.M), result.stdout
    for peer, name, span in zip(swarm.peers, ("alpha", "beta"), ("0:15", "15:30")):
        assert re.search(rf"{peer.peer_id[-8:]}\s+{name}\s+{span}\s+online", result.stdout), result.stdout
    assert "no problems" in result.stdout


def test_unreachable_swarm_exits_2_with_one_line() -> None:
    started = time.monotonic()
    result = health("--initial-peers", BAD_PEER, "--timeout", "10", timeout=40)
    assert result.returncode == 2, result.stdout + result.stderr
    assert time.monotonic() - started < 20
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and BAD_PEER in lines[0], result.stderr
    assert result.stdout == ""


def test_a_sole_peer_that_does_not_answer_is_a_gap(schema: dict, tmp_path: Path) -> None:
    """gamma killed without a goodbye (SIGKILL): its record says online until it expires, and the two
    other DHT nodes still hold it, but nothing answers for blocks 15-29, so they are a gap."""
    with LocalSwarm(tmp_path) as local:
        alpha, beta, gamma = local.add_together([
            ["--blocks", "0:15", "--public-name", "alpha", "--announce-period", "2"],
            ["--blocks", "0:15", "--public-name", "beta", "--announce-period", "2"],
            ["--blocks", "15:30", "--public-name", "gamma", "--announce-period", "20"]], ["alpha", "beta", "gamma"])
        assert check_json(local, schema)[0] == 0  # covered while gamma lives
        gamma.signal(signal.SIGKILL)
        gamma.process.wait(10)
        code, document = check_json(local, schema)  # well within the record's 60 s of life
        assert code == 1 and not document["healthy"], document
        [model] = document["models"]
        assert not model["covered"] and model["uncovered"] == list(range(15, 30))
        assert model["blocks"][:15] == [sorted([alpha.peer_id, beta.peer_id])] * 15
        [dead] = [p for p in document["peers"] if p["peer_id"] == gamma.peer_id]
        assert dead["state"] == "online" and dead["rtt_ms"] is None
        assert document["problems"][0] == f"{GAP} that answers (announced by {gamma.peer_id[-8:]}, which did not answer)"
        assert f"peer {gamma.peer_id[-8:]} (gamma) is unreachable" in document["problems"]


def test_peer_leaving_uncovers_its_blocks(swarm: LocalSwarm, schema: dict) -> None:
    """Destructive, so last: after SIGTERM of beta its blocks are reported as served by nobody."""
    alpha, beta = swarm.peers
    assert beta.stop() == 0
    deadline = time.monotonic() + 15
    while True:
        code, document = check_json(swarm, schema)
        if code == 1 or time.monotonic() > deadline:
            break
    assert code == 1 and not document["healthy"], document
    [model] = document["models"]
    assert not model["covered"] and model["uncovered"] == list(range(15, 30))
    assert model["blocks"][:15] == [[alpha.peer_id]] * 15 and model["blocks"][15:] == [[]] * 15
    assert GAP in document["problems"]
    assert all(p["peer_id"] == alpha.peer_id or p["state"] == "offline" for p in document["peers"])

    result = health("--initial-peers", swarm.initial_peers[0])
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"^\s*coverage 1{15}·{15}\s*$", result.stdout, re.M), result.stdout
    problems = result.stdout.split("problems:", 1)[1]
    assert f"- {GAP}" in problems, result.stdout
