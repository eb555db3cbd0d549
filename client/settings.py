"""Client settings: timeouts and retry limits, with defaults documented in docs/operations.md."""
from __future__ import annotations

import os
from pathlib import Path

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from client.agreement import TOLERANCE
from swarm.dtypes import DTypeName, QuantName

ENV_INITIAL_PEERS = "SWARM_INITIAL_PEERS"  # read by the command-line tools (swarm-health, swarm-api), not by ClientSettings


def initial_peers_from(flags: list[str] | None) -> list[str]:
    """The multiaddrs given as flags, else those in $SWARM_INITIAL_PEERS (space or comma separated)."""
    return flags or os.environ.get(ENV_INITIAL_PEERS, "").replace(",", " ").split()


class ClientSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    initial_peers: list[str] = Field(min_length=1)
    dtype: DTypeName | None = Field(
        default=None, description="the route's precision: the client's parts and every peer compute in it; "
                                  "default: parts in float32, peers in any")
    quant: QuantName | None = Field(default=None, description="only peers keeping their weights so; default: any")
    swarm_key: Path | None = Field(default=None, description="a private swarm's key file: use its members only")
    connect_timeout: float = Field(default=10.0, gt=0, description="seconds to open a session on a peer")
    step_timeout: float = Field(default=30.0, gt=0, description="seconds a peer gets to answer one step")
    route_timeout: float = Field(default=5.0, ge=0, description="seconds to wait for missing blocks to appear")
    probe_after: float = Field(default=1.0, gt=0, description="seconds a step may run before the peer is probed")
    probe_timeout: float = Field(default=2.0, gt=0, description="seconds a liveness probe (info call) may take")
    max_retries: int = Field(default=8, ge=0, description="reroutes one step may take before giving up")
    ban_seconds: float = Field(default=15.0, gt=0, description="first ban of a failed peer; doubles on each repeat")
    max_ban_seconds: float = Field(default=300.0, gt=0)
    refresh_period: float = Field(default=3.0, gt=0, description="seconds between background swarm view refreshes")
    verify: Literal["off", "spot", "strict"] = Field(
        default="spot", description="recompute peers' outputs on other peers serving the same blocks: a share of "
                                    "the steps (spot) or every step before it is used (strict); docs/security.md")
    verify_share: float = Field(default=0.05, ge=0, le=1, description="spot: the share of each hop's steps checked")
    verify_tolerance: float = Field(
        default=TOLERANCE, gt=0, description="the largest relative difference of two peers' outputs taken as honest; "
                                        "ten times this with bfloat16 or quantized weights on either side")
    push: bool = Field(default=True, description="peers pass hidden states straight to the next hop of the route")
    head_batch_wait: float = Field(
        default=0.02, ge=0, le=1, description="seconds the shared LM head waits for sessions on their last hop"
    )
