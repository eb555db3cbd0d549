"""DHT records: what peers announce, the keys they live under, and the validator every node runs.

A record that fails its schema is refused by every node's DHT, so a buggy or hostile peer cannot
fill the swarm with garbage; signed subkeys mean no peer can overwrite another's record.
"""
from __future__ import annotations

import enum
from typing import Annotated, Literal, Union

import msgpack
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from swarm.dtypes import DTypeName, QuantName
from swarm.identity import peer_id_of_key
from swarm.membership import SwarmKey
from swarm.protocol import MAX_MADDR_CHARS

REGISTRY_KEY = "swarm-llm.models"  # every model a swarm serves, so tools need not be told their names
OWNER_MARK = "[owner:"  # how hivemind's signature validator marks a signed subkey
MAX_BLOCKS = 10_000
MEMBER_PROOF = r"^[0-9a-f]{64}$"  # an HMAC-SHA256 of the owner's peer id


def block_key(dht_prefix: str, block: int) -> str:
    return f"{dht_prefix}.{block}"


def owner_of_subkey(subkey: object) -> str | None:
    """The peer id a subkey names (`[PREFIX ]<peer id>[owner:<public key>]`), if that key is the peer's own.

    Only subkeys carrying their owner's public key are protected by hivemind's signature check, and
    only the peer whose identity the key is may write about that peer (swarm/identity.py)."""
    text = subkey.decode(errors="replace") if isinstance(subkey, bytes) else str(subkey)
    claimed, mark, rest = text.partition(OWNER_MARK)
    if not mark or not rest.endswith("]"):
        return None
    peer_id = claimed.rsplit(" ", 1)[-1]
    return peer_id if peer_id_of_key(rest[:-1].encode()) == peer_id else None


class PeerState(str, enum.Enum):
    joining = "joining"  # chose its blocks, still loading them
    online = "online"
    offline = "offline"  # shutting down: refuses new sessions


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Load(_Record):
    """How busy a peer is right now, so clients spread new sessions over replicas (client/route.py)."""

    sessions: int = Field(ge=0, le=1_000_000, description="open sessions")
    queued: int = Field(ge=0, le=1_000_000, description="steps waiting for a pass")
    step_seconds: float | None = Field(default=None, ge=0, le=3600,
                                       description="recent decode passes, seconds per block; none lately: null")
    at: float = Field(description="DHT time it was measured")


class BlockAnnouncement(_Record):
    """Stored under `<dht prefix>.<block>` for every block a peer serves, subkey = its peer id (signed)."""

    kind: Literal["block"] = "block"
    state: PeerState
    start: int = Field(ge=0, le=MAX_BLOCKS)
    end: int = Field(gt=0, le=MAX_BLOCKS)
    throughput: float = Field(ge=0, le=1e9, description="decode steps per second through one block")
    cache_tokens_left: int = Field(ge=0)
    version: str = Field(max_length=32)
    public_name: str | None = Field(default=None, max_length=64)
    dtype: DTypeName
    quant: QuantName = "none"
    cache_dtype: DTypeName | None = Field(default=None, description="the KV cache's precision, if not `dtype`")
    member_proof: str | None = Field(default=None, pattern=MEMBER_PROOF, description="in a private swarm (swarm/membership.py)")
    load: Load | None = None
    relays: list[Annotated[str, Field(max_length=128)]] = Field(
        default=[], max_length=4, description="peer ids of the relays it is reached through; none: reached directly")
    maddrs: list[Annotated[str, Field(max_length=MAX_MADDR_CHARS)]] = Field(
        default=[], max_length=8, description="where to connect to it: relayed addresses for a peer behind NAT")

    @model_validator(mode="after")
    def _span_is_not_empty(self) -> "BlockAnnouncement":
        if self.end <= self.start:
            raise ValueError(f"empty span {self.start}:{self.end}")
        return self


class ModelRegistration(_Record):
    """Stored under REGISTRY_KEY, subkey = `<dht prefix> <peer id>` (signed): a model this swarm serves."""

    kind: Literal["model"] = "model"
    name: str = Field(max_length=128)
    dht_prefix: str = Field(max_length=128, pattern=r"^[a-z0-9-]+$")
    num_blocks: int = Field(gt=0, le=MAX_BLOCKS)
    model_type: str = Field(max_length=64)
    member_proof: str | None = Field(default=None, pattern=MEMBER_PROOF, description="in a private swarm (swarm/membership.py)")


Record = Annotated[Union[BlockAnnouncement, ModelRegistration], Field(discriminator="kind")]
RECORD_ADAPTER: TypeAdapter = TypeAdapter(Record)


def parse_record(value: object) -> BlockAnnouncement | ModelRegistration:
    return RECORD_ADAPTER.validate_python(value)


class RecordSchemaValidator(RecordValidatorBase):
    """Accept only values that are one of our records (after hivemind strips the signature); in a private
    swarm (with its key), only those of members."""

    def __init__(self, swarm_key: SwarmKey | None = None):
        self.swarm_key = swarm_key

    def validate(self, record: DHTRecord) -> bool:
        try:  # validators see the subkey as hivemind serialized it
            subkey = msgpack.unpackb(record.subkey, raw=False)
        except Exception:
            return False
        owner = owner_of_subkey(subkey)
        if owner is None:
            return False  # unsigned, or signed by a key that is not the named peer's: a forgery
        try:
            value = parse_record(msgpack.unpackb(record.value, raw=False, strict_map_key=False))
        except Exception:
            return False
        return self.swarm_key is None or self.swarm_key.admits_record(owner, value.member_proof)

    @property
    def priority(self) -> int:
        return 5  # below the signature validator (10): runs on the stripped value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, RecordSchemaValidator) and other.swarm_key is self.swarm_key
