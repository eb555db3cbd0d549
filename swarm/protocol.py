"""The wire protocol: RPC names, message metadata (pydantic, validated on the way in) and tensor framing.

Every message is a hivemind `ExpertRequest` / `ExpertResponse` protobuf: `metadata` holds one of the
JSON messages below, `tensors` the hidden states (and an optional attention mask) uncompressed.
"""
from __future__ import annotations

from typing import Annotated, Literal, TypeVar, Union

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from swarm.errors import ProtocolError

INFERENCE = "swarm.inference"  # bidirectional stream: one session
FORWARD = "swarm.forward"  # one request, one response: a whole sequence, no cache
INFO = "swarm.info"  # unary: what a peer serves and how loaded it is
PUSH = "swarm.push"  # unary: a peer hands its output straight to the next hop of a client's route
REACHABILITY = "swarm.reachability"  # unary: a joining peer asks whether strangers can connect to it
RELAY = "swarm.relay"  # bidirectional stream: RelayOpen, then one of the calls above for a peer behind NAT
UNARY = {INFO, PUSH, REACHABILITY}  # the others stream their responses

MAX_PUSH_BYTES = 1024**2  # per push call; a larger output is not pushed (unary calls are capped at 4 MiB)
MAX_NEXT_HOPS = 64
MAX_PUSH_ITEMS = 256  # steps in one push call
MAX_CHECKED_ADDRS = 4  # addresses one reachability check tries
MAX_MADDR_CHARS = 300

MAX_BATCH = 64
MAX_LENGTH = 65_536  # positions in one session
MAX_STEP_TOKENS = 16_384  # batch x new positions in one message
MAX_MESSAGE_BYTES = 256 * 1024**2
HIDDEN_DTYPES = {"float32", "float16", "bfloat16"}
MASK_DTYPES = {"bool", "int64", "int32"}
SESSION_ID = r"^[A-Za-z0-9_.:-]{1,64}$"
TRACE_ID = r"^[A-Za-z0-9_.:-]{1,64}$"
PUSH_TOKEN = r"^[0-9a-f]{32}$"  # 128 random bits
MEMBER_TOKEN = r"^[0-9a-f]{64}$"  # an HMAC-SHA256
M = TypeVar("M")


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Call(_Message):
    """The first message of a call: in a private swarm it carries the members' token (swarm/membership.py)."""

    member: str | None = Field(default=None, pattern=MEMBER_TOKEN)


class OpenSession(_Call):
    """First message of an inference stream. The hop may use only part of the peer's span."""

    type: Literal["open"] = "open"
    session_id: str = Field(pattern=SESSION_ID)
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    max_length: int = Field(gt=0, le=MAX_LENGTH)
    batch_size: int = Field(gt=0, le=MAX_BATCH)
    push_token: str | None = Field(default=None, pattern=PUSH_TOKEN,
                                   description="the secret a push into this session must carry; none: no pushes")


class NextHop(_Message):
    """A later hop of the route: its peer, its session there, and the step number this input is there."""

    peer_id: str = Field(min_length=1, max_length=128)
    session_id: str = Field(pattern=SESSION_ID)
    step: int = Field(ge=0)
    token: str = Field(pattern=PUSH_TOKEN, description="that session's push token, which the client gave only to its route")
    relay: str | None = Field(default=None, max_length=128, description="the relay that reaches a peer behind NAT")


# Beam search: before a step, row i of the session's cache becomes what row reorder[i] was (in every block).
Reorder = Annotated[list[Annotated[int, Field(ge=0, lt=MAX_BATCH)]], Field(min_length=1, max_length=MAX_BATCH)]


class Step(_Message):
    """New positions of an open session. Tensors: hidden [batch, new, hidden], optional mask [batch, new].

    Steps of a session are numbered 0, 1, 2... A step number already computed is a duplicate (its
    input came first by push) and gets no reply; a number ahead of the next is refused. With `next_hops`,
    the peer also pushes its output (and the mask) to next_hops[0], passing on next_hops[1:].
    """

    type: Literal["step"] = "step"
    session_id: str = Field(pattern=SESSION_ID)
    step: int = Field(ge=0)
    next_hops: list[NextHop] = Field(default=[], max_length=MAX_NEXT_HOPS)
    trace_id: str | None = Field(default=None, pattern=TRACE_ID)  # the client's name for this step, logged by every hop
    reorder: Reorder | None = None


class PushItem(_Message):
    """One step's input in a `Push`: the receiving peer's session, its step number there, the rest of the chain."""

    session_id: str = Field(pattern=SESSION_ID)
    step: int = Field(ge=0)
    token: str = Field(pattern=PUSH_TOKEN)  # the receiving session's push token, from the NextHop
    next_hops: list[NextHop] = Field(default=[], max_length=MAX_NEXT_HOPS)
    masked: bool = False  # the item's tensors are hidden states and a mask, not hidden states alone
    trace_id: str | None = Field(default=None, pattern=TRACE_ID)
    reorder: Reorder | None = None  # the step's, passed on: every hop reorders its own cache


