"""How fast this peer runs a decode step, measured once per model, device, precision and hardware, then cached."""
from __future__ import annotations

import json
import time
from typing import Any, Callable

import torch
from filelock import FileLock

from peer.device import hardware, synchronize
from swarm.gguf_shards import data_dir
from swarm.span import Span

WARMUP_STEPS, MEASURED_STEPS = 2, 8


def measure_throughput(span: Span) -> float:
    """Decode steps per second through ONE block, so peers with different span sizes compare."""
    key = measurement_key("throughput", span.model.dht_prefix, span.device, str(span.dtype).removeprefix("torch."),
                          span.quant)
    return cached(key, lambda: measure_steps(span))


def measurement_key(kind: str, dht_prefix: str, device: torch.device, *settings: str) -> str:
    """What a measured speed depends on: the model, device, settings, thread count and hardware."""
    return ":".join([kind, dht_prefix, str(device), *settings, str(torch.get_num_threads()), hardware(device)])


def cached(key: str, measure: Callable[[], Any]) -> Any:
    """The value stored under `key`, measured and stored first if there is none; shared by the host's peers."""
    path = data_dir() / "throughput.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        stored = json.loads(path.read_text()) if path.is_file() else {}
        if key not in stored:
            stored[key] = measure()
            path.write_text(json.dumps(stored, indent=1))
    return stored[key]


def measure_steps(span: Span) -> float:
    """Decode steps per second through one block of `span`, with a fresh one-session cache."""
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
