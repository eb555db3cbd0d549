"""How route building and swarm-health grow with the number of peers: 5, 20, 50 small peers of a tiny model.

    python -m benchmarks.scale --peers 5,20,50

For every size a fresh swarm: a bootstrap DHT node in this process, then N real peers (real DHT
nodes, p2p daemons and announcements) of a random Llama with `--blocks` blocks (hidden size 64),
each serving a window of it so that every block has about `--redundancy` peers: routes have many
hops and overlapping alternatives. Peers share host processes (`benchmarks/peer_host.py`,
`--peers-per-process` each), because one interpreter with torch per peer would not fit in memory.

Measured, median of `--runs`: a cold route (a new client joins, reads every block record, pings
every peer, routes), a warm route (the DP on a fresh view), and the wall time of the real
`swarm-health --json` command. The route must cover every block and health must see all N peers.
Then a least-squares fit per figure: seconds per extra peer, and the growth exponent k of t ∝ N^k.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import psutil
import typer

from benchmarks.common import (
    REPO, Bootstrap, check_route, cold_route, console, load_average, machine_info, median, parse_list, summary, table,
    warm_routes, write_results,
)

WARM_ROUTE_REPEATS = 50
app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0])


def build_tiny_llama(folder: Path, blocks: int) -> Path:
    """tests/tiny_models.py's Llama config with `blocks` layers, random weights, saved as a local model folder."""
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import tiny_config

    config = tiny_config("llama")
    config.num_hidden_layers = blocks
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder, safe_serialization=True)
    return folder