class Push(_Call):
    """Sent by a peer to the next hop: inputs of steps of its sessions, as the client would send them.

    Tensors: each item's hidden states, then its mask if `masked`, in the order of `items`. The steps
    of one batched pass that continue to the same peer travel in one push.
    """

    type: Literal["push"] = "push"
    items: list[PushItem] = Field(min_length=1, max_length=MAX_PUSH_ITEMS)


class ForwardRequest(_Call):
    """A whole sequence through blocks [start, end), no cache. Tensors as in `Step`."""

    type: Literal["forward"] = "forward"
    start: int = Field(ge=0)
    end: int = Field(gt=0)


class InfoRequest(_Call):
    type: Literal["info"] = "info"


class ReachabilityCheck(_Call):
    """Asks a peer to open a TCP connection to each address, as a stranger would (each `/ip4/A/tcp/P`)."""

    type: Literal["reachability_check"] = "reachability_check"
    maddrs: list[Annotated[str, Field(max_length=MAX_MADDR_CHARS)]] = Field(min_length=1, max_length=MAX_CHECKED_ADDRS)


class RelayOpen(_Call):
    """First message to a relay: forward the rest of this stream to RPC of TARGET, and its responses back."""

    type: Literal["relay"] = "relay"
    target: str = Field(min_length=1, max_length=128)
    rpc: Literal["swarm.inference", "swarm.forward", "swarm.info", "swarm.push"]


class Reachability(_Message):
    """The addresses of a check that a connection reached, and whether the checker relays for peers behind NAT."""

    type: Literal["reachability"] = "reachability"
    reachable: list[str]
    relays: bool


class PushReply(_Message):
    """Reply to a push: per item, whether it was queued as its session's next step (the result goes to
    the client's stream). Refused: an unknown session, a step that is not the next, bad tensors."""

    type: Literal["push_reply"] = "push_reply"
    accepted: list[bool]


class Opened(_Message):
    type: Literal["opened"] = "opened"
    session_id: str
    cache_tokens_left: int


class StepResult(_Message):
    """Reply to a step or forward request. Tensors: hidden [batch, new, hidden] in the request's dtype."""

    type: Literal["result"] = "result"
    step: int
    length: int  # positions the session's cache now holds
    pushed: bool = False  # the next hop accepted this output by push: the client need not send it there


ErrorCode = Literal["bad_request", "cache_full", "shutting_down", "unknown_session", "duplicate_session", "idle", "internal",
                    "not_served",  # the peer does not serve those blocks (any more): the client's view was stale
                    "relay",  # a relay ended the stream at its limits: the peer may serve a new one
                    "unreachable",  # a relay cannot reach the peer (any more): it is gone or its link is
                    "not_member"]  # a private swarm's peer refuses a caller without its key


class ErrorReply(_Message):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str


class Leaving(_Message):
    """Sent on every open stream when a peer shuts down gracefully, so clients move at once."""

    type: Literal["leaving"] = "leaving"
    message: str = "peer is shutting down"


class PeerInfo(_Message):
    type: Literal["info"] = "info"
    model: str
    dht_prefix: str
    start: int
    end: int
    version: str
    dtype: str
    quant: str = "none"
    public_name: str | None
    throughput: float
    cache_tokens_left: int
    max_cache_tokens: int
    open_sessions: int
    steps: int = Field(ge=0, description="steps and forward calls computed (chunks of long ones count apart)")
    passes: int = Field(ge=0, description="batched passes those steps took: fewer passes than steps means batching")
    hidden_size: int = Field(default=0, ge=0, le=1 << 20, description="the model's hidden states' width (0: not told)")


RequestMessage = Union[OpenSession, Step, ForwardRequest, InfoRequest, Push, ReachabilityCheck, RelayOpen]
ResponseMessage = Union[Opened, StepResult, ErrorReply, Leaving, PeerInfo, PushReply, Reachability]
_REQUEST: TypeAdapter[RequestMessage] = TypeAdapter(Annotated[RequestMessage, Field(discriminator="type")])
_RESPONSE: TypeAdapter[ResponseMessage] = TypeAdapter(Annotated[ResponseMessage, Field(discriminator="type")])


def pack_request(message: _Message, *tensors: torch.Tensor) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(metadata=message.model_dump_json().encode(), tensors=[_serialized(t) for t in tensors])


def pack_response(message: _Message, *tensors: torch.Tensor) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(metadata=message.model_dump_json().encode(), tensors=[_serialized(t) for t in tensors])


