"""Records bound to identities: a node that stores records about other peers, signed with its own key,
can neither hide a real peer nor add blocks to it (swarm/identity.py, swarm/records.py)."""
from __future__ import annotations

import json
import secrets
import subprocess
import sys

import pytest
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time

from client import DistributedModelForCausalLM, loop
from swarm import __version__ as VERSION
from swarm.dht import SwarmDHT
from swarm.errors import SwarmError
from swarm.local_swarm import LocalSwarm
from swarm.identity import peer_id_of_key, prepare_identity
from swarm.records import OWNER_MARK, BlockAnnouncement, PeerState, block_key, owner_of_subkey
from swarm.reference import resolve_model
from tests.tiny_models import NUM_LAYERS, VOCAB_SIZE, greedy_tokens

pytestmark = pytest.mark.slow  # starts peer processes


def forged(state: PeerState, start: int, end: int) -> dict:
    return BlockAnnouncement(state=state, start=start, end=end, throughput=1e6, cache_tokens_left=10**6,
                             version=VERSION, dtype="float32").model_dump(mode="json")


async def forge(initial_peers: list[str], dht_prefix: str, victims: dict[str, tuple[PeerState, int, int]]) -> None:
    """A node that runs none of our validators stores, for each victim, records under the victim's peer id,
    signed with its own key, as hivemind lets anyone do."""
    p2p = await P2P.create(initial_peers=initial_peers, use_relay=False, auto_nat=False, nat_port_map=False)
    signer = RSASignatureValidator()
    node = await DHTNode.create(p2p=p2p, initial_peers=initial_peers, record_validator=signer)
    try:
        for victim, (state, start, end) in victims.items():
            subkey = f"{victim}{signer.local_public_key.decode()}"
            assert owner_of_subkey(subkey) is None  # what every reader and validator concludes
            keys = [block_key(dht_prefix, i) for i in range(start, end)]
            await node.store_many(keys, [forged(state, start, end)] * len(keys), get_dht_time() + 600,
                                  subkeys=[subkey] * len(keys))
    finally:
        await node.shutdown()
        await p2p.shutdown()


def test_forged_records_hide_no_peer_and_add_no_blocks(tiny_llama, tiny_reference, tmp_path):
    model = resolve_model(str(tiny_llama))
    ids = torch.randint(1, VOCAB_SIZE, (1, 8), generator=torch.Generator().manual_seed(5))
    expected = greedy_tokens(tiny_reference("llama"), ids, 10)
    with LocalSwarm(tmp_path, ["--model", str(tiny_llama), "--announce-period", "3"]) as local:
        first, second = local.add_together([["--blocks", "0:2"], ["--blocks", f"2:{NUM_LAYERS}"]])
        # "the second peer left", and "the first peer serves every block, fast"
        loop.run(forge(local.initial_peers, model.dht_prefix, {
            second.peer_id: (PeerState.offline, 2, NUM_LAYERS), first.peer_id: (PeerState.online, 0, NUM_LAYERS)}))
        # the forger's own node keeps them (it runs no validator of ours); the peers' validators refuse them,
        # and a reader that gets them from the forger drops them
        reader = loop.run(SwarmDHT.create(local.initial_peers, client_mode=True))
        try:
            blocks = loop.run(reader.read_blocks(model.dht_prefix, model.num_blocks))
        finally:
            loop.run(reader.shutdown())
        assert all(set(block) <= {first.peer_id, second.peer_id} for block in blocks)
        assert blocks[3][second.peer_id].announcement.state == PeerState.online
        assert first.peer_id not in blocks[3] and blocks[0][first.peer_id].announcement.end == 2
        swarm_model = DistributedModelForCausalLM.from_pretrained(str(tiny_llama), initial_peers=local.initial_peers)
        try:
            tokens = swarm_model.generate(ids, max_new_tokens=10, eos_token_id=None)
        finally:
            swarm_model.close()
    assert tokens.tolist() == expected.tolist()


