"""How fast this peer runs a decode step, measured once per model, device, dtype and hardware, then cached."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from filelock import FileLock

from swarm.gguf_shards import data_dir
from swarm.span import Span

WARMUP_STEPS, MEASURED_STEPS = 2, 8


def measure_throughput(span: Span) -> float:
    """Decode steps per second through ONE block, so peers with different span sizes compare."""
    key = (f"{span.model.dht_prefix}:{span.device}:{str(span.dtype).removeprefix('torch.')}:{torch.get_num_threads()}"
           f":{hardware(span.device)}")
    path = data_dir() / "throughput.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        cached = json.loads(path.read_text()) if path.is_file() else {}
        if key in cached:
            return cached[key]
        value = _measure(span)
        cached[key] = value
        path.write_text(json.dumps(cached, indent=1))
    return value


def hardware(device: torch.device) -> str:
    """What the figure depends on besides the settings: the processor and torch's kernels.

    Part of the cache key, so a machine that moved to another CPU or GPU, or a torch upgrade, measures
    again instead of announcing a stale figure.
    """
    if device.type == "cuda":
        processor = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")] if cpuinfo.is_file() else []
        processor = names[0] if names else platform.processor() or platform.machine()
    return f"{processor}:torch {torch.__version__}"


def _measure(span: Span) -> float:
    cache = span.new_cache(1, WARMUP_STEPS + MEASURED_STEPS)
    hidden = torch.randn(1, 1, span.config.hidden_size)
    for _ in range(WARMUP_STEPS):
        span.forward(hidden, cache)
    started = time.perf_counter()
    for _ in range(MEASURED_STEPS):
        span.forward(hidden, cache)
    seconds_per_block = (time.perf_counter() - started) / MEASURED_STEPS / span.num_blocks
    return round(1.0 / seconds_per_block, 2)