def layout(peers: int, blocks: int, redundancy: float) -> list[tuple[int, int]]:
    """Evenly spaced windows, each `redundancy × blocks / peers` long: every block is served about
    `redundancy` times, and a route can switch between overlapping peers at many boundaries."""
    length = max(1, math.ceil(redundancy * blocks / peers))
    spans = []
    for i in range(peers):
        start = min(i * blocks // peers, blocks - 1)
        spans.append((start, min(start + length, blocks)))
    return spans


@dataclass
class Host:
    """One peer_host process and the peers it printed as ready."""

    process: subprocess.Popen
    expected: int
    log: Any = None  # the open stderr file
    ready: list[str] = field(default_factory=list)
    lines: "queue.Queue[str]" = field(default_factory=queue.Queue)

    def stop(self, timeout: float = 60) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                for child in psutil.Process(self.process.pid).children(recursive=True):
                    child.kill()
                self.process.kill()
                self.process.wait()
        if self.log is not None:
            self.log.close()

    def rss_mib(self) -> float:
        """The host and its p2p daemons."""
        try:
            root = psutil.Process(self.process.pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
        except psutil.NoSuchProcess:
            return 0.0


def start_hosts(spans: list[tuple[int, int]], per_process: int, model: Path, initial_peers: list[str],
                announce_period: float, log_dir: Path, env: dict[str, str], timeout: float = 600) -> list[Host]:
    """Start every host at once and wait until each printed `ready` for all of its peers."""
    hosts = []
    for first in range(0, len(spans), per_process):
        group = spans[first:first + per_process]
        command = [sys.executable, "-m", "benchmarks.peer_host", "--model", str(model),
                   *(a for m in initial_peers for a in ("--initial-peers", m)),
                   *(a for s, e in group for a in ("--blocks", f"{s}:{e}")),
                   "--setting", "torch_threads=1", "--setting", f"announce_period={announce_period}"]
        log = open(log_dir / f"host-{first // per_process}.log", "w")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
        host = Host(process, len(group), log)
        threading.Thread(target=lambda p=process, q=host.lines: [q.put(line) for line in p.stdout], daemon=True).start()
        hosts.append(host)
    deadline = time.monotonic() + timeout
    try:
        for host in hosts:
            while len(host.ready) < host.expected:
                if time.monotonic() > deadline or host.process.poll() is not None:
                    raise RuntimeError(f"a peer host did not get all its peers ready (exit {host.process.poll()}); "
                                       f"see {log_dir}")
                try:
                    line = host.lines.get(timeout=0.5)
                except queue.Empty:
                    continue
                if line.startswith("ready"):
                    host.ready.append(line.split(" as ")[1].split()[0])
    except BaseException:
        for host in hosts:
            host.stop(10)
        raise
    return hosts


def health_startup() -> float:
    """Wall time of `swarm-health --json-schema`: the same interpreter start and imports, no network.
    Subtracted from the health figure, it leaves what the swarm's size can change."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "client.health", "--json-schema"], cwd=REPO, capture_output=True, check=True)
    return time.perf_counter() - started


def run_health(initial_peers: list[str]) -> tuple[float, dict]:
    """Wall time of the real `swarm-health --json` command, and its report."""
    command = [sys.executable, "-m", "client.health", *(a for m in initial_peers for a in ("--initial-peers", m)),
               "--json", "--timeout", "60"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise RuntimeError(f"swarm-health exited {done.returncode}: {done.stderr[-2000:]}")
    return seconds, json.loads(done.stdout)


async def _wait_for_all(initial_peers: list[str], model, count: int, timeout: float = 120):
    """A client view that sees `count` online peers (announcements take a moment to spread)."""
    from client.swarm_view import SwarmView
    from swarm.dht import SwarmDHT

    dht = await SwarmDHT.create(initial_peers, client_mode=True)
    view = SwarmView(dht, model)
    deadline = time.monotonic() + timeout
    while True:
        await view.refresh()
        seen = len(view.online_peers())
        if seen >= count:
            return dht, view
        if time.monotonic() > deadline:
            await dht.shutdown()
            raise RuntimeError(f"the DHT shows {seen} of {count} peers online after {timeout:g} s")
        await asyncio.sleep(1)


def fit(sizes: list[int], seconds: list[float]) -> dict[str, Optional[float]]:
    """Least squares t = a + b·N (b: seconds per extra peer) and t = c·N^k (k ≤ 1: at most linear)."""
    if len(sizes) < 2:
        return {"intercept_s": None, "per_peer_ms": None, "exponent": None}
    n = len(sizes)
    mean_x, mean_y = sum(sizes) / n, sum(seconds) / n
    b = sum((x - mean_x) * (y - mean_y) for x, y in zip(sizes, seconds)) / sum((x - mean_x) ** 2 for x in sizes)
    lx, ly = [math.log(x) for x in sizes], [math.log(max(y, 1e-9)) for y in seconds]
    mlx, mly = sum(lx) / n, sum(ly) / n
    k = sum((x - mlx) * (y - mly) for x, y in zip(lx, ly)) / sum((x - mlx) ** 2 for x in lx)
    return {"intercept_s": round(mean_y - b * mean_x, 4), "per_peer_ms": round(b * 1000, 3), "exponent": round(k, 3)}


@app.command()
def main(
    peers: str = typer.Option("5,20,50", help="Swarm sizes, in peers."),
    blocks: int = typer.Option(100, min=2, help="Blocks of the tiny model."),
    redundancy: float = typer.Option(2.0, min=1.0, help="About how many peers serve each block."),
    runs: int = typer.Option(5, min=1, help="Runs per figure and size; the median is reported."),
    peers_per_process: int = typer.Option(10, min=1, help="Peers sharing one host process."),
    announce_period: float = typer.Option(60.0, help="Peers' announce period, seconds (records live 3×)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Result file (default: benchmarks/results/)."),
) -> None:
    """Grow the swarm, measure route building and swarm-health at each size, fit the growth."""
    from client import loop
    from swarm.reference import resolve_model

    sizes = sorted(parse_list(peers))
    work = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    info = machine_info()
    with console.status(f"building a tiny Llama with {blocks} blocks"):
        folder = build_tiny_llama(work / f"tiny-llama-{blocks}", blocks)
    model = resolve_model(str(folder))
    env = {"SWARM_CACHE_DIR": str(work / "cache")}  # the tiny model's throughput stays out of the user's cache
    console.print(f"{model.name} ({model.dht_prefix}), {blocks} blocks; peer logs and model in {work}")

    results: dict[int, dict[str, Any]] = {}
    for size in sizes:
        spans = layout(size, blocks, redundancy)
        bootstrap = Bootstrap()
        hosts: list[Host] = []
        try:
            with console.status(f"{size} peers: starting"):
                started = time.perf_counter()
                log_dir = work / f"peers-{size}"
                log_dir.mkdir()
                hosts = start_hosts(spans, peers_per_process, folder, bootstrap.maddrs, announce_period, log_dir, env)
                start_s = time.perf_counter() - started
                dht, view = loop.run(_wait_for_all(bootstrap.maddrs, model, size))
            console.print(f"{size} peers: {len(hosts)} host processes ready in {start_s:.1f} s", highlight=False)
            cold, warm, health, startup = [], [], [], []
            try:
                for run in range(runs):
                    with console.status(f"{size} peers: run {run + 1}/{runs}"):
                        timing, hops = loop.run(cold_route(bootstrap.maddrs, model))
                        check_route(hops, blocks)
                        assert timing.peers_seen == size, f"cold client saw {timing.peers_seen} of {size} peers"
                        cold.append({**timing.as_dict(), "hop_list": [f"{h.start}:{h.end}" for h in hops]})
                        warm.append(median(loop.run(warm_routes(view, WARM_ROUTE_REPEATS))))
                        seconds, report = run_health(bootstrap.maddrs)
                        online = [p for p in report["peers"] if p["state"] == "online" and p["rtt_ms"] is not None]
                        assert report["healthy"] and len(online) == size, \
                            f"swarm-health: healthy={report['healthy']}, {len(online)} of {size} peers reachable"
                        health.append(seconds)
                        startup.append(health_startup())
                    console.print(f"{size} peers, run {run + 1}/{runs}: cold route {timing.total_s:.3f} s "
                                  f"({timing.hops} hops), warm {warm[-1] * 1000:.3f} ms, health {seconds:.2f} s "
                                  f"(startup {startup[-1]:.2f} s)", highlight=False)
            finally:
                loop.run(view.close())
                loop.run(dht.shutdown())
            results[size] = {
                "spans": [f"{s}:{e}" for s, e in spans],
                "start_all_s": round(start_s, 2),
                "rss_mib_all_peers": round(sum(h.rss_mib() for h in hosts)),
                "cold_route_s": summary(c["total_s"] for c in cold),
                "cold_stages_median_s": {k: round(median(c[k] for c in cold), 4)
                                         for k in ("join_s", "read_s", "ping_s", "route_s")},
                "hops": cold[0]["hops"],
                "route": cold[0]["hop_list"],
                "warm_route_s": summary(warm, 6),
                "health_s": summary(health),
                "health_startup_s": summary(startup),
                "health_network_s": round(median(health) - median(startup), 3),
                "load_average": load_average(),
            }
        finally:
            for host in hosts:
                host.stop()
            bootstrap.close()

    _print_and_write(model, blocks, redundancy, runs, peers_per_process, sizes, results, info, json_path)


def _print_and_write(model, blocks, redundancy, runs, per_process, sizes, results, info, json_path) -> None:
    rows = []
    for size in sizes:
        r = results[size]
        stages = r["cold_stages_median_s"]
        rows.append([size, r["hops"], r["cold_route_s"]["median"], stages["join_s"], stages["read_s"], stages["ping_s"],
                     r["warm_route_s"]["median"] * 1000, r["health_s"]["median"], r["health_network_s"],
                     r["start_all_s"], r["rss_mib_all_peers"]])
    console.print(table(f"{model.name}: {blocks} blocks, ~{redundancy:g} peers per block, median of {runs} runs",
                        ["peers", "hops", "cold route s", "join s", "read s", "ping s", "warm route ms", "health s",
                         "health − startup s", "start all s", "RSS MiB"], rows))
    figures = {
        "cold_route_s": [results[s]["cold_route_s"]["median"] for s in sizes],
        "cold_read_s": [results[s]["cold_stages_median_s"]["read_s"] for s in sizes],
        "cold_ping_s": [results[s]["cold_stages_median_s"]["ping_s"] for s in sizes],
        "warm_route_s": [results[s]["warm_route_s"]["median"] for s in sizes],
        "health_s": [results[s]["health_s"]["median"] for s in sizes],
        "health_network_s": [results[s]["health_network_s"] for s in sizes],
    }
    fits = {name: fit(sizes, values) for name, values in figures.items()}
    console.print(table("growth with the number of peers (least squares)", ["figure", "intercept s", "ms per peer",
                                                                            "exponent k (t ∝ N^k)", "at most linear"],
                        [[name, f["intercept_s"], f["per_peer_ms"], f["exponent"],
                          None if f["exponent"] is None else ("yes" if f["exponent"] <= 1.1 else "NO")]
                         for name, f in fits.items()]))
    path = write_results("scale", {
        "benchmark": "scale", "model": model.name, "blocks": blocks, "redundancy": redundancy, "runs": runs,
        "peers_per_process": per_process, "torch_threads_per_peer": 1, "sizes": sizes,
        "results": {str(s): results[s] for s in sizes}, "fits": fits, "machine": info,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }, json_path)
    console.print(f"wrote {path}")


if __name__ == "__main__":
    app()
