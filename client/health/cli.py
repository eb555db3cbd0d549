"""swarm-health: which blocks of which models the swarm serves, by whom and how well; for operators and CI.

`gather` (gather.py) reads the DHT and pings peers, `build_report` (report.py) judges, and this
module shows the report as a table or JSON. Exit status: 0 every listed model is covered by online
peers, 1 some block is not (or, with --verify, a peer computes wrong), 2 no swarm reached.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from client.commands import required_initial_peers
from client.health.gather import gather, join
from client.health.report import HealthReport, ModelReport, PeerReport
from swarm.errors import SwarmError
from swarm.records import PeerState

app = typer.Typer(add_completion=False, help="Check that a swarm serves every block of its models.")


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
        parts.append(Text("no problems: every block is served by an online peer that answers", "green"))
    return Group(*parts)


def _peer_table(peers: list[PeerReport]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    checked = any(p.outputs is not None for p in peers)  # --verify
    columns = ("peer", "name", "blocks", "state", "precision", "steps/s", "cache", "version", "reached", "rtt")
    for column in columns + (("outputs",) if checked else ()):
        table.add_column(column, no_wrap=True, justify="right" if column in ("steps/s", "cache", "rtt") else "left")
    styles = {PeerState.online: "green", PeerState.joining: "yellow", PeerState.offline: "red"}
    for p in peers:
        table.add_row(p.peer_id[-8:], p.public_name or "-", f"{p.start}:{p.end}", Text(p.state.value, styles[p.state]),
                      p.dtype if p.quant == "none" else f"{p.dtype}/{p.quant}", f"{p.throughput:.1f}", str(p.cache_tokens_left), p.version,
                      "directly" if not p.relays else f"via {', '.join(r[-8:] for r in p.relays)}",
                      "-" if p.rtt_ms is None else f"{p.rtt_ms:.0f} ms",
                      *([Text(p.outputs or "-", {"agrees": "green", "wrong": "red"}.get(p.outputs or "", "yellow"))]
                        if checked else []))
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
               codes: list[int], swarm_key: Optional[Path], verify: bool) -> None:
    """One check, or one every `watch` seconds; SIGTERM cancels so our p2pd is always shut down."""
    from swarm.membership import SwarmKey

    task = asyncio.current_task()
    assert task is not None  # run by uvloop.run
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    dht = await join(peers, timeout, SwarmKey.load(swarm_key) if swarm_key else None)
    try:
        if watch is None:
            report = await gather(dht, refs, timeout, verify)
            if as_json:
                print(report.model_dump_json(indent=2))
            else:
                Console().print(render(report))
            codes.append(report.exit_code)
            return
        with nullcontext() if as_json else Live(Text("checking..."), auto_refresh=False) as live:
            while True:
                try:
                    report = await gather(dht, refs, timeout, verify)
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
    swarm_key: Optional[Path] = typer.Option(None, help="A private swarm's key file: check its members only."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document (see --json-schema)."),
    watch: Optional[float] = typer.Option(None, min=0.1, help="Check again every this many seconds until Ctrl-C."),
    timeout: float = typer.Option(10.0, min=0.1, help="Seconds to join, and for each check's reads and pings."),
    verify: bool = typer.Option(False, help="Also compare the outputs of peers serving the same blocks for one "
                                            "input; a peer computing wrong is a problem (exit 1)."),
    json_schema: bool = typer.Option(False, "--json-schema", help="Print the JSON schema of --json output and exit."),
) -> None:
    """Exit 0 if every listed model is covered by online peers, 1 if a block is not (or --verify finds a peer
    computing wrong), 2 if the swarm is unreachable."""
    if json_schema:
        print(json.dumps(HealthReport.model_json_schema(), indent=2))
        return
    peers = required_initial_peers(initial_peers, "check", Console(stderr=True, soft_wrap=True))
    logging.getLogger("hivemind").setLevel(os.environ.get("SWARM_LOG_LEVEL", "CRITICAL"))  # else it buries our error
    import uvloop

    codes: list[int] = []
    try:
        uvloop.run(_run(peers, model or [], timeout, watch, json_output, codes, swarm_key, verify))
    except SwarmError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        raise typer.Exit(2)
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    raise typer.Exit(codes[-1] if codes else 130)