def test_a_record_counts_only_under_the_peer_id_of_its_key():
    _, key, _ = prepare_identity(None)
    own, stranger = RSASignatureValidator(key), RSASignatureValidator()
    own_id = peer_id_of_key(own.local_public_key.decode().removeprefix(OWNER_MARK).removesuffix("]").encode())
    assert own_id is not None
    assert owner_of_subkey(f"{own_id}{own.local_public_key.decode()}") == own_id
    assert owner_of_subkey(f"prefix {own_id}{own.local_public_key.decode()}") == own_id  # registry subkeys
    assert owner_of_subkey(f"{own_id}{stranger.local_public_key.decode()}") is None  # someone else's key
    assert owner_of_subkey(own_id) is None  # unsigned


def test_a_stale_view_reroutes_with_identical_tokens(tiny_llama, tiny_reference, tmp_path):
    """A peer restarts on other blocks under the same identity while a client still believes its old record:
    the peer refuses the old blocks (`not_served`) and the client routes around it."""
    ids = torch.randint(1, VOCAB_SIZE, (1, 8), generator=torch.Generator().manual_seed(6))
    expected = greedy_tokens(tiny_reference("llama"), ids, 10)
    identity = tmp_path / "mover.key"
    with LocalSwarm(tmp_path, ["--model", str(tiny_llama), "--announce-period", "3"]) as local:
        local.add(["--blocks", "0:2"])
        mover = local.add(["--blocks", f"2:{NUM_LAYERS}", "--identity", str(identity)], "mover")
        swarm_model = DistributedModelForCausalLM.from_pretrained(str(tiny_llama), initial_peers=local.initial_peers,
                                                                  refresh_period=3600)  # reads the swarm only when stuck
        try:
            swarm_model.generate(ids, max_new_tokens=2, eos_token_id=None)  # its view: the mover serves 2:5
            mover.stop()
            moved = local.add(["--blocks", "0:2", "--identity", str(identity)], "moved")
            assert moved.peer_id == mover.peer_id
            local.add(["--blocks", f"2:{NUM_LAYERS}"], "new")
            tokens = swarm_model.generate(ids, max_new_tokens=10, eos_token_id=None)
        finally:
            swarm_model.close()
    assert tokens.tolist() == expected.tolist()


def test_a_private_swarm_admits_its_members_only(tiny_llama, tiny_reference, tmp_path):
    """Members hold the key: they route through members and get transformers' tokens. An outsider's peer
    is refused at its first call and exits 1 saying why; its records are ignored; its client is refused."""
    key = tmp_path / "swarm.key"
    key.write_text(secrets.token_hex(32))
    model = resolve_model(str(tiny_llama))
    ids = torch.randint(1, VOCAB_SIZE, (1, 8), generator=torch.Generator().manual_seed(6))
    expected = greedy_tokens(tiny_reference("llama"), ids, 10)
    with LocalSwarm(tmp_path, ["--model", str(tiny_llama), "--announce-period", "3", "--swarm-key", str(key)]) as local:
        members = {peer.peer_id for peer in local.add_together([["--blocks", "0:2"], ["--blocks", f"2:{NUM_LAYERS}"]])}
        outsider_peer = subprocess.run(
            [sys.executable, "-m", "peer.cli", "--model", str(tiny_llama), "--blocks", f"0:{NUM_LAYERS}",
             "--initial-peers", local.initial_peers[0]], capture_output=True, text=True, timeout=120)
        assert outsider_peer.returncode == 1 and "private swarm" in outsider_peer.stderr, outsider_peer.stderr[-2000:]

        outsider = loop.run(SwarmDHT.create(local.initial_peers))  # a DHT node that keeps what it stores
        record = BlockAnnouncement(state=PeerState.online, start=0, end=NUM_LAYERS, throughput=1e6,
                                   cache_tokens_left=10**6, version=VERSION, dtype="float32")
        loop.run(outsider.announce_blocks(model.dht_prefix, record, get_dht_time() + 600))  # fast, serving it all
        seen = loop.run(outsider.read_blocks(model.dht_prefix, model.num_blocks))
        assert all(str(outsider.peer_id) in block for block in seen)  # out there, for readers without the key
        member = DistributedModelForCausalLM.from_pretrained(str(tiny_llama), initial_peers=local.initial_peers,
                                                             swarm_key=key)
        try:
            blocks = loop.run(member.dht.read_blocks(model.dht_prefix, model.num_blocks))
            assert all(block and set(block) <= members for block in blocks)  # the outsider serves "all" of them
            with member.session(ids.shape[1] + 10) as session:
                tokens = member.generate(ids, max_new_tokens=10, eos_token_id=None, session=session)
            assert {hop.peer_id for hop in session.route} == members
        finally:
            member.close()
        assert tokens.tolist() == expected.tolist()
        stranger = DistributedModelForCausalLM.from_pretrained(str(tiny_llama), initial_peers=local.initial_peers)
        try:
            with pytest.raises(SwarmError, match="private swarm and the caller does not hold its key"):
                stranger.generate(ids, max_new_tokens=2)
        finally:
            stranger.close()
            loop.run(outsider.shutdown())


