"""How fast this peer runs a decode step, measured once per model, device, dtype and hardware, then cached."""
from __future__ import annotations

import json
import time

import torch
from filelock import FileLock

from peer.device import hardware, synchronize
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


def _measure(span: Span) -> float:
    cache = span.new_cache(1, WARMUP_STEPS + MEASURED_STEPS)
    hidden = torch.randn(1, 1, span.config.hidden_size)
    for _ in range(WARMUP_STEPS):
        span.forward(hidden, cache)
    synchronize(span.device)  # a GPU may still be running the warm-up: launches return before kernels end
    started = time.perf_counter()
    for _ in range(MEASURED_STEPS):
        span.forward(hidden, cache)  # its output is copied to the host, which waits for the device
    synchronize(span.device)
    seconds_per_block = (time.perf_counter() - started) / MEASURED_STEPS / span.num_blocks
    return round(1.0 / seconds_per_block, 2)
