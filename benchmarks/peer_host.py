"""Several real peers in one process, for swarms too large for one process per peer on this machine.

Each peer is a `peer.server.Peer` with its own DHT node and p2p daemon, its own blocks and its own
announcements, exactly as `swarm-serve` runs it; only the Python interpreter (and its imported torch,
~400 MB) is shared. Prints each peer's `listening on` / `ready` lines like swarm-serve does, and
stops every peer cleanly on SIGTERM.

    python -m benchmarks.peer_host --model FOLDER --initial-peers MADDR --blocks 0:4 --blocks 2:6 \
        --setting announce_period=60 --setting torch_threads=1
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Optional

import typer

app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0])


async def serve_all(settings: list) -> None:
    """Run every peer until SIGTERM/SIGINT; if one fails, stop the others and re-raise."""
    from peer.server import Peer

    peers = [Peer(s) for s in settings]
    tasks = [asyncio.create_task(peer.run()) for peer in peers]
    # Peer.run installs its own SIGTERM handler before its first await, and the last one installed
    # wins: let every task take its first step, then install one handler that stops them all.
    await asyncio.sleep(0)

    def stop() -> None:
        for peer in peers:
            peer.stopping.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    failed = [t for t in done if t.exception() is not None]
    if failed:
        stop()
        if pending:
            await asyncio.wait(pending, timeout=30)
        raise failed[0].exception()


@app.command()
def main(
    blocks: list[str] = typer.Option(..., help="START:END of one peer; repeat once per peer."),
    model: str = typer.Option(..., help="Model reference for every peer."),
    initial_peers: list[str] = typer.Option(..., help="Multiaddrs to join through."),
    setting: Optional[list[str]] = typer.Option(None, help="KEY=VALUE of PeerSettings for every peer; repeatable."),
) -> None:
    """Serve one span per --blocks, each as its own peer, in this process."""
    import uvloop

    from peer.settings import PeerSettings

    logging.basicConfig(level=os.environ.get("SWARM_LOG_LEVEL", "WARNING"), format="%(name)s: %(message)s")
    extra = dict(pair.split("=", 1) for pair in setting or [])
    settings = [PeerSettings(model=model, blocks=span, initial_peers=initial_peers, **extra) for span in blocks]
    uvloop.run(serve_all(settings))


if __name__ == "__main__":
    app()