def through_the_liar(model: DistributedModelForCausalLM, liar: str, ids: torch.Tensor, new: int):
    """A session whose route goes through the liar (checked after its first step, before it lies), and its
    greedy tokens. Routes prefer the liar's announced speed; the retries only guard against a slow round trip."""
    options = dict(eos_token_id=None, pad_token_id=0)
    for _ in range(5):
        with model.session(ids.shape[1] + new) as session:
            first = model.generate(ids, max_new_tokens=1, session=session, **options)
            if liar in [hop.peer_id for hop in session.route]:
                return session, model.generate(first, max_new_tokens=new - 1, session=session, **options)
    pytest.fail("no route went through the lying peer in 5 sessions")


def test_a_lying_peer_is_caught_and_routed_around(default_reference, default_tokenizer, tmp_path):
    """A peer that announces itself fastest and lies from position LIE_FROM on: `strict` never uses a wrong
    output; `spot` catches it within the generation, and from then on the tokens are honest. The default
    model, so that compute, not round trips, decides routes, and the liar's claimed speed draws them."""
    ids = default_tokenizer("The history of the printing press begins", return_tensors="pt").input_ids
    prompt, new = ids.shape[1], 24
    lie_from = prompt + 4
    lying_step = lie_from - prompt + 1  # step 0 is the prompt; step k sends position prompt + k - 1
    expected = greedy_tokens(default_reference, ids, new)
    with LocalSwarm(tmp_path, ["--dtype", "float32", "--announce-period", "3"]) as local:
        local.add_together([["--blocks", "0:15"], ["--blocks", "15:30"]] * 2)
        liar = local.add(["--blocks", "15:30"], module="tests.lying_peer", env={"LIE_FROM": str(lie_from)}).peer_id
        for verify in ("off", "strict", "strict", "spot"):  # strict twice: its rebuilt hop may be on either honest peer
            model = DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=local.initial_peers,
                                                                verify=verify, verify_share=0.5)
            try:
                session, out = through_the_liar(model, liar, ids, new)
            finally:
                model.close()
            if verify == "off":  # the liar's lies matter
                assert not torch.equal(out, expected) and torch.equal(out[:, : prompt + lying_step], expected[:, : prompt + lying_step])
                continue
            assert [peer for peer, _ in session.caught] == [liar] and liar in model.bans.forever
            assert liar not in [hop.peer_id for hop in session.route]
            caught_at = session.caught[0][1]
            if verify == "strict":
                assert caught_at == lying_step and torch.equal(out, expected)
            else:  # checked with probability 0.5 a step: missing all 20 lying steps happens once in a million
                assert lying_step <= caught_at < new, session.caught
                honest_from = out[:, : prompt + caught_at]  # the tokens chosen before the liar was caught
                assert torch.equal(out, greedy_tokens(default_reference, honest_from, new - caught_at))
        health = subprocess.run([sys.executable, "-m", "client.health", "--initial-peers", *local.initial_peers,
                                 "--verify", "--json"], capture_output=True, text=True, timeout=120)
        report = json.loads(health.stdout)
        assert health.returncode == 1 and not report["healthy"], health.stdout + health.stderr
        assert {p["peer_id"]: p["outputs"] for p in report["peers"]} == {
            p.peer_id: "wrong" if p.peer_id == liar else "agrees" for p in local.peers}
        assert report["problems"][0].startswith(f"peer {liar[-8:]} computes blocks 15:30 wrong")
