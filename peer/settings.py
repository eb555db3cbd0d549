"""A peer's settings: one pydantic model, filled from defaults < YAML file < SWARM_* environment < flags."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from swarm.dtypes import DTypeName, QuantName
from swarm.errors import SwarmError
from swarm.reference import DEFAULT_MODEL

ENV_PREFIX = "SWARM_"
LIST_FIELDS = {"initial_peers", "announce_maddrs"}


class PeerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = DEFAULT_MODEL
    blocks: str | None = Field(default=None, description="START:END, the blocks to serve")
    num_blocks: int | None = Field(default=None, gt=0, description="serve this many blocks where the swarm needs them")
    new_swarm: bool = False
    initial_peers: list[str] = []
    join_timeout: float = Field(default=0.0, ge=0, le=3600,
                                description="seconds to keep trying initial peers that do not answer yet")
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    announce_maddrs: list[str] = []
    identity: Path | None = None
    swarm_key: Path | None = Field(default=None, description="a private swarm's key file: its members only")
    dtype: DTypeName | None = Field(default=None, description="default: float16 on a GPU; on a CPU the faster of "
                                                               "float32 and float16, measured (peer/precision.py)")
    quant: QuantName = Field(default="none", description="keep the blocks' linear weights as int8 or int4")
    cache_dtype: DTypeName | None = Field(default=None, description="the KV cache's precision; default: the compute's")
    device: str = "cpu"
    max_cache_tokens: int | None = Field(default=None, gt=0, description="default: 32768 on a CPU, what a GPU leaves")
    public_name: str | None = Field(default=None, max_length=64)
    announce_period: float = Field(default=30.0, gt=0, description="seconds between re-announcements")
    session_idle_timeout: float = Field(default=600.0, gt=0)
    shutdown_grace: float = Field(default=5.0, ge=0, description="seconds open steps get to finish on shutdown")
    rebalance_period: float = Field(default=120.0, gt=0)
    torch_threads: int | None = Field(default=None, gt=0)
    max_batch_rows: int = Field(default=64, gt=0, description="rows (sessions x their batch) in one batched pass")
    max_batch_tokens: int = Field(default=512, gt=0, description="tokens in one pass; longer inputs run in chunks")
    max_batch_wait: float = Field(
        default=0.1, ge=0, description="seconds a pass may wait for the steps of sessions due on this peer"
    )
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="serve Prometheus metrics on this port")
    relay_streams: int = Field(default=16, ge=0, le=1024,
                               description="relayed streams per peer behind NAT, if reachable; 0: relay for nobody")
    relay_time_limit: float = Field(default=1800.0, gt=0, description="seconds one relayed stream may last")
    relay_data_limit: int = Field(default=4096, gt=0, description="MiB one relayed stream may carry")

    @field_validator("blocks")
    @classmethod
    def _blocks_format(cls, value: str | None) -> str | None:
        if value is not None:
            start, sep, end = value.partition(":")
            if not sep or not start.isdigit() or not end.isdigit() or int(start) >= int(end):
                raise ValueError(f"expected START:END with START < END, got {value!r}")
        return value

    @field_validator("device")
    @classmethod
    def _device_known(cls, value: str) -> str:
        if value != "cpu" and not value.startswith("cuda"):
            raise ValueError(f"expected cpu or cuda[:N], got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_way_to_choose_blocks(self) -> "PeerSettings":
        if self.blocks and self.num_blocks:
            raise ValueError("give --blocks or --num-blocks, not both")
        if self.new_swarm and self.initial_peers:
            raise ValueError("give --new-swarm or --initial-peers, not both")
        return self

    @property
    def span(self) -> tuple[int, int] | None:
        if self.blocks is None:
            return None
        start, end = self.blocks.split(":")
        return int(start), int(end)


def load_settings(config_file: Path | None, flags: dict[str, Any]) -> PeerSettings:
    """Merge the sources; a bad value raises SwarmError naming the field and its source."""
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config_file is not None:
        try:
            data = yaml.safe_load(config_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise SwarmError(f"config file {config_file}: {e}") from None
        if not isinstance(data, dict):
            raise SwarmError(f"config file {config_file}: expected a mapping of settings")
        for key, value in data.items():
            merged[key.replace("-", "_")] = value
            sources[key.replace("-", "_")] = str(config_file)
    for name in PeerSettings.model_fields:
        value = os.environ.get(ENV_PREFIX + name.upper())
        if value is not None:
            merged[name] = value.replace(",", " ").split() if name in LIST_FIELDS else value
            sources[name] = ENV_PREFIX + name.upper()
    for name, value in flags.items():
        if value is not None and value != [] and value is not False:
            merged[name] = value
            sources[name] = "--" + name.replace("_", "-")
    try:
        return PeerSettings(**merged)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(part) for part in err["loc"])
        where = f" (from {sources[field]})" if field in sources else ""
        subject = f"setting {field}{where}" if field else "settings"
        raise SwarmError(f"invalid {subject}: {err['msg'].removeprefix('Value error, ')}") from None
