"""How fast this peer runs a decode step, measured once per model, device, precision and hardware, then cached."""
from __future__ import annotations

import contextlib
import json
import time
from typing import Any, Callable, Iterator

import torch
from filelock import FileLock

from peer.device import hardware, synchronize
from swarm.gguf_shards import data_dir
from swarm.span import Span

WARMUP_STEPS, MEASURED_STEPS = 2, 8


def measure_throughput(span: Span) -> float:
    """Decode steps per second through ONE block, so peers with different span sizes compare."""
    key = throughput_key(span.model.dht_prefix, span.device, str(span.dtype).removeprefix("torch."), span.quant,
                         torch.get_num_threads())  # called on the compute thread: its own thread count
    return cached(key, lambda: measure_steps(span))


def throughput_key(dht_prefix: str, device: torch.device, dtype: str, quant: str, threads: int) -> str:
    return measurement_key("throughput", dht_prefix, device, dtype, quant, threads=threads)


def measurement_key(kind: str, dht_prefix: str, device: torch.device, *settings: str, threads: int) -> str:
    """What a measured speed depends on: the model, device, settings, thread count and hardware."""
    return ":".join([kind, dht_prefix, str(device), *settings, str(threads), hardware(device)])


def cached(key: str, measure: Callable[[], Any]) -> Any:
    """The value stored under `key`, measured and stored first if there is none; shared by the host's peers."""
    with _stored() as stored:
        if key not in stored:
            stored[key] = measure()
        return stored[key]


def store(key: str, value: Any) -> None:
    """Replace a stored measurement: the peer observed another figure while serving."""
    with _stored() as stored:
        stored[key] = value


@contextlib.contextmanager
def _stored() -> Iterator[dict[str, Any]]:
    path = data_dir() / "throughput.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        stored = json.loads(path.read_text()) if path.is_file() else {}
        before = dict(stored)
        yield stored
        if stored != before:
            path.write_text(json.dumps(stored, indent=1))


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
