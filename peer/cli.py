"""swarm-serve: the command line of a peer."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

app = typer.Typer(add_completion=False, help="Serve a span of a model's blocks to the swarm.")
err = Console(stderr=True)

JOIN_HELP = (
    "to start a new swarm: swarm-serve --new-swarm\n"
    "to join one: swarm-serve --initial-peers /ip4/HOST/tcp/PORT/p2p/PEER_ID (or set SWARM_INITIAL_PEERS)"
)


@app.command()
def serve(
    context: typer.Context,
    model: Optional[str] = typer.Option(None, help="Model reference: alias, folder, .gguf file or hub id (default: smollm2-135m)."),
    blocks: Optional[str] = typer.Option(None, help="Blocks to serve, START:END (end exclusive)."),
    num_blocks: Optional[int] = typer.Option(None, help="Serve this many blocks where the swarm needs them most."),
    new_swarm: bool = typer.Option(False, "--new-swarm", help="Start a new swarm instead of joining one."),
    initial_peers: Optional[list[str]] = typer.Option(None, help="Multiaddrs of peers to join through (env: SWARM_INITIAL_PEERS)."),
    join_timeout: Optional[float] = typer.Option(
        None, help="Seconds to keep trying initial peers that do not answer yet, for peers started together "
                   "(default: 0, one try)."),
    host: Optional[str] = typer.Option(None, help="Address to listen on (default: 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="TCP port to listen on (default: any free port)."),
    announce_maddrs: Optional[list[str]] = typer.Option(None, help="Multiaddrs others should reach this peer at."),
    identity: Optional[Path] = typer.Option(None, help="Private key file: keeps the same peer id across restarts."),
    swarm_key: Optional[Path] = typer.Option(
        None, help="A private swarm's key file (64 hex digits): serve and call its members only."),
    dtype: Optional[str] = typer.Option(
        None, help="float32, bfloat16 or float16 (default: float16 on a GPU; on a CPU the faster of float32 and "
                   "float16, measured once)."),
    quant: Optional[str] = typer.Option(
        None, help="none, int8 or int4: keep the blocks' weights quantized (a GGUF's Q4 blocks load as they are; "
                   "CPU only; default: none)."),
    cache_dtype: Optional[str] = typer.Option(None, help="KV cache precision (default: the compute precision)."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda[:N] (default: cpu); one peer per GPU."),
    max_cache_tokens: Optional[int] = typer.Option(
        None, help="KV cache budget in tokens, over all sessions (default: 32768 on a CPU; on a GPU, what its "
                   "free memory leaves after the weights)."),
    public_name: Optional[str] = typer.Option(None, help="A name shown to others in swarm-health."),
    announce_period: Optional[float] = typer.Option(None, help="Seconds between announcements (default: 30)."),
    session_idle_timeout: Optional[float] = typer.Option(None, help="Close sessions idle this long, seconds (default: 600)."),
    torch_threads: Optional[int] = typer.Option(None, help="Threads for compute (default: torch's choice)."),
    max_batch_rows: Optional[int] = typer.Option(None, help="Rows (sessions x batch) computed in one batched pass (default: 64)."),
    max_batch_tokens: Optional[int] = typer.Option(None, help="Tokens in one pass; longer prefills run in chunks (default: 512)."),
    max_batch_wait: Optional[float] = typer.Option(None, help="Seconds a pass may wait for steps of sessions due here (default: 0.1)."),
    metrics_port: Optional[int] = typer.Option(
        None, help="Serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port; default: off)."),
    relay_streams: Optional[int] = typer.Option(
        None, help="When reachable, relay this many streams at once for each peer behind NAT (0: relay for nobody; "
                   "default: 16)."),
    relay_time_limit: Optional[float] = typer.Option(
        None, help="Seconds a relayed stream may last before this relay ends it (default: 1800)."),
    relay_data_limit: Optional[int] = typer.Option(
        None, help="MiB a relayed stream may carry before this relay ends it (default: 4096)."),
    config: Optional[Path] = typer.Option(None, help="YAML file with any of these settings (flags win over it)."),
) -> None:
    """Load blocks of a model, announce them in the DHT, and serve inference sessions until SIGTERM."""
    logging.basicConfig(level=os.environ.get("SWARM_LOG_LEVEL", "INFO"), format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False)])
    from peer.settings import load_settings
    from swarm.errors import DeviceError, ModelReferenceError, QuantizationError, SwarmError

    flags = {name: value for name, value in context.params.items() if name != "config"}  # each names a setting
    try:
        settings = load_settings(config, flags)
    except SwarmError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    if not settings.new_swarm and not settings.initial_peers:
        err.print(f"[red]error:[/red] no swarm to join.\n{JOIN_HELP}")
        raise typer.Exit(2)
    if settings.swarm_key is not None:
        from swarm.membership import SwarmKey

        try:
            SwarmKey.load(settings.swarm_key)
        except SwarmError as e:
            err.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2)

    import uvloop

    from peer.server import Peer

    try:
        uvloop.run(Peer(settings).run())
    except (ModelReferenceError, DeviceError, QuantizationError) as e:  # what we cannot serve with: a bad argument
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    except SwarmError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
