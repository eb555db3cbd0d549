"""`make demo`: a real local swarm of three peers, and a chat answer streamed through it."""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from swarm.local_swarm import LocalSwarm, PeerStartError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
QUESTION = "In two sentences: why do volunteers pool their computers to run large language models?"


def main() -> int:
    console = Console()
    logs = Path(tempfile.mkdtemp(prefix="swarm-demo-"))
    with LocalSwarm(logs) as swarm:
        try:
            names = ["peer-0-10", "peer-10-20", "peer-20-30"]
            with console.status(f"starting {', '.join(names)} together (swarm-serve --config configs/NAME.yaml)"):
                peers = swarm.add_together([["--config", str(CONFIGS / f"{name}.yaml")] for name in names], names)
            for peer in peers:
                console.print(f"[green]✓[/green] {peer.ready_line}")
        except PeerStartError as e:
            console.print(f"[red]a peer failed to start:[/red] {e}")
            return 1
        console.print(f"peer logs: {logs}\n")

        from client import SwarmClient

        client = SwarmClient(initial_peers=swarm.initial_peers)
        try:
            console.print(f"[bold]user:[/bold] {QUESTION}\n[bold]assistant:[/bold] ", end="")
            started, pieces = time.perf_counter(), 0
            with client.model.inference_session(max_length=512) as session:
                for piece in client.generate(messages=[{"role": "user", "content": QUESTION}], max_new_tokens=96, stream=True):
                    console.print(piece, end="", markup=False, highlight=False)
                    pieces += 1
                tokens, route = session.steps, session.route
            seconds = time.perf_counter() - started
            console.print("\n")
            hops = " → ".join(f"{hop.peer_id[-8:]}[{hop.start}:{hop.end}]" for hop in route)
            console.print(f"route: {hops}")
            console.print(f"{tokens} steps in {seconds:.1f} s: {tokens / seconds:.1f} tokens/s (including the prompt's prefill)")
        finally:
            client.close()
    console.print("peers stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
