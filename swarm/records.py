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
from swarm.protocol import MAX_MADDR_CHARS

REGISTRY_KEY = "swarm-llm.models"  # every model a swarm serves, so tools need not be told their names
OWNER_MARK = "[owner:"  # how hivemind's signature validator marks a signed subkey
MAX_BLOCKS = 10_000


def block_key(dht_prefix: str, block: int) -> str:
    return f"{dht_prefix}.{block}"


def is_signed_subkey(subkey: str | bytes) -> bool:
    """Only subkeys carrying their owner's public key are protected by hivemind's signature check."""
    if isinstance(subkey, bytes):
        return OWNER_MARK.encode() in subkey
    return OWNER_MARK in subkey


def peer_id_of_subkey(subkey: str | bytes) -> str:
    text = subkey.decode(errors="replace") if isinstance(subkey, bytes) else str(subkey)
    return text.split(OWNER_MARK, 1)[0]


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


Record = Annotated[Union[BlockAnnouncement, ModelRegistration], Field(discriminator="kind")]
RECORD_ADAPTER: TypeAdapter = TypeAdapter(Record)


def parse_record(value: object) -> BlockAnnouncement | ModelRegistration:
    return RECORD_ADAPTER.validate_python(value)


class RecordSchemaValidator(RecordValidatorBase):
    """Accept only values that are one of our records (after hivemind strips the signature)."""

    def validate(self, record: DHTRecord) -> bool:
        if not is_signed_subkey(record.subkey):
            return False  # unsigned, anyone could write it under another peer's id
        try:
            parse_record(msgpack.unpackb(record.value, raw=False, strict_map_key=False))
        except Exception:
            return False
        return True

    @property
    def priority(self) -> int:
        return 5  # below the signature validator (10): runs on the stripped value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, RecordSchemaValidator)
