"""Routing and record validation as pure functions: fast checks of the decisions peers and clients make."""
import random

import msgpack
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord

from client.route import build_route
from peer.placement import Coverage, best_start, should_move
from swarm.dht import PeerRecord
from swarm.errors import RouteError
from swarm.identity import peer_id_of_key, prepare_identity
from swarm.records import OWNER_MARK, BlockAnnouncement, PeerState, RecordSchemaValidator


def peer(start: int, end: int, throughput: float = 100.0, state: PeerState = PeerState.online) -> BlockAnnouncement:
    return BlockAnnouncement(state=state, start=start, end=end, throughput=throughput, cache_tokens_left=1000,
                             version="0.1.0", dtype="float32")


def records(**spans: BlockAnnouncement) -> dict[str, PeerRecord]:
    return {name: PeerRecord(name, record, 0.0) for name, record in spans.items()}


def test_one_peer_is_one_hop():
    for seed in range(50):
        route = build_route(30, records(a=peer(0, 30, throughput=20)), {"a": 0.003}, rng=random.Random(seed))
        assert [(h.peer_id, h.start, h.end) for h in route] == [("a", 0, 30)]


def test_fewer_hops_win_when_peers_are_alike():
    peers = records(whole=peer(0, 30), left=peer(0, 15), right=peer(15, 30))
    rtts = {"whole": 0.01, "left": 0.01, "right": 0.01}
    assert [h.peer_id for h in build_route(30, peers, rtts, rng=random.Random(0))] == ["whole"]


def test_partial_spans_and_banned_peers():
    peers = records(a=peer(0, 20), b=peer(10, 30), c=peer(0, 30, throughput=1))
    route = build_route(30, peers, {"a": 0.01, "b": 0.01, "c": 0.01}, banned={"c"}, rng=random.Random(0))
    assert route[0].peer_id == "a" and route[-1].peer_id == "b" and route[0].end == route[1].start
    assert route[0].start == 0 and route[-1].end == 30


def test_unreachable_peers_are_skipped_and_gaps_named():
    peers = records(a=peer(0, 10), b=peer(20, 30), c=peer(10, 20))
    with pytest.raises(RouteError, match=r"blocks 10-19 are served by nobody; the swarm has 0:10, 20:30"):
        build_route(30, peers, {"c": float("inf")})


def test_placement_prefers_gaps_and_moves_only_into_gaps():
    blocks = [1] * 10 + [0] * 10 + [1] * 10
    coverage = Coverage(blocks, [float(b) for b in blocks])
    assert best_start(coverage, 10) == 10
    assert should_move(coverage, 0, 10) == 10  # blocks 0:10 are served by someone else too
    sole = Coverage([0] * 10 + [0] * 10 + [1] * 10, [0.0] * 30)
    assert should_move(sole, 0, 10) is None  # never drop the only copy


def test_an_idle_duplicate_moves_towards_hot_blocks_but_never_off_a_sole_copy():
    peers, speed = [1] * 30, [100.0] * 30
    cold_here = Coverage(peers, speed, [0] * 10 + [0] * 10 + [6] * 10)  # 6 sessions on blocks 20:30's one peer
    assert should_move(cold_here, 0, 10) == 20  # there: 6 / 2 per replica with me, here 0
    mild = Coverage(peers, speed, [2] * 10 + [0] * 10 + [3] * 10)
    assert should_move(mild, 0, 10) is None  # 1.5 against 1 per replica: not worth a move
    idle = Coverage(peers, speed, [0] * 30)
    assert should_move(idle, 0, 10) is None  # no session anywhere: stay
    sole = Coverage([0] * 10 + [1] * 20, speed, [0] * 20 + [9] * 10)
    assert should_move(sole, 0, 10) is None  # hot elsewhere, but nobody else serves 0:10


def test_validator_refuses_unsigned_forged_and_malformed_records():
    """Validators see subkeys as hivemind serializes them (msgpack): `<peer id>[owner:<that peer's key>]`."""
    validator = RecordSchemaValidator()
    good = msgpack.packb(peer(0, 3).model_dump(mode="json"))
    _, key, _ = prepare_identity(None)
    owner = RSASignatureValidator(key).local_public_key.decode()
    own_id = peer_id_of_key(owner.removeprefix(OWNER_MARK).removesuffix("]").encode())
    signed_subkey = msgpack.packb(f"{own_id}{owner}")
    assert validator.validate(DHTRecord(b"k", signed_subkey, good, 0.0))
    assert not validator.validate(DHTRecord(b"k", msgpack.packb("12D3KooWVictim"), good, 0.0))  # unsigned
    assert not validator.validate(DHTRecord(b"k", msgpack.packb(f"12D3KooWVictim{owner}"), good, 0.0))  # not its key
    bad = msgpack.packb({**peer(0, 3).model_dump(mode="json"), "end": 0})
    assert not validator.validate(DHTRecord(b"k", signed_subkey, bad, 0.0))
    assert not validator.validate(DHTRecord(b"k", signed_subkey, b"\xc1 not msgpack", 0.0))