def _serialized(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    if tensor.device.type != "cpu":  # a span copies its outputs to the host: anything else is our bug
        raise ProtocolError(f"a tensor on {tensor.device} cannot be sent: tensors cross the network from the host")
    return serialize_torch_tensor(tensor)


def unpack_request(proto: runtime_pb2.ExpertRequest) -> tuple[RequestMessage, list[torch.Tensor]]:
    """Parse and validate a request; raise ProtocolError naming what is wrong."""
    return _unpack(proto, _REQUEST)


def unpack_response(proto: runtime_pb2.ExpertResponse) -> tuple[ResponseMessage, list[torch.Tensor]]:
    return _unpack(proto, _RESPONSE)


def _unpack(proto: runtime_pb2.ExpertRequest | runtime_pb2.ExpertResponse,
            adapter: TypeAdapter[M]) -> tuple[M, list[torch.Tensor]]:
    if proto.ByteSize() > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {proto.ByteSize()} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    try:
        message = adapter.validate_json(proto.metadata)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'message'}: {err['msg']}" for err in e.errors()[:3])
        raise ProtocolError(f"invalid message metadata: {problems}") from None
    return message, [_tensor(t) for t in proto.tensors]


def _tensor(proto) -> torch.Tensor:
    allowed = HIDDEN_DTYPES | MASK_DTYPES
    if proto.dtype not in allowed:
        raise ProtocolError(f"tensor dtype {proto.dtype!r} is not allowed; use one of {sorted(allowed)}")
    if proto.compression != runtime_pb2.CompressionType.NONE:
        raise ProtocolError("compressed tensors are not accepted")
    numel = 1
    for dim in proto.size:
        numel *= dim
    # hivemind ships uncompressed bfloat16 as float32 bytes
    itemsize = 4 if proto.dtype == "bfloat16" else torch.empty((), dtype=getattr(torch, proto.dtype)).element_size()
    if len(proto.buffer) != numel * itemsize:
        raise ProtocolError(f"tensor of shape {list(proto.size)} needs {numel * itemsize} bytes, got {len(proto.buffer)}")
    try:
        return deserialize_torch_tensor(proto)
    except Exception as e:
        raise ProtocolError(f"unreadable tensor: {e}") from None


def input_tensors(hidden: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The tensors a step, forward or push carries: hidden states, then the mask if there is one."""
    return (hidden,) if mask is None else (hidden, mask)


def check_reorder(reorder: list[int] | None, batch_size: int) -> None:
    """A reorder must name a row of this session for every row (rows may repeat: two beams from one)."""
    if reorder is not None and (len(reorder) != batch_size or not all(0 <= r < batch_size for r in reorder)):
        raise ProtocolError(f"reorder {reorder} does not pick one of the session's {batch_size} rows for each row")


def check_inputs(
    tensors: list[torch.Tensor], hidden_size: int, batch_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states and the optional mask of a step or forward request, checked before any compute."""
    if not 1 <= len(tensors) <= 2:
        raise ProtocolError(f"expected hidden states and an optional mask, got {len(tensors)} tensors")
    hidden = tensors[0]
    if hidden.dim() != 3:
        raise ProtocolError(f"hidden states must have rank 3 [batch, positions, hidden], got shape {list(hidden.shape)}")
    if str(hidden.dtype).removeprefix("torch.") not in HIDDEN_DTYPES:
        raise ProtocolError(f"hidden states must be one of {sorted(HIDDEN_DTYPES)}, got {hidden.dtype}")
    batch, length, size = hidden.shape
    if size != hidden_size:
        raise ProtocolError(f"hidden size {size} does not match the model's {hidden_size}")
    if batch_size is not None and batch != batch_size:
        raise ProtocolError(f"batch size {batch} does not match the session's {batch_size}")
    if batch > MAX_BATCH:
        raise ProtocolError(f"batch size {batch} exceeds the limit of {MAX_BATCH}")
    if length == 0 or batch == 0:
        raise ProtocolError("empty hidden states")
    if batch * length > MAX_STEP_TOKENS:
        raise ProtocolError(f"{batch}x{length} tokens in one message exceed the limit of {MAX_STEP_TOKENS}")
    if not torch.isfinite(hidden).all():
        raise ProtocolError("hidden states contain NaN or inf")
    mask = tensors[1] if len(tensors) == 2 else None
    if mask is not None:
        if tuple(mask.shape) != (batch, length):
            raise ProtocolError(f"mask shape {list(mask.shape)} does not match hidden states {[batch, length]}")
        if str(mask.dtype).removeprefix("torch.") not in MASK_DTYPES:
            raise ProtocolError(f"mask must be one of {sorted(MASK_DTYPES)}, got {mask.dtype}")
    return hidden, mask
