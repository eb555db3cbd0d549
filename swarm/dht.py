"""Joining the swarm's DHT, and reading and writing its records. Peers, clients and tools all use this."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.dht.node import DHTNode
from hivemind.dht.validation import CompositeValidator
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.asyncio import asingle

from swarm import protocol
from swarm.errors import SwarmError
from swarm.identity import prepare_identity
from swarm.lifetime import die_with_parent
from swarm.membership import SwarmKey
from swarm.records import (
    REGISTRY_KEY,
    BlockAnnouncement,
    ModelRegistration,
    RecordSchemaValidator,
    block_key,
    parse_record,
    owner_of_subkey,
)

logger = logging.getLogger(__name__)
JOIN_RETRY_SECONDS = 1.0  # between tries of initial peers that did not answer, within --join-timeout


@dataclass(frozen=True)
class PeerRecord:
    """One peer's announcement of a model, as read back from the DHT."""

    peer_id: str
    announcement: BlockAnnouncement
    expiration_time: float


class SwarmDHT:
    """A DHT node in our swarm: its own p2pd, our record validators, and typed reads and writes.

    Calls to a peer behind NAT go through a relay peer (peer/relay.py): the relay forwards them over
    the connection that peer keeps open to it. p2pd's own circuit relay is not used: the daemon
    hivemind ships resets a relayed connection after 128 KiB whatever its flags say, less than
    one prefill of a small model (docs/operations.md).
    """

    def __init__(self, p2p: P2P, node: DHTNode, signer: RSASignatureValidator, swarm_key: SwarmKey | None = None):
        self.p2p, self.node, self.signer, self.swarm_key = p2p, node, signer, swarm_key

    @property
    def member_token(self) -> str | None:
        """What this node's calls carry: in a private swarm, the token its peers admit members by."""
        return None if self.swarm_key is None else self.swarm_key.call_token

    def _is_member(self, peer_id: str, proof: str | None) -> bool:
        return self.swarm_key is None or self.swarm_key.admits_record(peer_id, proof)

    def _proved(self, record: Any) -> Any:
        """The record with this node's membership proof, in a private swarm."""
        return record if self.swarm_key is None else record.model_copy(
            update={"member_proof": self.swarm_key.record_proof(str(self.peer_id))})

    @classmethod
    async def create(
        cls,
        initial_peers: list[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        announce_maddrs: list[str] | None = None,
        identity_path: str | None = None,
        client_mode: bool = False,
        swarm_key: SwarmKey | None = None,
        join_timeout: float = 0.0,
    ) -> "SwarmDHT":
        """IDENTITY_PATH: the private key file of the peer id (made if missing; without it, a new identity).
        With SWARM_KEY, a member of that private swarm: it stores, reads and calls members only.
        JOIN_TIMEOUT: seconds to keep trying initial peers that do not answer yet (peers started together)."""
        identity = prepare_identity(identity_path)
        deadline, tries = time.monotonic() + join_timeout, 0
        while True:
            try:
                return await cls._create(initial_peers, host, port, announce_maddrs, identity, client_mode, swarm_key)
            except SwarmError as e:
                if not initial_peers or time.monotonic() + JOIN_RETRY_SECONDS > deadline:
                    raise
                if not tries:
                    logger.info(f"{e}; trying again for up to {join_timeout:.0f} s (--join-timeout)")
                tries += 1
                await asyncio.sleep(JOIN_RETRY_SECONDS)

    @classmethod
    async def _create(cls, initial_peers: list[str], host: str, port: int, announce_maddrs: list[str] | None,
                      prepared: tuple[str, RSAPrivateKey, bool], client_mode: bool,
                      swarm_key: SwarmKey | None) -> "SwarmDHT":
        identity, key, existed = prepared
        try:
            with _daemon_in_its_own_session():
                p2p = await P2P.create(
                    initial_peers=initial_peers or None,
                    host_maddrs=[f"/ip4/{host}/tcp/{port}"],
                    announce_maddrs=announce_maddrs or None,
                    identity_path=identity,
                    check_if_identity_free=existed,  # a key made just now is nobody else's
                    use_relay=False,
                    use_auto_relay=False,
                    auto_nat=False,
                    nat_port_map=False,
                    dht_mode="client" if client_mode else "server",
                    startup_timeout=30,
                )
        except Exception as e:
            raise SwarmError(f"cannot start the p2p daemon or reach {', '.join(initial_peers) or 'the swarm'}: {e}") from None
        signer = RSASignatureValidator(key)  # records are signed by the identity itself
        try:
            node = await DHTNode.create(
                p2p=p2p,
                initial_peers=initial_peers or None,
                client_mode=client_mode,
                record_validator=CompositeValidator([signer, RecordSchemaValidator(swarm_key)]),
                wait_timeout=5,
            )
        except Exception as e:
            await p2p.shutdown()
            raise SwarmError(f"cannot join the swarm through {', '.join(initial_peers)}: {e}") from None
        return cls(p2p, node, signer, swarm_key)

    @property
    def peer_id(self) -> PeerID:
        return self.p2p.peer_id

    def own_subkey(self, prefix: str = "") -> str:
        """A subkey only this node can write: hivemind's validator checks the embedded public key."""
        return f"{prefix}{self.peer_id}{self.signer.local_public_key.decode()}"

    async def visible_maddrs(self) -> list[str]:
        return [str(m) for m in await self.p2p.get_visible_maddrs(latest=True)]

    async def relay_to(self, record: BlockAnnouncement, timeout: float) -> str | None:
        """The relay to call a peer behind NAT through (None: call it directly), connected to. Our daemon's
        own routing is off: a relay is found only at the addresses the record gives (`.../p2p/RELAY`).
        A failure to connect shows in the call that follows."""
        if not record.relays:
            return None
        relay = record.relays[0]
        addresses = [Multiaddr(m.rpartition("/p2p/")[0]) for m in record.maddrs if m.endswith(f"/p2p/{relay}")]
        try:
            await asyncio.wait_for(self.p2p._client.connect(PeerID.from_base58(relay), addresses), timeout)
        except Exception as e:
            logger.debug(f"cannot connect to relay {relay[-8:]}: {e!r}")
        return relay

    async def iterate(self, peer_id: str, rpc: str, requests: runtime_pb2.ExpertRequest | AsyncIterator[runtime_pb2.ExpertRequest],
                      relay: str | None = None) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """The responses of a streaming RPC of a peer, called through RELAY (a peer id) if the peer is behind NAT.
        A relay calling a peer it relays for calls it directly, over the peer's connection."""
        if relay is None or relay == str(self.peer_id):
            return await self.p2p.iterate_protobuf_handler(PeerID.from_base58(peer_id), rpc, requests,
                                                           runtime_pb2.ExpertResponse)
        opening = protocol.pack_request(protocol.RelayOpen(target=peer_id, rpc=rpc, member=self.member_token))
        return await self.p2p.iterate_protobuf_handler(PeerID.from_base58(relay), protocol.RELAY,
                                                       _after(opening, requests), runtime_pb2.ExpertResponse)

    async def call(self, peer_id: str, rpc: str, request: runtime_pb2.ExpertRequest,
                   relay: str | None = None) -> runtime_pb2.ExpertResponse:
        """The response of a unary RPC of a peer, called through RELAY if the peer is behind NAT."""
        if relay is None or relay == str(self.peer_id):
            return await self.p2p.call_protobuf_handler(PeerID.from_base58(peer_id), rpc, request,
                                                        runtime_pb2.ExpertResponse)
        return await asingle(await self.iterate(peer_id, rpc, request, relay))

    async def announce_blocks(self, dht_prefix: str, record: BlockAnnouncement, expiration_time: float) -> None:
        keys = [block_key(dht_prefix, i) for i in range(record.start, record.end)]
        value = self._proved(record).model_dump(mode="json")
        subkey = self.own_subkey()
        # not await_all_replicas: a hung node on the DHT path must not stall announcements past their expiry
        await self.node.store_many(
            keys, [value] * len(keys), expiration_time, subkeys=[subkey] * len(keys), await_all_replicas=False
        )

    async def register_model(self, registration: ModelRegistration, expiration_time: float) -> None:
        subkey = self.own_subkey(f"{registration.dht_prefix} ")
        await self.node.store(
            REGISTRY_KEY, self._proved(registration).model_dump(mode="json"), expiration_time, subkey=subkey,
            await_all_replicas=False
        )

    async def read_blocks(self, dht_prefix: str, num_blocks: int) -> list[dict[str, PeerRecord]]:
        """For every block, the peers announcing it (newest record per peer id), in one batched lookup."""
        keys = [block_key(dht_prefix, i) for i in range(num_blocks)]
        found = await self.node.get_many(keys, sufficient_expiration_time=float("inf"))
        now = get_dht_time()
        blocks: list[dict[str, PeerRecord]] = []
        for key in keys:
            peers: dict[str, PeerRecord] = {}
            entry = found.get(key)
            if entry is not None and isinstance(entry.value, dict):
                for subkey, item in entry.value.items():
                    record = _parse(item.value, BlockAnnouncement)
                    peer = owner_of_subkey(subkey)
                    if record is None or item.expiration_time < now or peer is None \
                            or not self._is_member(peer, record.member_proof):
                        continue
                    if peer not in peers or peers[peer].expiration_time < item.expiration_time:
                        peers[peer] = PeerRecord(peer, record, item.expiration_time)
            blocks.append(peers)
        return blocks

    async def read_models(self) -> list[ModelRegistration]:
        entry = await self.node.get(REGISTRY_KEY, sufficient_expiration_time=float("inf"))
        models: dict[str, ModelRegistration] = {}
        if entry is not None and isinstance(entry.value, dict):
            for subkey, item in entry.value.items():
                record, owner = _parse(item.value, ModelRegistration), owner_of_subkey(subkey)
                if record is not None and owner is not None and self._is_member(owner, record.member_proof):
                    models[record.dht_prefix] = record
        return sorted(models.values(), key=lambda m: m.name)

    async def ping(self, peer_id: str, timeout: float, relay: str | None = None) -> float | None:
        """Seconds an `info` call takes to come back, or None: a peer the DHT lists may be dead or unreachable."""
        started = time.perf_counter()
        try:
            await asyncio.wait_for(self.call(peer_id, protocol.INFO, protocol.pack_request(protocol.InfoRequest(member=self.member_token)),
                                             relay),
                                   timeout)
        except Exception:
            return None
        return time.perf_counter() - started

    async def shutdown(self) -> None:
        await self.node.shutdown()
        await self.p2p.shutdown()


async def _after(first: runtime_pb2.ExpertRequest, rest: runtime_pb2.ExpertRequest | AsyncIterator[runtime_pb2.ExpertRequest]
                 ) -> AsyncIterator[runtime_pb2.ExpertRequest]:
    yield first
    if isinstance(rest, runtime_pb2.ExpertRequest):
        yield rest
    else:
        async for request in rest:
            yield request


_SPAWN = asyncio.subprocess.create_subprocess_exec
_creating = 0  # P2P.create calls in progress: the wrapped spawn stays until the last one is done


@contextlib.contextmanager
def _daemon_in_its_own_session() -> Iterator[None]:
    """Start hivemind's p2pd in a session of its own, tied to our life (swarm/lifetime.py).

    A signal to our whole process group (a terminal's Ctrl-C, a supervisor stopping a group) then
    reaches us alone: we still need the daemon to announce `offline`, tell open sessions we leave,
    and drain, and we stop it ourselves. hivemind offers no option for how its daemon is spawned,
    so the spawn is wrapped while P2P.create runs (only our own event loop spawns meanwhile).
    """
    global _creating
    _creating += 1
    asyncio.subprocess.create_subprocess_exec = _spawn_in_own_session
    try:
        yield
    finally:
        _creating -= 1
        if _creating == 0:
            asyncio.subprocess.create_subprocess_exec = _SPAWN


async def _spawn_in_own_session(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
    return await _SPAWN(*args, start_new_session=True, preexec_fn=die_with_parent, **kwargs)


def _parse(value: object, kind: type):
    try:
        record = parse_record(value)
    except Exception:
        return None  # our validator refuses these on store; a stale cache entry may still hold one
    return record if isinstance(record, kind) else None

