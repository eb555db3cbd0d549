"""swarm-health: which blocks of which models the swarm serves, by whom and how well; for operators and CI.

Three layers, so the verdict is testable without a network: `gather` reads the DHT and pings peers,
`build_report` turns those records into a `HealthReport` (pure), and `render` / JSON show it.
Exit status: 0 every listed model is covered by online peers, 1 some block is not, 2 no swarm reached.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional, Sequence

import typer
from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from client.route import format_ranges
from client.settings import ENV_INITIAL_PEERS, initial_peers_from
from swarm.dht import PeerRecord, SwarmDHT
from swarm.errors import SwarmError
from swarm.records import ModelRegistration, PeerState

app = typer.Typer(add_completion=False, help="Check that a swarm serves every block of its models.")
MIN_PING_TIMEOUT = 0.5  # seconds a ping gets even when the reads used up most of the budget


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
    version: str
    public_name: Optional[str]
    rtt_ms: Optional[float] = Field(description="round trip of an INFO call from here; null if it did not answer")


class ModelReport(_Out):
    name: str
    dht_prefix: str
    num_blocks: int
    announced: bool = Field(description="false when named with --model but absent from the swarm's registry")
    covered: bool = Field(description="every block has at least one online peer")
    blocks: list[list[str]] = Field(description="per block, the ids of the online peers serving it")
    uncovered: list[int] = Field(description="blocks no online peer serves")


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
    unknown: Sequence[str] = (),
) -> HealthReport:
    """Judge the swarm from what the DHT said (`tables`: dht prefix -> per block records) and ping times.

    Coverage counts records that say online, reachable from here or not: a peer we cannot ping may
    still serve clients elsewhere, so unreachability is a problem to show, not a gap. `unknown` holds
    models the user named that neither the swarm nor this machine knows.
    """
    models, peers = [], []
    gaps = [f"model {ref} is not announced in this swarm" for ref in unknown]
    for target in targets:
        table = tables.get(target.dht_prefix) or [{} for _ in range(target.num_blocks)]
        online = [sorted(p for p, r in block.items() if r.announcement.state == PeerState.online) for block in table]
        missing = [i for i, block in enumerate(online) if not block]
        models.append(ModelReport(name=target.name, dht_prefix=target.dht_prefix, num_blocks=target.num_blocks,
                                  announced=target.announced, covered=not missing, blocks=online, uncovered=missing))
        if missing:
            what = f"block {missing[0]} of {target.name} is" if len(missing) == 1 else \
                f"blocks {format_ranges(missing)} of {target.name} are"
            gaps.append(f"{what} served by nobody")
        newest: dict[str, PeerRecord] = {}  # a peer that moved has old blocks marked offline: keep its latest word
        for block in table:
            for peer_id, record in block.items():
                if peer_id not in newest or newest[peer_id].expiration_time < record.expiration_time:
                    newest[peer_id] = record
        for peer_id, record in newest.items():
            rtt = rtts.get(peer_id)
            peers.append(PeerReport(
                peer_id=peer_id, model=target.name, dht_prefix=target.dht_prefix,
                rtt_ms=None if rtt is None else round(rtt * 1000, 1),
                **record.announcement.model_dump(include=set(PeerReport.model_fields))))
    peers.sort(key=lambda p: (p.model, p.start, p.end, p.peer_id))
    if not targets and not unknown:
        gaps.append("no model is announced in this swarm")
    return HealthReport(checked_at=datetime.now(timezone.utc), healthy=not gaps, models=models, peers=peers,
                        problems=gaps + _peer_problems(peers))


def _peer_problems(peers: list[PeerReport]) -> list[str]:
    """Offline, unreachable and outdated peers: each hurts capacity even when coverage holds."""
    problems = [f"{_who(p)} is offline" for p in peers if p.state == PeerState.offline]
    problems += [f"{_who(p)} is unreachable" for p in peers if p.state != PeerState.offline and p.rtt_ms is None]
    versions = {p.peer_id: (p, v) for p in peers if (v := _version(p.version)) is not None}
    latest = max((v for _, v in versions.values()), default=None)
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


async def join(initial_peers: list[str], timeout: float) -> SwarmDHT:
    """A client-only DHT node: it reads records but stores none, so checking never changes the swarm."""
    try:
        return await asyncio.wait_for(SwarmDHT.create(initial_peers, client_mode=True), timeout)
    except asyncio.TimeoutError:
        _stop_own_daemons()
        raise SwarmError(f"no answer from {', '.join(initial_peers)} within {timeout:g} s") from None


def _stop_own_daemons() -> None:
    """A p2pd whose start we cancelled has nobody left to stop it; only this process's own children are touched."""
    import psutil

    for child in psutil.Process().children():
        if child.name() == "p2pd":
            child.terminate()


