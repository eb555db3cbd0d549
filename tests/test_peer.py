"""swarm-serve as real processes on 127.0.0.1: records, RPCs, bad input, shutdown, placement."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time

import pytest
import torch

from client import loop
from swarm.local_swarm import LocalSwarm, free_port, launch_peer, new_identity, start_peer, wait_ready
from swarm import protocol
from swarm.dht import SwarmDHT
from swarm.protocol import ErrorReply, ForwardRequest, Opened, OpenSession, Step, StepResult
from swarm.records import PeerState
from swarm.reference import resolve_model
from swarm.span import Span
from tests.rpc_helpers import RawStream, forward, info
from tests.tiny_models import NUM_LAYERS

pytestmark = pytest.mark.slow  # starts peer processes

MODEL = resolve_model("smollm2-135m")
HIDDEN = MODEL.hidden_size
# A peer sums in another order than this process (its own thread count, rows batched): hidden states
# near 40 then differ by a few float32 steps. Any real fault is off by far more.
FLOAT32_SUMS = {"atol": 1e-4, "rtol": 3e-5}


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("peers"), ["--announce-period", "2"]) as local:
        local.add_together([["--blocks", "0:10", "--public-name", "first", "--max-cache-tokens", "4096"],
                            ["--blocks", "10:30", "--public-name", "second"]])
        yield local


@pytest.fixture(scope="module")
def dht(swarm):
    node = loop.run(SwarmDHT.create(swarm.initial_peers, client_mode=True))
    yield node
    loop.run(node.shutdown())


@pytest.fixture(scope="module")
def local_span():
    return Span(MODEL, 0, 10)


def wait_for(condition, timeout: float, message: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    pytest.fail(message)


def test_records_in_dht(swarm, dht):
    blocks = loop.run(dht.read_blocks(MODEL.dht_prefix, MODEL.num_blocks))
    first, second = swarm.peers[0].peer_id, swarm.peers[1].peer_id
    assert all(set(b) == {first} for b in blocks[:10])
    assert all(set(b) == {second} for b in blocks[10:])
    record = blocks[3][first].announcement
    assert (record.state, record.start, record.end) == (PeerState.online, 0, 10)
    assert record.public_name == "first" and record.dtype == "float32"
    assert record.throughput > 0 and record.cache_tokens_left == 4096
    models = loop.run(dht.read_models())
    assert [(m.name, m.dht_prefix, m.num_blocks) for m in models] == [("smollm2-135m", MODEL.dht_prefix, 30)]


def test_info(swarm, dht):
    reply = info(dht, swarm.peers[0].peer_id)
    assert (reply.model, reply.start, reply.end, reply.open_sessions) == ("smollm2-135m", 0, 10, 0)
    assert reply.max_cache_tokens == 4096


def test_inference_and_forward_match_local_span(swarm, dht, local_span):
    torch.manual_seed(0)
    prompt, steps = torch.randn(1, 7, HIDDEN), [torch.randn(1, 1, HIDDEN) for _ in range(4)]
    cache = local_span.new_cache(1, 16)
    expected = [local_span.forward(prompt, cache)] + [local_span.forward(s, cache) for s in steps]

    stream = RawStream(dht, swarm.peers[0].peer_id)
    opened, _ = stream.send(protocol.pack_request(OpenSession(session_id="match", start=0, end=10, max_length=16, batch_size=1)))
    assert isinstance(opened, Opened)
    try:
        for i, (inputs, want) in enumerate(zip([prompt, *steps], expected)):
            reply, tensors = stream.send(protocol.pack_request(Step(session_id="match", step=i), inputs))
            assert isinstance(reply, StepResult), reply
            torch.testing.assert_close(tensors[0], want, **FLOAT32_SUMS)
    finally:
        stream.close()  # the cache budget test below counts on a free cache

    reply, tensors = forward(dht, swarm.peers[0].peer_id, protocol.pack_request(ForwardRequest(start=0, end=10), prompt))
    torch.testing.assert_close(tensors[0], local_span.forward(prompt), **FLOAT32_SUMS)
    # a hop may use part of a peer's span
    reply, tensors = forward(dht, swarm.peers[1].peer_id, protocol.pack_request(ForwardRequest(start=12, end=14), prompt))
    torch.testing.assert_close(tensors[0], Span(MODEL, 12, 14).forward(prompt), **FLOAT32_SUMS)


def test_push_hands_the_output_to_the_next_hop(swarm, dht, local_span):
    """Peer 0 pushes its output to peer 1's session and tells us peer 1 accepted it: peer 1 answers without
    a message from us, and a late copy of that input is a duplicate it ignores. A push peer 1 refuses
    (not the session's next step) is reported as not pushed, so the client sends its own copy. A push
    without the session's token, from a third party or a hop told a wrong one, is refused, and the
    session goes on exactly."""
    torch.manual_seed(2)
    first, second = swarm.peers[0].peer_id, swarm.peers[1].peer_id
    tail = Span(MODEL, 10, 12)
    head_cache, tail_cache = local_span.new_cache(1, 16), tail.new_cache(1, 16)
    a, b = RawStream(dht, first), RawStream(dht, second)
    a.send(protocol.pack_request(OpenSession(session_id="push-a", start=0, end=10, max_length=16, batch_size=1)))
    token = secrets.token_hex(16)
    b.send(protocol.pack_request(OpenSession(session_id="push-b", start=10, end=12, max_length=16, batch_size=1,
                                             push_token=token)))
    for step, x in enumerate([torch.randn(1, 4, HIDDEN), torch.randn(1, 1, HIDDEN)]):
        target = protocol.NextHop(peer_id=second, session_id="push-b", step=step, token=token)
        reply, (middle,) = a.send(protocol.pack_request(Step(session_id="push-a", step=step, next_hops=[target]), x))
        assert reply.pushed
        torch.testing.assert_close(middle, local_span.forward(x, head_cache), **FLOAT32_SUMS)
        reply, (out,) = b.receive()  # nothing sent to b: the push fed it
        assert isinstance(reply, StepResult) and reply.step == step
        torch.testing.assert_close(out, tail.forward(middle, tail_cache), **FLOAT32_SUMS)
        b.queue_only(protocol.pack_request(Step(session_id="push-b", step=step), middle))  # the client's late copy
    x = torch.randn(1, 1, HIDDEN)
    reply, (out,) = b.send(protocol.pack_request(Step(session_id="push-b", step=2), x))
    assert reply.step == 2 and reply.length == 6
    torch.testing.assert_close(out, tail.forward(x, tail_cache), **FLOAT32_SUMS)
    stale = protocol.NextHop(peer_id=second, session_id="push-b", step=1, token=token)
    reply, _ = a.send(protocol.pack_request(Step(session_id="push-a", step=2, next_hops=[stale]), x))
    assert isinstance(reply, StepResult) and not reply.pushed
    wrong = protocol.NextHop(peer_id=second, session_id="push-b", step=3, token=secrets.token_hex(16))
    reply, _ = a.send(protocol.pack_request(Step(session_id="push-a", step=3, next_hops=[wrong]), x))
    assert isinstance(reply, StepResult) and not reply.pushed
    forged = protocol.Push(items=[protocol.PushItem(session_id="push-b", step=3, token=secrets.token_hex(16))])
    reply, _ = protocol.unpack_response(loop.run(dht.call(second, protocol.PUSH, protocol.pack_request(forged, x))))
    assert reply == protocol.PushReply(accepted=[False])  # a third party that knows the session id, not its token
    x = torch.randn(1, 1, HIDDEN)
    reply, (out,) = b.send(protocol.pack_request(Step(session_id="push-b", step=3), x))
    assert reply.step == 3 and reply.length == 7  # neither refused push got into the cache
    torch.testing.assert_close(out, tail.forward(x, tail_cache), **FLOAT32_SUMS)
    a.close()
    b.close()


def bad_inputs():
    """(name, request factory for session 'victim' with max_length 8 after one good step, expected words)."""
    good = torch.randn(1, 1, HIDDEN)
    nan = good.clone()
    nan[0, 0, 3] = float("nan")
    inf = good.clone()
    inf[0, 0, 5] = float("inf")
    garbage = protocol.pack_request(Step(session_id="victim", step=1), good)
    garbage.metadata = b"\xff\x00 not json"
    torn = protocol.pack_request(Step(session_id="victim", step=1), good)
    torn.tensors[0].buffer = torn.tensors[0].buffer[:100]
    step = lambda *tensors: protocol.pack_request(Step(session_id="victim", step=1), *tensors)
    return [
        ("hidden size", step(torch.randn(1, 1, HIDDEN + 1)), "hidden size"),
        ("dtype", step(torch.ones(1, 1, HIDDEN, dtype=torch.int64)), "hidden states must be"),
        ("rank", step(torch.randn(1, HIDDEN)), "rank 3"),
        ("nan", step(nan), "NaN or inf"),
        ("inf", step(inf), "NaN or inf"),
        ("past max length", step(torch.randn(1, 8, HIDDEN)), "max length"),
        ("unknown session", protocol.pack_request(Step(session_id="nobody", step=1), good), "unknown session"),
        ("oversized", step(torch.randn(1, protocol.MAX_STEP_TOKENS + 1, HIDDEN)), "exceed the limit"),
        ("unparseable", garbage, "invalid message metadata"),
        ("torn tensor", torn, "needs"),
        ("wrong batch", step(torch.randn(2, 1, HIDDEN)), "batch size"),
        ("skips ahead", protocol.pack_request(Step(session_id="victim", step=7), good), "skips ahead"),
        ("reorder past the rows", protocol.pack_request(Step(session_id="victim", step=1, reorder=[1]), good),
         "does not pick one of the session's 1 rows"),
    ]


def test_bad_input_never_disturbs_other_sessions(swarm, dht, local_span):
    peer = swarm.peers[0].peer_id
    torch.seed()
    bystander = RawStream(dht, peer)
    bystander.send(protocol.pack_request(OpenSession(session_id="bystander", start=0, end=10, max_length=64, batch_size=1)))
    cache = local_span.new_cache(1, 64)

    def bystander_step(i: int):
        x = torch.randn(1, 1, HIDDEN)
        reply, tensors = bystander.send(protocol.pack_request(Step(session_id="bystander", step=i), x))
        assert isinstance(reply, StepResult), reply
        torch.testing.assert_close(tensors[0], local_span.forward(x, cache), **FLOAT32_SUMS)

    bystander_step(0)
    victim = RawStream(dht, peer)
    victim.send(protocol.pack_request(OpenSession(session_id="victim", start=0, end=10, max_length=8, batch_size=1)))
    reply, _ = victim.send(protocol.pack_request(Step(session_id="victim", step=0), torch.randn(1, 1, HIDDEN)))
    assert isinstance(reply, StepResult)
    for i, (name, request, words) in enumerate(bad_inputs(), start=1):
        reply, _ = victim.send(request)
        expected_code = "unknown_session" if name == "unknown session" else "bad_request"
        assert isinstance(reply, ErrorReply) and reply.code == expected_code, (name, reply)
        assert words in reply.message, (name, reply.message)
        bystander_step(i)
    # the victim's session survives its own bad messages too
    reply, _ = victim.send(protocol.pack_request(Step(session_id="victim", step=1), torch.randn(1, 1, HIDDEN)))
    assert isinstance(reply, StepResult) and reply.length == 2

    duplicate = RawStream(dht, peer)
    reply, _ = duplicate.send(protocol.pack_request(OpenSession(session_id="victim", start=0, end=10, max_length=8, batch_size=1)))
    assert isinstance(reply, ErrorReply) and reply.code == "duplicate_session"
    not_open = RawStream(dht, peer)
    reply, _ = not_open.send(protocol.pack_request(Step(session_id="victim", step=0), torch.randn(1, 1, HIDDEN)))
    assert isinstance(reply, ErrorReply) and "must open" in reply.message
    outside = RawStream(dht, peer)
    reply, _ = outside.send(protocol.pack_request(OpenSession(session_id="outside", start=5, end=12, max_length=8, batch_size=1)))
    assert isinstance(reply, ErrorReply) and reply.code == "not_served"  # routing news for the client, not its error
    assert "this peer serves blocks 0:10, not 5:12" in reply.message
    reply, _ = forward(dht, peer, protocol.pack_request(ForwardRequest(start=0, end=10), torch.randn(1, 3, HIDDEN - 1)))
    assert isinstance(reply, ErrorReply) and "hidden size" in reply.message
    bystander_step(len(bad_inputs()) + 1)
    for stream in (victim, bystander):
        stream.close()


def test_cache_budget_refuses_at_once(swarm, dht):
    peer = swarm.peers[0].peer_id
    holder = RawStream(dht, peer)
    reply, _ = holder.send(protocol.pack_request(OpenSession(session_id="holder", start=0, end=10, max_length=3000, batch_size=1)))
    assert isinstance(reply, Opened) and reply.cache_tokens_left == 4096 - 3000
    refused = RawStream(dht, peer)
    started = time.monotonic()
    reply, _ = refused.send(protocol.pack_request(OpenSession(session_id="refused", start=0, end=10, max_length=1000, batch_size=2)))
    assert isinstance(reply, ErrorReply) and reply.code == "cache_full" and "cache full" in reply.message
    assert time.monotonic() - started < 5
    holder.close()  # closing frees the cache: the same session now fits
    wait_for(lambda: info(dht, peer).cache_tokens_left == 4096, 10, "cache not freed after close")
    again = RawStream(dht, peer)
    reply, _ = again.send(protocol.pack_request(OpenSession(session_id="refused", start=0, end=10, max_length=1000, batch_size=2)))
    assert isinstance(reply, Opened)
    again.close()


def test_sigterm_while_loading_leaves_without_serving(swarm, dht, tmp_path):
    """A stop signal during startup ends loading after the current block: the peer never says ready,
    exits cleanly, and leaves no online record behind."""
    peer = launch_peer(["--initial-peers", swarm.initial_peers[0], "--blocks", "0:30", "--announce-period", "2"],
                       tmp_path, "interrupted")
    try:
        first = ""
        while not first.startswith("listening on "):  # the p2p daemon runs: the blocks load next
            first = peer.lines.get(timeout=120)
        peer.signal(signal.SIGTERM)  # 30 blocks to read, one by one
        assert peer.process.wait(30) == 0
    finally:
        peer.stop(5)
    peer.reader.join(10)
    rest = []
    while not peer.lines.empty():
        rest.append(peer.lines.get())
    assert not any(line.startswith("ready") for line in rest), rest
    assert "stopped before serving" in peer.log.read_text()
    peer_id = first.rsplit("/p2p/", 1)[1].strip()
    record = loop.run(dht.read_blocks(MODEL.dht_prefix, MODEL.num_blocks))[0].get(peer_id)
    assert record is None or record.announcement.state == PeerState.offline


def test_sigterm_goes_offline_and_sigkill_expires(swarm, dht, tmp_path):
    identity = tmp_path / "peer.key"
    args = ["--initial-peers", swarm.initial_peers[0], "--blocks", "5:7", "--announce-period", "2", "--identity", str(identity)]
    peer = start_peer(args, tmp_path, "leaving")
    peer_id = peer.peer_id
    records = lambda: loop.run(dht.read_blocks(MODEL.dht_prefix, MODEL.num_blocks))[5]
    wait_for(lambda: peer_id in records(), 10, "new peer never announced")
    stream = RawStream(dht, peer_id)
    stream.send(protocol.pack_request(OpenSession(session_id="open", start=5, end=7, max_length=8, batch_size=1)))
    peer.signal(signal.SIGTERM)
    reply, _ = stream.receive(timeout=20)
    assert isinstance(reply, protocol.Leaving)  # open sessions are told, so clients move at once
    assert peer.process.wait(30) == 0
    assert records()[peer_id].announcement.state == PeerState.offline

    restarted = start_peer(args, tmp_path, "restarted")
    assert restarted.peer_id == peer_id  # --identity keeps the peer id
    wait_for(lambda: records().get(peer_id) and records()[peer_id].announcement.state == PeerState.online, 10, "not online again")
    restarted.signal(signal.SIGKILL)
    restarted.process.wait(10)
    wait_for(lambda: peer_id not in records(), 20, "record of a killed peer did not expire")


def test_a_group_sigterm_stops_the_peer_gracefully(swarm, dht, tmp_path):
    """kill -TERM -- -PGID, as supervisors and a terminal's Ctrl-C do: the p2p daemon is not in the group,
    so the peer still says offline (seen within 2 s), tells its sessions, drains and exits 0, quietly."""
    args = ["--initial-peers", swarm.initial_peers[0], "--blocks", "7:9", "--announce-period", "2"]
    peer = start_peer(args, tmp_path, "group")
    try:
        records = lambda: loop.run(dht.read_blocks(MODEL.dht_prefix, MODEL.num_blocks))[7]
        wait_for(lambda: peer.peer_id in records(), 10, "new peer never announced")
        stream = RawStream(dht, peer.peer_id)
        opened, _ = stream.send(protocol.pack_request(
            OpenSession(session_id="group", start=7, end=9, max_length=8, batch_size=1)))
        assert isinstance(opened, Opened)
        os.killpg(os.getpgid(peer.process.pid), signal.SIGTERM)
        signalled = time.monotonic()
        wait_for(lambda: records()[peer.peer_id].announcement.state == PeerState.offline, 2,
                 "offline not seen within 2 s")
        reply, _ = stream.receive(timeout=20)
        assert isinstance(reply, protocol.Leaving)
        assert peer.process.wait(30) == 0
        assert time.monotonic() - signalled < 10
    finally:
        peer.stop()
    output = peer.log.read_text()
    assert "Traceback" not in output and "RuntimeError" not in output, output[-3000:]
    assert "could not announce offline" not in output and "did not shut down cleanly" not in output, output[-3000:]


def test_num_blocks_placement_covers_the_model(tmp_path):
    with LocalSwarm(tmp_path, ["--announce-period", "2"]) as local:
        spans = []
        for _ in range(3):
            peer = local.add(["--num-blocks", "10"])
            spans.append(peer.ready_line.split("blocks ")[1].split(" ")[0])
        assert sorted(spans, key=lambda s: int(s.split(":")[0])) == ["0:10", "10:20", "20:30"]


def test_cli_errors(tmp_path):
    run = lambda *args, env=None: subprocess.run([sys.executable, "-m", "peer.cli", *args], capture_output=True, text=True,
                                                 timeout=60, env={**os.environ, **(env or {})})
    result = run()
    assert result.returncode == 2 and "--new-swarm" in result.stderr and "--initial-peers" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: smollm2-135m\nmax_cache_tokens: -5\n")
    result = run("--new-swarm", "--config", str(bad))
    assert result.returncode == 2 and "max_cache_tokens" in result.stderr and str(bad) in result.stderr
    bad.write_text("no_such_setting: 1\n")
    result = run("--new-swarm", "--config", str(bad))
    assert result.returncode == 2 and "no_such_setting" in result.stderr
    result = run("--new-swarm", "--blocks", "10:5")
    assert result.returncode == 2 and "blocks" in result.stderr
    result = run("--new-swarm", "--blocks", "25:31")
    assert result.returncode == 1 and "out of range" in result.stderr and "Traceback" not in result.stderr


def test_a_peer_started_before_its_initial_peer_keeps_trying_with_join_timeout(tiny_llama, tmp_path):
    """Peers started together (LocalSwarm.add_together, a compose file) need not wait for their entry point:
    with --join-timeout a peer keeps trying it and joins once it answers; without, one try and a clear error."""
    identity, port = tmp_path / "first.key", free_port()
    entry = f"/ip4/127.0.0.1/tcp/{port}/p2p/{new_identity(identity)}"
    common = ["--model", str(tiny_llama), "--initial-peers", entry]
    joiner = launch_peer([*common, "--join-timeout", "120", "--blocks", f"2:{NUM_LAYERS}"], tmp_path, "joiner")
    impatient = launch_peer([*common, "--blocks", "0:2"], tmp_path, "impatient")
    first = None
    try:
        assert impatient.process.wait(120) == 1
        error = impatient.log.read_text()
        assert f"cannot start the p2p daemon or reach {entry}" in " ".join(error.split()) and "Traceback" not in error
        wait_for(lambda: "--join-timeout" in joiner.log.read_text(), 60, "the joiner did not say it tries again")
        first = start_peer(["--new-swarm", "--model", str(tiny_llama), "--port", str(port), "--identity", str(identity),
                            "--blocks", "0:2"], tmp_path, "first")
        wait_ready(joiner, "joiner", timeout=60)
        assert f"checked by {first.peer_id[-8:]}" in " ".join(joiner.log.read_text().split())
    finally:
        for peer in (joiner, impatient, first):
            if peer is not None:
                peer.stop()
