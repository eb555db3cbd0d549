"""Does routing prefer the nearer of two equal peers? Two peers serve every block, one behind a short
delay proxy and one behind a long one; a client builds many routes and we count who is chosen.

    python -m benchmarks.nearest                  # 5 ms vs 50 ms one way, 5 × 200 route builds

Both peers run the same blocks on the same machine, so they announce the same throughput (the
throughput cache is per machine) and differ only in round-trip time. Route building draws up to 10 %
jitter per peer per build (client/route.py), so one build proves little: each of `--pings` rounds
measures round trips with a fresh view (as a new client does), then builds `--routes` routes on it.
"""
from __future__ import annotations

import asyncio
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import typer

from benchmarks.common import Bootstrap, console, machine_info, median, route_now, summary, table, write_results

app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0])


async def choose_many(initial_peers: list[str], model, pings: int, routes: int) -> tuple[Counter, dict[str, list]]:
    """Who serves the first hop, counted over pings × routes builds; and each peer's measured round trips."""
    from client.swarm_view import SwarmView
    from swarm.dht import SwarmDHT

    dht = await SwarmDHT.create(initial_peers, client_mode=True)
    chosen: Counter = Counter()
    rtts: dict[str, list] = {}
    try:
        for _ in range(pings):
            view = SwarmView(dht, model)  # a fresh view measures round trips again
            try:
                for _ in range(routes):
                    hops = await route_now(view)
                    chosen[hops[0].peer_id if len(hops) == 1 else "split"] += 1
                for peer, rtt in (await view.rtts(list(view.online_peers()))).items():
                    rtts.setdefault(peer, []).append(rtt)
            finally:
                await view.close()
            await asyncio.sleep(0.2)
    finally:
        await dht.shutdown()
    return chosen, rtts


@app.command()
def main(
    near_ms: float = typer.Option(5.0, help="One-way delay of the near peer, ms."),
    far_ms: float = typer.Option(50.0, help="One-way delay of the far peer, ms."),
    pings: int = typer.Option(5, min=1, help="Fresh views (round trips measured again)."),
    routes: int = typer.Option(200, min=1, help="Routes built per view."),
    model_ref: str = typer.Option("smollm2-135m", "--model", help="Model reference; both peers serve all its blocks."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Result file (default: benchmarks/results/)."),
) -> None:
    """Start both peers behind their proxies, count route choices, print and write the split."""
    from benchmarks.delay_proxy import ProxyHost, start_proxied_peer
    from client import loop
    from swarm.reference import resolve_model

    model = resolve_model(model_ref)
    logs = Path(tempfile.mkdtemp(prefix="nearest-bench-"))
    info = machine_info()
    bootstrap, proxies, peers = Bootstrap(), ProxyHost(), {}
    try:
        for name, delay in (("near", near_ms), ("far", far_ms)):
            with console.status(f"starting the {name} peer ({delay:g} ms one way), blocks 0:{model.num_blocks}"):
                peer, _ = start_proxied_peer(proxies, ["--model", model_ref, "--blocks", f"0:{model.num_blocks}"],
                                             logs, name, bootstrap.maddrs, delay)
                peers[name] = peer
        time.sleep(1)  # the second peer's announcement reaches the bootstrap node
        with console.status(f"{pings} × {routes} route builds"):
            chosen, rtts = loop.run(choose_many(bootstrap.maddrs, model, pings, routes))
        throughputs = {name: float(p.ready_line.rsplit("(", 1)[1].split()[0]) for name, p in peers.items()}
    finally:
        for peer in peers.values():
            peer.stop()
        proxies.close()
        bootstrap.close()

    total = sum(chosen.values())
    rows, out = [], {}
    for name, delay in (("near", near_ms), ("far", far_ms)):
        peer_id = peers[name].peer_id
        share = chosen[peer_id] / total
        rtt = median(rtts.get(peer_id, [])) * 1000
        rows.append([name, delay, rtt, throughputs[name], chosen[peer_id], f"{share:.1%}"])
        out[name] = {"peer_id": peer_id, "one_way_delay_ms": delay, "rtt_ms": summary(r * 1000 for r in rtts[peer_id]),
                     "announced_throughput": throughputs[name], "chosen": chosen[peer_id], "share": round(share, 4)}
    if chosen["split"]:
        rows.append(["both (split route)", None, None, None, chosen["split"], f"{chosen['split'] / total:.1%}"])
    console.print(table(f"{model.name}: who serves the route, {total} builds",
                        ["peer", "one-way ms", "measured RTT ms", "block-steps/s", "chosen", "share"], rows))
    verdict = out["near"]["share"] >= 0.95
    console.print("[green]routing prefers the nearer peer[/green]" if verdict else
                  "[red]routing does NOT clearly prefer the nearer peer[/red]")
    path = write_results("nearest", {"benchmark": "nearest", "model": model.name, "pings": pings,
                                     "routes_per_ping": routes, "peers": out, "split_routes": chosen["split"],
                                     "near_share_at_least_95pct": verdict, "machine": info,
                                     "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, json_path)
    console.print(f"wrote {path}")


if __name__ == "__main__":
    app()