async def gather(dht: SwarmDHT, refs: list[str], timeout: float) -> HealthReport:
    """Read the registry, the block records and every peer's round trip, all within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    left = lambda: max(deadline - time.monotonic(), 0.0)  # noqa: E731
    try:
        registered = await asyncio.wait_for(dht.read_models(), left())
        targets, unknown = await asyncio.wait_for(_targets(registered, refs), left())
        found = await asyncio.wait_for(
            asyncio.gather(*(dht.read_blocks(t.dht_prefix, t.num_blocks) for t in targets)), left())
    except asyncio.TimeoutError:
        raise SwarmError(f"the swarm did not answer within {timeout:g} s") from None
    tables = {t.dht_prefix: table for t, table in zip(targets, found)}
    peer_ids = sorted({p for table in found for block in table for p in block})
    ping_timeout = max(left(), MIN_PING_TIMEOUT)
    rtts = await asyncio.gather(*(dht.ping(p, ping_timeout) for p in peer_ids))
    return build_report(targets, tables, dict(zip(peer_ids, rtts)), unknown)


async def _targets(registered: list[ModelRegistration], refs: list[str]) -> tuple[list[ModelTarget], list[str]]:
    """Every registered model, or the named ones (by name, prefix or a reference resolved here), and the unknown."""
    targets = {m.dht_prefix: ModelTarget(m.name, m.dht_prefix, m.num_blocks, True) for m in registered}
    if not refs:
        return list(targets.values()), []
    from swarm.reference import resolve_model

    chosen: dict[str, ModelTarget] = {}
    unknown: list[str] = []
    for ref in refs:
        match = next((t for t in targets.values() if ref in (t.name, t.dht_prefix)), None)
        if match is None:
            try:
                model = await asyncio.to_thread(resolve_model, ref)
            except SwarmError:
                unknown.append(ref)
                continue
            match = targets.get(model.dht_prefix) or ModelTarget(model.name, model.dht_prefix, model.num_blocks, False)
        chosen[match.dht_prefix] = match
    return list(chosen.values()), unknown


def render(report: HealthReport) -> RenderableType:
    """Per model a coverage bar and its peers, then the problems: the verdict is the last thing one reads."""
    parts: list[RenderableType] = []
    for model in report.models:
        state = Text("covered", "green") if model.covered else Text(f"{len(model.uncovered)} blocks uncovered", "red")
        note = "" if model.announced else ", not announced"
        title = f" ({model.dht_prefix}, {model.num_blocks} blocks{note}): "
        parts += [Text.assemble((model.name, "bold"), title, state),
                  Text("           " + _ruler(model.num_blocks), "dim"),
                  Text("  coverage ") + _bar(model),
                  Padding(_peer_table([p for p in report.peers if p.dht_prefix == model.dht_prefix]), (1, 0, 1, 2))]
    if report.problems:
        parts.append(Text("problems:", "bold red"))
        parts += [Text(f"  - {problem}") for problem in report.problems]
    else:
        parts.append(Text("no problems: every block is served by an online peer", "green"))
    return Group(*parts)


def _peer_table(peers: list[PeerReport]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column in ("peer", "name", "blocks", "state", "steps/s", "cache", "version", "rtt"):
        table.add_column(column, no_wrap=True, justify="right" if column in ("steps/s", "cache", "rtt") else "left")
    styles = {PeerState.online: "green", PeerState.joining: "yellow", PeerState.offline: "red"}
    for p in peers:
        table.add_row(p.peer_id[-8:], p.public_name or "-", f"{p.start}:{p.end}", Text(p.state.value, styles[p.state]),
                      f"{p.throughput:.1f}", str(p.cache_tokens_left), p.version,
                      "-" if p.rtt_ms is None else f"{p.rtt_ms:.0f} ms")
    return table


def _bar(model: ModelReport) -> Text:
    """One character per block: how many online peers serve it; a red dot where nobody does."""
    bar = Text()
    for peers in model.blocks:
        n = len(peers)
        bar.append("·" if n == 0 else str(n) if n < 10 else "+", "red" if n == 0 else "yellow" if n == 1 else "green")
    return bar


def _ruler(num_blocks: int) -> str:
    return "".join(f"{i:<10}" for i in range(0, num_blocks, 10))[:num_blocks]


async def _run(peers: list[str], refs: list[str], timeout: float, watch: Optional[float], as_json: bool,
               codes: list[int]) -> None:
    """One check, or one every `watch` seconds; SIGTERM cancels so our p2pd is always shut down."""
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    dht = await join(peers, timeout)
    try:
        if watch is None:
            report = await gather(dht, refs, timeout)
            if as_json:
                print(report.model_dump_json(indent=2))
            else:
                Console().print(render(report))
            codes.append(report.exit_code)
            return
        with nullcontext() if as_json else Live(Text("checking..."), auto_refresh=False) as live:
            while True:
                try:
                    report = await gather(dht, refs, timeout)
                    view, code = render(report), report.exit_code
                    if as_json:
                        print(report.model_dump_json(), flush=True)
                except SwarmError as e:
                    view, code = Text(f"error: {_one_line(e)}", "red"), 2
                    if as_json:
                        print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
                codes.append(code)
                stamp = Text(f"\n{datetime.now():%H:%M:%S}, every {watch:g} s, Ctrl-C to stop", "dim")
                if live is not None:
                    live.update(Group(view, stamp), refresh=True)
                await asyncio.sleep(watch)
    finally:
        await dht.shutdown()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@app.command()
def health(
    initial_peers: Optional[list[str]] = typer.Option(None, help="Multiaddr of a peer (env: SWARM_INITIAL_PEERS)."),
    model: Optional[list[str]] = typer.Option(None, help="Check only this model: name, DHT prefix or model reference."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document (see --json-schema)."),
    watch: Optional[float] = typer.Option(None, min=0.1, help="Check again every this many seconds until Ctrl-C."),
    timeout: float = typer.Option(10.0, min=0.1, help="Seconds to join, and for each check's reads and pings."),
    json_schema: bool = typer.Option(False, "--json-schema", help="Print the JSON schema of --json output and exit."),
) -> None:
    """Exit 0 if every listed model is covered by online peers, 1 if a block is not, 2 if the swarm is unreachable."""
    if json_schema:
        print(json.dumps(HealthReport.model_json_schema(), indent=2))
        return
    peers = initial_peers_from(initial_peers)
    if not peers:
        print(f"error: no swarm to check: give --initial-peers MULTIADDR or set {ENV_INITIAL_PEERS}", file=sys.stderr)
        raise typer.Exit(2)
    logging.getLogger("hivemind").setLevel(os.environ.get("SWARM_LOG_LEVEL", "CRITICAL"))  # else it buries our error
    import uvloop

    codes: list[int] = []
    try:
        uvloop.run(_run(peers, model or [], timeout, watch, json_output, codes))
    except SwarmError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        raise typer.Exit(2)
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    raise typer.Exit(codes[-1] if codes else 130)


if __name__ == "__main__":
    app()
