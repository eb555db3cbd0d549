"""What every benchmark shares: the machine it ran on, medians, result files, a bootstrap DHT node, route timing.

Route timing lives here because speed.py and scale.py must measure it the same way, with the very
calls the client makes when it opens a session (client/session.py `_open_route`).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
console = Console(width=None if sys.stdout.isatty() else 160)  # a log file gets whole table rows


def machine_info() -> dict[str, Any]:
    """Enough to tell whether two result files are comparable: hardware, load at start, library versions."""
    import hivemind
    import torch
    import transformers

    cpu_model = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                      if line.startswith("model name")), platform.processor())
    mem_kib = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                    if line.startswith("MemTotal")), 0)
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kib / 2**20, 1),
        "load_average_at_start": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hivemind": hivemind.__version__,
        "torch_threads_here": torch.get_num_threads(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def load_average() -> list[float]:
    """1, 5 and 15 minute load: above the core count, other work competed with the benchmark."""
    return [round(x, 2) for x in os.getloadavg()]


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip()


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def summary(values: Iterable[float], digits: int = 4) -> dict[str, Any]:
    """Median with its spread: a median alone hides how noisy the machine was."""
    values = list(values)
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": round(median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "n": len(values), "values": [round(v, digits) for v in values]}


def parse_list(text: str, kind: type = int) -> list:
    """'1,2,4' -> [1, 2, 4]; an empty string is an empty list."""
    return [kind(part) for part in text.replace(" ", "").split(",") if part]


def write_results(name: str, data: dict[str, Any], path: Path | None = None) -> Path:
    """benchmarks/results/NAME-<timestamp>.json unless PATH is given; results are never committed."""
    if path is None:
        path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return path


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    """A rich table whose numeric columns are right-aligned."""
    out = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        numeric = any(isinstance(row[i], (int, float)) for row in rows)
        out.add_column(column, justify="right" if numeric else "left")
    for row in rows:
        out.add_row(*(_cell(v) for v in row))
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


class Bootstrap:
    """A DHT node that serves no blocks: everyone joins through it, so the client's first connection to a
    routed peer is the one routing chooses (behind its proxy), not a bootstrap connection libp2p would reuse."""

    def __init__(self) -> None:
        from client import loop
        from swarm.dht import SwarmDHT

        self.dht = loop.run(SwarmDHT.create([]))
        self.maddrs: list[str] = loop.run(self.dht.visible_maddrs())

    def close(self) -> None:
        from client import loop

        loop.run(self.dht.shutdown())


@dataclass
class ColdRoute:
    """A brand-new client until its first route: join the DHT, read every block record, ping, route."""

    join_s: float
    read_s: float
    ping_s: float
    route_s: float
    hops: int
    peers_seen: int

    @property
    def total_s(self) -> float:
        return self.join_s + self.read_s + self.ping_s + self.route_s

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_s": self.total_s}


async def route_now(view, banned: frozenset[str] = frozenset()) -> list:
    """The route a session would open right now: the same calls as InferenceSession._open_route."""
    from client.route import build_route

    await view.ensure_fresh()
    peers = {p: r for p, r in view.online_peers().items() if p not in banned}
    rtts = await view.rtts(list(peers))
    return build_route(view.model.num_blocks, peers, rtts, banned)


async def cold_route(initial_peers: list[str], model) -> tuple[ColdRoute, list]:
    """Time each stage of a new client's first route, with the client's own classes."""
    from client.route import build_route
    from client.swarm_view import SwarmView
    from swarm.dht import SwarmDHT

    started = time.perf_counter()
    dht = await SwarmDHT.create(initial_peers, client_mode=True)
    try:
        joined = time.perf_counter()
        view = SwarmView(dht, model)
        await view.refresh()
        read = time.perf_counter()
        peers = view.online_peers()
        rtts = await view.rtts(list(peers))
        pinged = time.perf_counter()
        hops = build_route(model.num_blocks, peers, rtts)
        routed = time.perf_counter()
    finally:
        await dht.shutdown()
    timing = ColdRoute(joined - started, read - joined, pinged - read, routed - pinged, len(hops), len(peers))
    return timing, hops


async def warm_routes(view, repeats: int) -> list[float]:
    """Seconds per route build for a client whose view and round trips are fresh: the DP and lookups only."""
    await route_now(view)  # first read and pings, not timed
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        await route_now(view)
        times.append(time.perf_counter() - started)
    return times


def check_route(hops: list, num_blocks: int) -> None:
    """A route must run every block exactly once, in order."""
    position = 0
    for hop in hops:
        assert hop.start == position and hop.end > hop.start, f"route is not contiguous at block {position}: {hops}"
        position = hop.end
    assert position == num_blocks, f"route ends at block {position}, not {num_blocks}"
