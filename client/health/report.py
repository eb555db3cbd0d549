"""swarm-health's verdict: the report's schema and how records and round trips become one (pure, no network).

Kept apart from the gathering and the command line so the verdict is testable without a swarm, and
so the gateway's /health serves the very same report.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional, Sequence

from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field

from client.route import format_ranges
from swarm.dht import PeerRecord
from swarm.records import PeerState


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PeerReport(_Out):
    """One peer's newest announcement for one model, and whether it answers us."""

    peer_id: str = Field(description="libp2p peer id (base58)")
    model: str = Field(description="name of the model whose blocks the peer announces")
    dht_prefix: str
    start: int = Field(description="first block of the peer's span")
    end: int = Field(description="one past the last block of the peer's span")
    state: PeerState
    throughput: float = Field(description="announced decode steps per second through one block")
    cache_tokens_left: int = Field(description="announced free KV cache, in tokens")
    dtype: str = Field(description="the precision the peer computes in")
    quant: str = Field(description="how the peer keeps its blocks' linear weights: none, int8 or int4")
    version: str
    public_name: Optional[str]
    rtt_ms: Optional[float] = Field(description="round trip of an INFO call from here (through its relay, if any); "
                                                "null if it did not answer")
    relays: list[str] = Field(description="peer ids of the relays it is reached through, as it is behind NAT; "
                                          "empty: reached directly")
    outputs: Optional[str] = Field(default=None, description="--verify: agrees (with another peer of its blocks), "
                                   "wrong (agrees with none while others do), unsettled (disagrees, nobody to settle "
                                   "it); null: not checked, or nobody else serves its blocks")


class ModelReport(_Out):
    name: str
    dht_prefix: str
    num_blocks: int
    announced: bool = Field(description="false when named with --model but absent from the swarm's registry")
    covered: bool = Field(description="every block has at least one online peer that answers")
    blocks: list[list[str]] = Field(description="per block, the ids of the online peers serving it that answered")
    uncovered: list[int] = Field(description="blocks no online peer that answers serves")


class HealthReport(_Out):
    checked_at: datetime
    healthy: bool = Field(description="at least one model, and every listed model covered (exit status 0)")
    models: list[ModelReport]
    peers: list[PeerReport]
    problems: list[str] = Field(description="what is wrong, in words, most serious first")

    @property
    def exit_code(self) -> int:
        return 0 if self.healthy else 1


@dataclass(frozen=True)
class ModelTarget:
    """A model to check: from the registry, or named by the user (then maybe not announced)."""

    name: str
    dht_prefix: str
    num_blocks: int
    announced: bool


def build_report(
    targets: list[ModelTarget], tables: dict[str, list[dict[str, PeerRecord]]], rtts: dict[str, Optional[float]],
    unknown: Sequence[str] = (), verdicts: Optional[dict[str, str]] = None, output_problems: Sequence[str] = (),
    output_failures: Sequence[str] = (),
) -> HealthReport:
    """Judge the swarm from what the DHT said (`tables`: dht prefix -> per block records) and ping times.

    A block counts as covered only by peers whose record says online and that answered our ping: a
    record alone is a claim (a killed peer's stays until it expires), so a block whose only peer does
    not answer is a gap, named with the peers that did not answer. `unknown` holds models the user
    named that neither the swarm nor this machine knows. With `verdicts` (--verify), a peer found computing
    wrong covers nothing, and any disagreement makes the swarm unhealthy.
    """
    models, peers = [], []
    gaps = [f"model {ref} is not announced in this swarm" for ref in unknown] + list(output_problems)
    verdicts = verdicts or {}
    for target in targets:
        table = tables.get(target.dht_prefix) or [{} for _ in range(target.num_blocks)]
        online = [{p for p, r in block.items() if r.announcement.state == PeerState.online} for block in table]
        serving = [sorted(p for p in block if rtts.get(p) is not None and verdicts.get(p) != "wrong") for block in online]
        missing = [i for i, block in enumerate(serving) if not block]
        models.append(ModelReport(name=target.name, dht_prefix=target.dht_prefix, num_blocks=target.num_blocks,
                                  announced=target.announced, covered=not missing, blocks=serving, uncovered=missing))
        if missing:
            what = f"block {missing[0]} of {target.name} is" if len(missing) == 1 else \
                f"blocks {format_ranges(missing)} of {target.name} are"
            silent = sorted({p[-8:] for i in missing for p in online[i] if rtts.get(p) is None})
            wrong = sorted({p[-8:] for i in missing for p in online[i] if verdicts.get(p) == "wrong"})
            why = ([f"announced by {', '.join(silent)}, which did not answer"] if silent else []) + \
                ([f"{', '.join(wrong)} computes them wrong"] if wrong else [])
            gaps.append(f"{what} served by nobody" + (f" that answers ({'; '.join(why)})" if why else ""))
        newest: dict[str, PeerRecord] = {}  # a peer that moved has old blocks marked offline: keep its latest word
        for block in table:
            for peer_id, record in block.items():
                if peer_id not in newest or newest[peer_id].expiration_time < record.expiration_time:
                    newest[peer_id] = record
        for peer_id, record in newest.items():
            rtt = rtts.get(peer_id)
            peers.append(PeerReport(
                peer_id=peer_id, model=target.name, dht_prefix=target.dht_prefix,
                rtt_ms=None if rtt is None else round(rtt * 1000, 1), outputs=verdicts.get(peer_id),
                **record.announcement.model_dump(include=set(PeerReport.model_fields))))
    peers.sort(key=lambda p: (p.model, p.start, p.end, p.peer_id))
    if not targets and not unknown:
        gaps.append("no model is announced in this swarm")
    return HealthReport(checked_at=datetime.now(timezone.utc), healthy=not gaps, models=models, peers=peers,
                        problems=gaps + _peer_problems(peers) + list(output_failures))


def _peer_problems(peers: list[PeerReport]) -> list[str]:
    """Offline, unreachable and outdated peers: each hurts capacity even when coverage holds."""
    problems = [f"{_who(p)} is offline" for p in peers if p.state == PeerState.offline]
    problems += [f"{_who(p)} is unreachable" for p in peers if p.state != PeerState.offline and p.rtt_ms is None]
    versions = {p.peer_id: (p, v) for p in peers if (v := _version(p.version)) is not None}
    if versions:
        latest = max(v for _, v in versions.values())
        problems += [f"{_who(p)} runs an older version ({p.version} < {latest})"
                     for p, v in versions.values() if v < latest]
    return problems


def _version(text: str) -> Optional[Version]:
    try:
        return Version(text)
    except InvalidVersion:
        return None  # not comparable: shown in the table, never called older


def _who(peer: PeerReport) -> str:
    return f"peer {peer.peer_id[-8:]}" + (f" ({peer.public_name})" if peer.public_name else "")


